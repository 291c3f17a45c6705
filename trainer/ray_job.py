"""The distillation's worker group as a Ray Train job (``parallel.launcher: ray``).

The driver (the process that calls :func:`run_ray_job`: ``python -m trainer.train`` or the distill stage) joins the
Ray cluster at ``parallel.ray_address`` (``None``: starts a local one for the run) and runs a Ray Train
``TorchTrainer`` of ``nproc_per_node x nnodes`` workers. Ray Train initializes the torch process group
(``TorchConfig(backend=...)``: gloo on CPU, NCCL on GPU) and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; each
worker then changes to the driver's working directory, records where it runs and calls the same entry point a
torchrun rank runs (``"module:function"``, called with ``args``; it must return 0). Everything after that is the
torchrun path: FSDP2 over the group, rollouts in-process in each worker (colocated with its actor), DCP
checkpoints under ``checkpoint.dir``, rank 0 writing ``metrics.jsonl`` and the export.

Failures: Ray Train restarts the whole worker group up to ``parallel.ray_max_failures`` times; the restarted
entry point resumes from the newest complete DCP checkpoint (:class:`trainer.checkpoint.Checkpointer`), as a
re-run of a killed torchrun job does. Ray Train's own checkpoint storage (``RunConfig.storage_path``) holds only
its run state.

On a cluster of several machines the driver's working directory (params, artifacts, ``checkpoint.dir``) must be
on a filesystem every node mounts at the same path; on one host it is simply the directory.

Placement lives in one place, :func:`ray_placement`: the trainer workers' bundles (1 CPU, +1 GPU with CUDA, one
bundle per rank, ``PACK``: fill a node before the next) and, with ``teacher.placement: ray``, the teacher replicas'
own resources (``teacher.num_cpus`` / ``num_gpus`` each, on top of the workers'). Rank 0 creates the replicas in the
job's cluster (:class:`trainer.teacher_pool.TeacherPool`; they are its actors, so a restarted worker group starts a
fresh pool); the rollout engines stay inside the workers, colocated with their actor.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, ParallelConfig, TeacherConfig

__all__ = [
    "PLACEMENT_FILE",
    "RAY_WORKER_ENV",
    "RayJobError",
    "RayJobResult",
    "RayPlacement",
    "check_address",
    "connect",
    "in_ray_worker",
    "ray_placement",
    "run_ray_job",
]

RAY_WORKER_ENV = "OPRD_RAY_WORKER"
"""Set to ``1`` in every Ray Train worker before the entry point runs (the entry point must not launch again)."""
PLACEMENT_FILE = "ray_placement.json"
"""Written by rank 0 of each attempt under the job's directory: ``[{"attempt": 1, "workers": [{rank, node_id,
node_ip, pid, ...}]}, ...]``."""


class RayJobError(RuntimeError):
    """The Ray job failed (after ``parallel.ray_max_failures`` restarts of the worker group)."""


def in_ray_worker() -> bool:
    return os.environ.get(RAY_WORKER_ENV) == "1"


@dataclass(frozen=True)
class RayPlacement:
    """Where the job's actors go: today the trainer workers (one bundle each; rollout engines live inside them)."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    placement_strategy: str
    torch_backend: str
    """The process-group backend Ray Train initializes (``gloo`` / ``nccl``)."""
    teacher_replicas: int = 0
    """Teacher pool replicas (``teacher.placement: ray``) the job reserves room for; 0: the teacher is in-process."""
    teacher_resources: dict[str, float] = field(default_factory=dict)
    """Ray resources of one teacher replica."""

    def scaling_config(self):
        from ray.train import ScalingConfig

        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=self.resources_per_worker,
            placement_strategy=self.placement_strategy,
        )


def teacher_resources(teacher: TeacherConfig | None) -> tuple[int, dict[str, float]]:
    """(replicas, Ray resources of one replica) of a ``teacher.placement: ray`` pool; ``(0, {})`` otherwise."""
    if teacher is None or teacher.placement != "ray":
        return 0, {}
    return teacher.replicas, {
        "CPU": teacher.num_cpus,
        **({"GPU": teacher.num_gpus} if teacher.num_gpus else {}),
    }


