"""``teacher.placement: ray``: a pool of Ray actor replicas, each holding the teacher once.

Each :class:`TeacherReplica` loads the teacher directory once (``models.dtype``, on CPU or a GPU per
``teacher.num_gpus``), hashes the files it loaded (:func:`trainer.teacher.teacher_digest`) and answers
:class:`trainer.teacher.TeacherRequest` s with :func:`trainer.teacher.answer`: only the planned layers at the
selected (compacted) positions in the compute dtype, and log-probs gathered on its side, so no logits and no
uncompacted states cross the wire. Every call is checked against the identity (manifest sha256, depth, hidden size)
and the layer plan the ranks planned for; a mismatch raises :class:`trainer.teacher.TeacherMismatchError` (never
retried).

Client side (:class:`TeacherPool`, one per rank, all ranks sharing the same named actors):

* ``submit`` returns at once (a Ray object ref); the trainer submits each micro-batch as soon as the rollout has
  finished its rows (:class:`trainer.microbatch.MicroBatchStream`) and consumes the replies in order while the
  student updates, so the teacher overlaps the rollout's tail and the update.
* Load balancing: each request goes to the replica with the fewest of this client's requests in flight (ties:
  round robin).
* Faults: a replica that dies is restarted by Ray (``teacher.max_restarts``, reloading the teacher); a request
  whose replica died or exceeded ``teacher.call_timeout_s`` is re-sent (to another replica when there is one) up to
  ``teacher.max_retries`` times, then :class:`TeacherPoolError` is raised. The trainer raises it out of the step
  before ``optimizer.step``, so no update ever sees partial targets.
* ``stats``: cumulative ``requests``, ``reply_bytes`` (the payload: states + mask + log-probs as received),
  ``request_bytes`` (ids, masks, log-prob ids sent) and ``retries``; the trainer logs their per-step deltas.

Cluster: an initialized Ray (a Ray Train worker) is used as is; else ``teacher.ray_address``; else a single process
starts a local Ray, and under torchrun rank 0 starts one and broadcasts its address (and the actor names) to the
other ranks, which join it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.config import ModelsConfig, ModelSource, TeacherConfig
from trainer.teacher import (
    LocalTeacher,
    TeacherIdentity,
    TeacherMismatchError,
    TeacherReply,
    TeacherRequest,
    reply_nbytes,
    teacher_digest,
)

__all__ = ["NAMESPACE", "TeacherPool", "TeacherPoolError", "TeacherReplica"]

NAMESPACE = "oprd_ci"
"""Ray namespace of the pool's named actors (ranks look them up by name there)."""


class TeacherPoolError(RuntimeError):
    """A teacher request could not be answered within ``teacher.max_retries`` re-sends (the step fails)."""


class TeacherReplica:
    """Ray actor body: one teacher, loaded once. Wrapped with ``ray.remote`` by :class:`TeacherPool`."""

    def __init__(self, teacher_path: str, models: dict, num_threads: int, device: str):
        from trainer.hidden import num_decoder_layers
        from trainer.models import load_model

        torch.set_num_threads(max(1, num_threads))
        cfg = ModelsConfig.model_validate(models)
        model = load_model(ModelSource(path=teacher_path), cfg, role="teacher", trainable=False).to(device)
        identity = TeacherIdentity(
            manifest_sha256=teacher_digest(teacher_path, trust_manifest=False),
            num_layers=num_decoder_layers(model),
            hidden_size=int(model.config.hidden_size),
        )
        self.device = torch.device(device)
        self.teacher = LocalTeacher(model, identity)

    def info(self) -> dict:
        return {"identity": self.teacher.identity, "pid": os.getpid(), "device": str(self.device)}

    def answer(self, args: tuple[Tensor, Tensor, Tensor, Tensor], request: TeacherRequest) -> TeacherReply:
        ids, am, pos, rm = (t.to(self.device) for t in args)
        if request.logprob_ids is not None:
            request = _with_ids(request, request.logprob_ids.to(self.device))
        reply = self.teacher.submit(ids, am, pos, rm, request).result()
        return TeacherReply(
            *(t.cpu() if t is not None else None for t in (reply.states, reply.mask, reply.logprobs))
        )


def _with_ids(request: TeacherRequest, ids: Tensor | None) -> TeacherRequest:
    return TeacherRequest(**{**request.__dict__, "logprob_ids": ids})


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Pending:
    """One request in flight: re-sent on replica failure; ``result()`` blocks and returns the CPU reply."""

    def __init__(self, pool: TeacherPool, args_ref, request: TeacherRequest):
        self.pool, self.args_ref, self.request = pool, args_ref, request
        self.attempts = 0
        self.replica = -1
        self.ref = None
        self._send(exclude=None)

    def _send(self, exclude: int | None) -> None:
        self.replica = self.pool._pick(exclude)
        self.pool._inflight[self.replica] += 1
        self.ref = self.pool._actors[self.replica].answer.remote(self.args_ref, self.request)

    def cancel(self) -> None:
        """Drop a request whose reply is no longer wanted (best effort: a running call finishes, its reply is
        discarded); frees its slot in the load balancing."""
        import ray

        if self.ref is not None:
            with contextlib.suppress(Exception):
                ray.cancel(self.ref, force=False)
            self.pool._inflight[self.replica] -= 1
            self.ref = None

    def result(self) -> TeacherReply:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        while True:
            try:
                reply = ray.get(self.ref, timeout=self.pool.cfg.call_timeout_s)
            except TeacherMismatchError:
                self.pool._inflight[self.replica] -= 1
                raise
            except (RayActorError, GetTimeoutError) as exc:
                self.pool._inflight[self.replica] -= 1
                self.attempts += 1
                if self.attempts > self.pool.cfg.max_retries:
                    raise TeacherPoolError(
                        f"teacher request failed {self.attempts} times (last on replica {self.replica}: "
                        f"{type(exc).__name__}); teacher.max_retries={self.pool.cfg.max_retries} exhausted, the step "
                        "is abandoned before optimizer.step (weights untouched). Check the replicas' logs and "
                        "resources (teacher.num_cpus / num_gpus), or raise teacher.max_retries / call_timeout_s."
                    ) from exc
                self.pool.stats["retries"] += 1
                if isinstance(exc, GetTimeoutError):
                    with contextlib.suppress(Exception):  # best effort: the late reply is ignored anyway
                        ray.cancel(self.ref, force=False)
                self._send(exclude=self.replica)
                continue
            self.pool._inflight[self.replica] -= 1
            self.pool.stats["reply_bytes"] += reply_nbytes(reply)
            return reply