def ray_placement(
    cfg: ParallelConfig, cluster_resources: dict[str, float], teacher: TeacherConfig | None = None
) -> RayPlacement:
    """The job's placement from the config and the cluster's total resources (``ray.cluster_resources()``).

    Trainer workers: ``nproc_per_node x nnodes`` of them (the same world size as torchrun, so checkpoints carry
    over), each 1 CPU and, with ``backend`` ``auto``/``nccl`` on a cluster with GPUs, 1 GPU. With
    ``teacher.placement: ray`` the cluster must also hold ``teacher.replicas`` x (``num_cpus``, ``num_gpus``).

    Raises:
        ConfigError: ``backend: nccl`` on a cluster without GPUs, or workers plus teacher replicas need more
        CPUs/GPUs than the cluster has.
    """
    world = cfg.nproc_per_node * cfg.nnodes
    gpus = float(cluster_resources.get("GPU", 0))
    if cfg.backend == "nccl" and gpus < 1:
        raise ConfigError(
            "parallel.backend: nccl needs GPUs, and the Ray cluster has none (use auto or gloo)"
        )
    use_gpu = cfg.backend != "gloo" and gpus >= 1
    res = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    replicas, per_replica = teacher_resources(teacher)
    for key in sorted(set(res) | set(per_replica)):
        need = world * res.get(key, 0.0) + replicas * per_replica.get(key, 0.0)
        have = float(cluster_resources.get(key, 0))
        if have < need:
            pool = f" + {replicas} teacher replica(s) x {per_replica.get(key, 0.0):g}" if replicas else ""
            raise ConfigError(
                f"parallel: {world} Ray workers x {res.get(key, 0.0):g}{pool} need {need:g} {key} and the Ray "
                f"cluster has {have:g} (lower parallel.nproc_per_node x nnodes or teacher.replicas, or add nodes)"
            )
    return RayPlacement(
        num_workers=world,
        use_gpu=use_gpu,
        resources_per_worker=res,
        placement_strategy="PACK",
        torch_backend="nccl" if use_gpu else "gloo",
        teacher_replicas=replicas,
        teacher_resources=per_replica,
    )