class TeacherPool:
    """:class:`trainer.teacher.TeacherBackend` over ``cfg.replicas`` Ray actors (see the module docstring).

    Args:
        cfg: the ``teacher`` section.
        models: ``models`` (the teacher path, dtype and trust_remote_code the replicas load with).
        identity: what the ranks planned for (manifest digest of the directory, depth and hidden size of its
            config); the replicas must match it, checked at start and on every call.
        rank, world_size: this process in the torchrun group (all ranks must construct the pool together when
            ``world_size > 1``: collectives broadcast the address and actor names).
    """

    def __init__(
        self,
        cfg: TeacherConfig,
        models: ModelsConfig,
        identity: TeacherIdentity,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ):
        import ray

        self.cfg, self.identity = cfg, identity
        self.stats: dict[str, float] = {"requests": 0, "reply_bytes": 0, "request_bytes": 0, "retries": 0}
        self._started_ray = False
        address, tag = None, None
        if rank == 0:
            self._connect(cfg)
            address, tag = ray.get_runtime_context().gcs_address, uuid.uuid4().hex[:12]
        address, tag = _broadcast((address, tag), world_size, device)
        if rank != 0:
            self._connect(cfg, address)
        self.names = [f"oprd-teacher-{tag}-{i}" for i in range(cfg.replicas)]
        if rank == 0:
            actor_cls = ray.remote(TeacherReplica)
            device_kind = "cuda" if cfg.num_gpus > 0 else "cpu"
            threads = max(1, math.floor(cfg.num_cpus))
            # PYTHONPATH: the replicas import this package; a Ray worker does not inherit the driver's sys.path.
            root = str(Path(__file__).resolve().parents[1])
            pypath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
            self._actors = [
                actor_cls.options(
                    name=name, namespace=NAMESPACE, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                    max_restarts=cfg.max_restarts, max_task_retries=0, max_concurrency=1,
                    runtime_env={"env_vars": {"PYTHONPATH": pypath, "OMP_NUM_THREADS": str(threads)}},
                ).remote(models.teacher.path, models.model_dump(mode="json"), threads, device_kind)
                for name in self.names
            ]  # fmt: skip
            self._owner = True
        _barrier(world_size)
        if rank != 0:
            self._actors = [ray.get_actor(n, namespace=NAMESPACE) for n in self.names]
            self._owner = False
        self._inflight = [0] * len(self._actors)
        self._rr = 0
        try:
            self.infos = ray.get([a.info.remote() for a in self._actors], timeout=cfg.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise TeacherPoolError(
                f"{cfg.replicas} teacher replicas did not start within teacher.call_timeout_s={cfg.call_timeout_s}s: "
                f"does the Ray cluster have {cfg.replicas} x (num_cpus {cfg.num_cpus}, num_gpus {cfg.num_gpus}) free? "
                f"(ray.cluster_resources() = {ray.cluster_resources()})"
            ) from None
        for i, info in enumerate(self.infos):
            if info["identity"] != identity:
                self.close()
                raise TeacherMismatchError(
                    f"teacher replica {i} loaded {info['identity']}, the ranks planned for {identity}: the replica's "
                    f"files differ from {models.teacher.path}'s manifest (or the config changed)"
                )
        _barrier(world_size)

    # ------------------------------------------------------------------------------------------ cluster
    def _connect(self, cfg: TeacherConfig, address: str | None = None) -> None:
        import ray

        if ray.is_initialized():
            return
        address = address or cfg.ray_address
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            need = math.ceil(cfg.replicas * cfg.num_cpus)
            # address="local": start a fresh cluster; ray.init() would attach to any cluster this host started.
            ray.init(
                address="local", num_cpus=need, num_gpus=math.ceil(cfg.replicas * cfg.num_gpus), include_dashboard=False,
                namespace=NAMESPACE, log_to_driver=False,
            )  # fmt: skip
            self._started_ray = True

    def _pick(self, exclude: int | None) -> int:
        cands = [i for i in range(len(self._actors)) if i != exclude] or list(range(len(self._actors)))
        low = min(self._inflight[i] for i in cands)
        tied = [i for i in cands if self._inflight[i] == low]
        choice = tied[self._rr % len(tied)]
        self._rr += 1
        return choice

    # -------------------------------------------------------------------------------------------- calls
    def submit(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, response_mask: Tensor,
        request: TeacherRequest,
    ) -> _Pending:  # fmt: skip
        """Send one request (CPU copies of the tensors, put once so a re-send does not re-serialize them)."""
        import ray

        args = tuple(t.detach().cpu() for t in (input_ids, attention_mask, position_ids, response_mask))
        if request.logprob_ids is not None:
            request = _with_ids(request, request.logprob_ids.detach().cpu())
        self.stats["requests"] += 1
        self.stats["request_bytes"] += _nbytes(*args, request.logprob_ids)
        return _Pending(self, ray.put(args), request)

    def pids(self) -> list[int]:
        """The replicas' current process ids (asks each replica; after a restart, the new process)."""
        import ray

        return [info["pid"] for info in ray.get([a.info.remote() for a in self._actors])]

    @property
    def actors(self) -> list:
        return list(self._actors)

    def close(self) -> None:
        """Kill the actors this process created (rank 0) and shut down a Ray this process started."""
        import ray

        if not ray.is_initialized():
            return
        if getattr(self, "_owner", False):
            for a in self._actors:
                ray.kill(a, no_restart=True)
            self._owner = False
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def _broadcast(obj, world_size: int, device: torch.device | None):
    if world_size <= 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


def wait_for_restart(pool: TeacherPool, replica: int, old_pid: int, timeout_s: float = 120.0) -> int:
    """Block until ``replica`` answers from a process other than ``old_pid`` (after a kill); its new pid."""
    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            pid = ray.get(pool.actors[replica].info.remote(), timeout=timeout_s)["pid"]
            if pid != old_pid:
                return pid
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"replica {replica} did not come back within {timeout_s} s")