def _check_reachable(address: str) -> None:
    """One TCP connect to ``host:port`` (or ``ray://host:port``), so a wrong address is one line, not a hang."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"parallel.ray_address={address} is not host:port, ray://host:port or auto "
            "(leave it unset to start a local Ray cluster)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(
            f"parallel.ray_address={address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
            "with `ray start --head` or leave parallel.ray_address unset for a local cluster"
        ) from None


def check_address(cfg: ParallelConfig) -> None:
    """Pre-flight for ``cfg.ray_address`` (a TCP connect; nothing for ``None`` / ``auto``), so a wrong address is
    one line before any work. Raises :class:`ConfigError`."""
    if cfg.ray_address not in (None, "auto"):
        _check_reachable(cfg.ray_address)


def connect(cfg: ParallelConfig, *, local_cpus: int | None = None) -> None:
    """Join the cluster at ``cfg.ray_address``; with ``None``, the one in ``RAY_ADDRESS`` (set for a ``ray job
    submit`` entrypoint) or else a new local one (``local_cpus`` CPUs, default the host's).

    The workers get the driver's ``sys.path`` as ``PYTHONPATH`` so they import the same code.

    Raises:
        ConfigError: the address is malformed or nothing (no Ray cluster) answers there.
    """
    import ray

    if ray.is_initialized():
        return
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
    # Inside a `ray job submit` entrypoint Ray sets RAY_ADDRESS: the job's own cluster.
    if cfg.ray_address is None and os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
        return
    if cfg.ray_address is None:
        # address="local": a new cluster for this run; a bare ray.init() would attach to a cluster that
        # `ray start` left on this host (and then refuse num_cpus).
        ray.init(
            address="local", num_cpus=local_cpus or os.cpu_count(), include_dashboard=False,
            runtime_env=runtime_env, log_to_driver=True,
        )  # fmt: skip
        return
    check_address(cfg)
    try:
        ray.init(address=cfg.ray_address, runtime_env=runtime_env, log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(f"parallel.ray_address={cfg.ray_address}: {exc}".splitlines()[0]) from None


@dataclass
class RayJobResult:
    placement: RayPlacement
    cluster_nodes: int
    """Alive nodes in the cluster when the job started."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """One entry per start of the worker group (``[0]`` the first; more after a restart), from rank 0's record."""

    @property
    def workers(self) -> list[dict[str, Any]]:
        """The last attempt's workers, by rank: ``{rank, local_rank, node_rank, node_id, node_ip, pid}``."""
        return self.attempts[-1]["workers"] if self.attempts else []

    def tags(self) -> dict[str, str]:
        """What the run records about the job: launcher, backend, cluster size and where each rank ran."""
        p = self.placement
        return {
            "oprd.parallel.launcher": "ray",
            "oprd.parallel.backend": p.torch_backend,
            "oprd.parallel.world_size": str(p.num_workers),
            "oprd.ray.cluster_nodes": str(self.cluster_nodes),
            "oprd.ray.nodes": str(len({w["node_id"] for w in self.workers})),
            "oprd.ray.workers": str(p.num_workers),
            "oprd.ray.attempts": str(len(self.attempts)),
            "oprd.ray.placement_strategy": p.placement_strategy,
            "oprd.ray.resources_per_worker": json.dumps(p.resources_per_worker, sort_keys=True),
            "oprd.ray.teacher_replicas": str(p.teacher_replicas),
            "oprd.ray.teacher_resources": json.dumps(p.teacher_resources, sort_keys=True),
            "oprd.ray.placement": json.dumps(
                [
                    {"rank": w["rank"], "node_ip": w["node_ip"], "node_id": w["node_id"][:12]}
                    for w in self.workers
                ]
            ),
        }


def run_ray_job(
    cfg: ParallelConfig,
    entry: str,
    args: list[Any],
    *,
    job_dir: str | Path,
    name: str | None = None,
    env: dict[str, str] | None = None,
    teacher: TeacherConfig | None = None,
) -> RayJobResult:
    """Run ``entry(*args)`` on every worker of a Ray Train ``TorchTrainer`` (see the module docstring).

    Args:
        entry: ``"module:function"`` importable on the workers; it returns 0 on success.
        job_dir: the driver's directory for this job: :data:`PLACEMENT_FILE` and Ray Train's storage (``ray/``).
        name: the Ray Train run's name (default ``oprd-distill-<random>``: a fresh run state every job).
        env: extra environment for the workers (e.g. the MLflow run id rank 0 logs to).
        teacher: the ``teacher`` section; with ``placement: ray`` the job checks (and a local cluster gets) room for
            the pool's replicas next to the workers.

    Raises:
        ConfigError: bad address or placement (before any work). RayJobError: the job failed.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    name = name or f"oprd-distill-{uuid.uuid4().hex[:8]}"
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    record = job_dir / PLACEMENT_FILE
    record.unlink(missing_ok=True)
    replicas, per_replica = teacher_resources(teacher)
    need_cpus = cfg.nproc_per_node * cfg.nnodes + math.ceil(replicas * per_replica.get("CPU", 0.0))
    connect(cfg, local_cpus=max(os.cpu_count() or 1, need_cpus))
    try:
        placement = ray_placement(cfg, ray.cluster_resources(), teacher)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "entry": entry,
                "args": list(args),
                "cwd": os.getcwd(),
                "env": dict(env or {}),
                "record": str(record),
            },
            scaling_config=placement.scaling_config(),
            torch_config=TorchConfig(backend=placement.torch_backend),
            run_config=RunConfig(
                name=name,
                storage_path=str(job_dir / "ray"),
                failure_config=FailureConfig(max_failures=cfg.ray_max_failures),
            ),
        )
        try:
            trainer.fit()
        except TrainingFailedError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayJobError(f"the Ray job failed after {cfg.ray_max_failures} restart(s): {first}") from exc
        attempts = json.loads(record.read_text()) if record.is_file() else []
        return RayJobResult(placement=placement, cluster_nodes=nodes, attempts=attempts)
    finally:
        ray.shutdown()


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the driver's cwd and env, the placement record, then the entry point."""
    import ray
    import ray.train
    import torch.distributed as dist

    os.chdir(config["cwd"])
    os.environ.update(config["env"])
    os.environ[RAY_WORKER_ENV] = "1"
    ctx = ray.train.get_context()
    me = {
        "rank": ctx.get_world_rank(),
        "local_rank": ctx.get_local_rank(),
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }
    workers = [me]
    if dist.is_initialized() and dist.get_world_size() > 1:
        workers = [None] * dist.get_world_size()
        dist.all_gather_object(workers, me)
    if me["rank"] == 0:
        path = Path(config["record"])
        attempts = json.loads(path.read_text()) if path.is_file() else []
        attempts.append({"attempt": len(attempts) + 1, "workers": workers})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(attempts, indent=1))
        os.replace(tmp, path)  # the test / driver reads it while the job runs
    module, _, fn = config["entry"].partition(":")
    rc = getattr(importlib.import_module(module), fn)(*config["args"])
    if rc:
        raise RayJobError(f"{config['entry']} exited with {rc} on rank {me['rank']}")
