"""The on-policy distillation loop (OPRD and the OPD baselines), single-process or under ``torchrun`` + FSDP2.

One step, as in the paper's Algorithm / oprd-method.md §1.1:

1. take the next ``prompts_per_step`` prompts (each rank its slice);
2. the **current student** samples ``n_responses`` per prompt (on-policy rollout);
3. no-grad passes on the same token ids: the teacher (selected hidden states, or log-probs for OPD) and, for
   output-space methods only, the student's old-log-prob / top-k pass;
4. one student forward with grad, the loss normalized by the **global** count of selected tokens, backward,
   finite check (all ranks agree) *before* ``optimizer.step``, clip, step.

With ``teacher.placement: ray`` the teacher pass of step 3 runs on a pool of Ray replicas
(:mod:`trainer.teacher_pool`): the ranks never load the teacher's weights, each micro-batch's request is sent as soon
as the rollout has finished its rows (:class:`trainer.microbatch.MicroBatchStream`), and the step's teacher traffic
is logged (``teacher/*``).

With ``distill.micro_batch_tokens`` steps 3-4 run per micro-batch (gradients accumulate, one optimizer step;
:mod:`trainer.microbatch`), so the teacher targets of the whole batch are never alive at once.

Usage::

    python -m trainer.train --params params.yaml --out artifacts/distill
    torchrun --nproc_per_node 2 -m trainer.train --params params.yaml --out artifacts/distill
    python -m trainer.train --params params.yaml --set parallel.launcher=ray --set parallel.nproc_per_node=2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from trainer.bridge import check_bank, load_bank
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import ConfigError, Params, load_params
from trainer.data import Prompt, PromptSampler, drop_overlong, encode_prompts, load_prompts
from trainer.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    enable_activation_checkpointing,
    init_distributed,
    shard_model,
    uses_fsdp_mixed_precision,
)
from trainer.export import write_manifest
from trainer.memory import PeakMemory
from trainer.methods import method_spec
from trainer.metrics import ConsoleLogger, JsonlLogger, LoggerGroup, MetricLogger, NullLogger
from trainer.microbatch import (
    MicroBatchStream,
    accumulate_update,
    micro_batches,
    split_to,
    submit_teacher_requests,
    teacher_request_stream,
)
from trainer.models import (
    check_compatibility,
    copy_tokenizer_files,
    has_tokenizer,
    load_model,
    load_tokenizer,
    meta_model,
)
from trainer.objective_bridge import BridgeObjective
from trainer.objectives import Denominators, Objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.ray_job import in_ray_worker
from trainer.rollout import RolloutBatch, build_engine
from trainer.teacher import reference_nbytes, teacher_identity
from trainer.teacher_pool import TeacherPool

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "fit_prompts", "main", "prompt_budget"]

Validator = Callable[[nn.Module, int], dict[str, float]]
"""``validate(student, step) -> {"val/accuracy": ..., ...}``; called on every rank (it may use collectives)."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm was NaN/Inf; raised before ``optimizer.step`` so the weights stay good."""


@dataclass
class TrainResult:
    steps: int
    export_dir: Path | None
    best_step: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    """The step this process started at: the restored checkpoint's step, 0 for a fresh start."""
    steps_computed: int = 0
    """How many steps (``train_step`` calls) this process executed; restored steps are not recomputed."""


class Trainer:
    """Wires config, models, data, sharding, optimizer, objective, checkpoints and logging for :meth:`fit`."""

    def __init__(
        self,
        params: Params,
        out_dir: str | Path,
        *,
        prompts: list[Prompt] | None = None,
        validator: Validator | None = None,
        logger: MetricLogger | None = None,
    ):
        self.p = params
        self.out = Path(out_dir)
        self.env: DistEnv = init_distributed(params.parallel)
        if params.optim.num_threads:
            torch.set_num_threads(params.optim.num_threads)
        d = params.distill
        if d.prompts_per_step % self.env.world_size:
            raise ConfigError(
                f"distill.prompts_per_step={d.prompts_per_step} must be divisible by the world size "
                f"{self.env.world_size} (parallel.nproc_per_node x nnodes)"
            )
        # Rollout sampling draws from the global RNG; each rank gets its own stream, restored on resume.
        _seed_everything(d.seed * 1000 + self.env.rank)
        m = params.models
        self.tokenizer_dir = Path(m.tokenizer or m.student.path)
        self.tokenizer = load_tokenizer(self.tokenizer_dir, m)
        teacher_tok = load_tokenizer(m.teacher.path, m) if has_tokenizer(m.teacher.path) else self.tokenizer
        self.student = load_model(m.student, m, role="student", trainable=True).to(self.env.device)
        if params.rollout.engine == "vllm":  # pre-flight: a missing vLLM is one clear error before any work
            from trainer.rollout_vllm import require_vllm

            require_vllm(self.student.config, self.env.device.type)
        # teacher.placement ray: the ranks never load the teacher's weights; its config (meta device) serves the
        # pair check, and the replicas load the weights once each (trainer/teacher_pool.py).
        remote = params.teacher.placement == "ray"
        self.teacher = (
            meta_model(m.teacher.path, m)
            if remote
            else load_model(m.teacher, m, role="teacher", trainable=False).to(self.env.device)
        )
        self.plan = check_compatibility(
            self.student, self.teacher, self.tokenizer, teacher_tok, d.rep,
            uses_hidden_states=method_spec(d.method).hidden_states,
        )  # fmt: skip
        # OPRD-Bridge: the bank comes from the bridge stage's artifact (the same file on every rank).
        self.bank = (
            load_checked_bank(params, self.plan, self.student, self.teacher, self.env)
            if method_spec(d.method).bridge
            else None
        )
        if prompts is None:
            if not params.task.prompts_file:
                raise ConfigError(
                    "no training prompts: set task.prompts_file (json/jsonl/parquet with a prompt column)"
                )
            prompts = load_prompts(params.task.prompts_file)
        self.prompt_ids = fit_prompts(encode_prompts(self.tokenizer, prompts), self.student, params)
        self.sampler = PromptSampler(len(self.prompt_ids), d.seed)
        if params.optim.activation_checkpointing:
            enable_activation_checkpointing(self.student)
        shard_model(self.student, self.env, bf16=params.optim.bf16)
        self.pool: TeacherPool | None = None
        if remote:
            self.pool = TeacherPool(
                params.teacher, m, teacher_identity(m.teacher.path, self.teacher),
                rank=self.env.rank, world_size=self.env.world_size, device=self.env.device,
            )  # fmt: skip
        else:
            shard_model(self.teacher, self.env, bf16=params.optim.bf16)
        self.fsdp_mixed_precision = uses_fsdp_mixed_precision(self.env, params.optim.bf16)
        # What the optimizer and the checkpoints hold: the student, plus the bridge projectors when trained jointly.
        self.trained: nn.Module = self.student
        if self.bank is not None and d.bridge.train_projector:
            self.trained = nn.ModuleDict({"student": self.student, "bridge": self.bank.projectors})
        self.optimizer = build_optimizer(self.trained, params.optim)
        self.scheduler = build_scheduler(self.optimizer, d.steps, params.optim)
        # Chunked full-vocab KL reads the LM-head weight outside forward, which FSDP2 keeps sharded.
        self.objective = (
            BridgeObjective(d, self.plan, self.bank)
            if self.bank is not None
            else Objective(d, self.plan, monitor_cosine=d.monitor_cosine, chunked_kl=not self.env.distributed)
        )
        gen = self.student.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # vLLM: one engine per rank, started from the (gathered) student weights; synced after every step.
        self.engine = build_engine(
            params.rollout,
            self.student,
            pad_token_id=pad,
            eos_token_id=eos,
            seed=d.seed * 1000 + self.env.rank,
        )
        self.ckpt = Checkpointer(params.checkpoint, self.env)
        # The best-so-far export lives with the checkpoints: it is part of the resumable state.
        self.best_dir = Path(params.checkpoint.dir) / "best"
        self.validator = validator
        self._last_grad_norm = float("nan")
        self.logger = logger if logger is not None else NullLogger()

    # ------------------------------------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``distill.steps`` (resuming from the newest complete checkpoint). ``stop_after`` ends this
        process early after that many steps, as a preemption would (tests use it)."""
        d, ck = self.p.distill, self.p.checkpoint
        state = (
            self.ckpt.load_latest(self.trained, self.optimizer, self.scheduler) if ck.resume else None
        ) or TrainState()
        start = state.step
        if start and self.env.is_main:
            print(f"resumed from the step {start} checkpoint under {ck.dir}", file=sys.stderr)
        if start:  # resumed: the engine still holds the weights the student was loaded with
            self.engine.load_weights(self.student)
        if self.env.is_main:
            # A resumed run re-emits the restored steps, so every sink (a fresh JSONL, a new MLflow run) holds
            # each step exactly once.
            for row in state.history:
                self.logger.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
        bar = tqdm(
            total=d.steps,
            initial=start,
            desc=f"distill[{d.method}]",
            disable=not self.env.is_main,
            file=sys.stderr,
        )
        while state.step < d.steps and (stop_after is None or state.step - start < stop_after):
            metrics = self.train_step(state)
            state.step += 1
            # Provenance of the row, kept with it through checkpoints: which start this process made and how many
            # steps it had computed, so a resumed run shows that it began at the checkpoint and recomputed nothing.
            metrics["run/resumed_from"] = float(start)
            metrics["run/steps_this_process"] = float(state.step - start)
            if d.eval_every and (state.step % d.eval_every == 0 or state.step == d.steps):
                metrics.update(self.validate(state))
            state.history.append({"step": state.step, **metrics})
            if self.env.is_main:
                self.logger.log_metrics(metrics, state.step)
            if (ck.every and state.step % ck.every == 0) or state.step == d.steps:
                self.ckpt.save(state.step, self.trained, self.optimizer, self.scheduler, state)
            bar.set_postfix(_bar_fields(state.history), refresh=False)  # loss, cosine, latest val accuracy
            bar.update(1)
        bar.close()
        export = self.export_final(state) if state.step >= d.steps else None
        return TrainResult(
            state.step, export, state.best_step, state.best_score, state.history,
            resumed_from=start, steps_computed=state.step - start,
        )  # fmt: skip

    def train_step(self, state: TrainState) -> dict[str, float]:
        d, r, env = self.p.distill, self.p.rollout, self.env
        t0 = time.perf_counter()
        idx, state.epoch, state.cursor = self.sampler.take(state.epoch, state.cursor, d.prompts_per_step)
        per_rank = d.prompts_per_step // env.world_size
        mine = idx[env.rank * per_rank : (env.rank + 1) * per_rank]
        prompts = [self.prompt_ids[i] for i in mine]
        sent = dict(self.pool.stats) if self.pool is not None else {}
        stream = self._teacher_stream(prompts)
        batch = self.engine.generate(
            self.student, prompts, n=d.n_responses, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, synced_gpus=env.distributed,
            on_progress=stream.progress if stream is not None else None,
        ).to(env.device)  # fmt: skip
        self.engine.release_memory()  # CUDA vLLM: free the KV cache for the update
        pending, send_s = None, 0.0
        if stream is not None:  # teacher requests went out as micro-batches settled; the rest goes now
            micro, pending = stream.finish(batch)
            micro, pending, splits = stream.resplit(micro, pending, self._micro_count(micro))
            send_s = stream.submit_seconds
        else:
            micro = micro_batches(batch, d.micro_batch_tokens)
            micro, origin = split_to(micro, self._micro_count(micro))
            splits = origin.count(None)
            if self.pool is not None:  # this rank's teacher work goes out now
                pending, send_s = submit_teacher_requests(
                    self.objective, self.student, self.pool, micro, autocast=self._autocast
                )
        t_rollout = time.perf_counter()
        local = self.objective.denominators(batch)
        den = Denominators(
            *(all_reduce_sum(x.to(env.device)) for x in (local.selected, local.response, local.sequences))
        )
        measure = self.p.distill.memory_every and (state.step % self.p.distill.memory_every == 0)
        # The measured region is the whole update: per micro-batch the no-grad passes (teacher, old log-probs),
        # the student forward and backward, then the optimizer step. (The reference's ∆peak excludes its teacher,
        # which runs on other workers; here the teacher shares the device, one micro-batch at a time.)
        with PeakMemory("auto", device=env.device) if measure else nullcontext() as mem:
            # Each micro-batch's loss is already normalized by the global count; FSDP2 averages gradients over
            # ranks, so scale by the world size to get the gradient of the global loss.
            try:
                upd = accumulate_update(
                    self.objective, self.student, self.pool or self.teacher, micro, den,
                    loss_scale=env.world_size, autocast=self._autocast, pending=pending,
                )  # fmt: skip
            except BaseException:
                # A teacher (or any) failure mid-step: drop the partial gradients; the weights were not stepped.
                self.optimizer.zero_grad(set_to_none=True)
                raise
            self._checked_step(upd.loss.to(env.device))
        t_update = time.perf_counter()
        self.engine.load_weights(self.student)  # on-policy: the next rollout samples from the new weights
        t_end = time.perf_counter()
        out = self._reduce_metrics(upd.metrics)
        lengths = batch.response_lengths.float()
        n_tok = all_reduce_sum(lengths.sum())
        out |= {
            "response/length_mean": (
                n_tok / all_reduce_sum(torch.tensor(float(lengths.numel()), device=env.device))
            ).item(),
            "response/length_max": all_reduce_max(lengths.max()).item(),
            "perf/step_seconds": t_end - t0,
            "perf/rollout_seconds": t_rollout - t0 - send_s,
            "perf/teacher_seconds": upd.prepare_seconds + send_s,
            "perf/update_seconds": t_update - t_rollout - upd.prepare_seconds,
            "perf/sync_seconds": t_end - t_update,
            "perf/micro_batches": all_reduce_max(
                torch.tensor(float(upd.micro_batches), device=env.device)
            ).item(),
            # halves made so that every rank runs as many micro-batches as the one with the most (summed over ranks)
            "perf/micro_batch_splits": all_reduce_sum(torch.tensor(float(splits), device=env.device)).item(),
            "perf/tokens_per_second": n_tok.item() / (t_end - t0),
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/grad_norm": self._last_grad_norm,
        }
        if self.pool is not None:
            out |= self._payload_metrics(sent, den, stream.submitted_early if stream is not None else 0)
        if hasattr(self.engine, "syncs"):  # vLLM: weight syncs so far (one per step, +1 after a resume)
            out["rollout/weight_syncs"] = float(self.engine.syncs)
        if measure and mem.peak_bytes is not None:
            out["mem/actor_update_delta_peak_GiB"] = mem.peak_bytes / 2**30
        return out

    # ------------------------------------------------------------------------------------------ pieces
    def _micro_count(self, micro: list[RolloutBatch]) -> int:
        """How many micro-batches every rank runs this step: the most any rank packed (all-reduce MAX under FSDP2,
        where each forward/backward is a collective, so a rank with fewer splits up to it: :func:`split_to`)."""
        if not self.env.distributed:
            return len(micro)
        return int(all_reduce_max(torch.tensor(float(len(micro)), device=self.env.device)).item())

    def _teacher_stream(self, prompts: list[list[int]]) -> MicroBatchStream | None:
        """With a teacher pool: a stream that sends each micro-batch's teacher request the moment the rollout has
        finished all of its rows (vLLM finishes short rows first), so the pool works while the engine samples.

        Not with FSDP over several ranks when the method runs a student pass before its request (top-k ids,
        old log-probs): that pass all-gathers, and ranks must not enter it from inside their own rollout loops."""
        if self.pool is None or (self.env.distributed and self.objective.spec.old_logprobs):
            return None
        return teacher_request_stream(
            self.objective, self.student, self.pool, prompts, self.p.distill.n_responses,
            pad_token_id=self.engine.pad_token_id, eos_token_id=self.engine.eos_token_id,
            max_tokens=self.p.distill.micro_batch_tokens, autocast=self._autocast, device=self.env.device,
        )  # fmt: skip

    def _autocast(self):
        # Under FSDP2 mixed precision the parameters are already bf16 in forward (see shard_model).
        if not self.p.optim.bf16 or self.fsdp_mixed_precision:
            return nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)

    def _checked_step(self, loss: torch.Tensor) -> None:
        """Clip, agree across ranks that loss and grad norm are finite, then step; else raise before stepping."""
        clip = self.p.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), clip if clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        bad = torch.tensor(
            [0.0 if (torch.isfinite(loss) and torch.isfinite(norm)) else 1.0], device=self.env.device
        )
        if all_reduce_max(bad).item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) or grad norm ({norm.item()}) on at least one rank; stopped before "
                "optimizer.step, weights and the last checkpoint are untouched. Lower optim.lr, check the teacher's "
                "outputs, or enable distill.rep.normalize."
            )
        self._last_grad_norm = norm.item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _payload_metrics(self, before: dict[str, float], den: Denominators, early: int) -> dict[str, float]:
        """This step's teacher traffic summed over ranks (bytes, requests; ``early``: this rank's requests sent
        while its rollout was still sampling), and the reference's layout for the same selection (fp32 states at
        every selected position, all planned layers) for comparison."""
        keys = ("reply_bytes", "request_bytes", "requests", "retries")
        delta = torch.tensor(
            [*(self.pool.stats[k] - before[k] for k in keys), early],
            dtype=torch.float64,
            device=self.env.device,
        )
        total = all_reduce_sum(delta)
        out = {f"teacher/{k}": total[i].item() for i, k in enumerate(keys)}
        out["teacher/requests_during_rollout"] = total[len(keys)].item()
        if self.objective.capture_states:
            out["teacher/reference_bytes"] = float(
                reference_nbytes(
                    int(den.selected.item()), len(self.plan.teacher), self.teacher.config.hidden_size
                )
            )
        return out

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every objective metric (loss terms, per-layer cosines) is this rank's share normalized by the step's
        global count, so the global value is the plain sum over ranks (token-weighted, like the loss)."""
        keys = sorted(metrics)
        # On the device: NCCL reduces CUDA tensors only.
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.env.device)
        total = all_reduce_sum(vals)
        out = {k: total[i].item() for i, k in enumerate(keys)}
        cos = [v for k, v in out.items() if k.startswith("rep/cosine/layer_")]
        if cos:
            out["rep/cosine/mean"] = sum(cos) / len(cos)
        return out

    def validate(self, state: TrainState) -> dict[str, float]:
        if self.validator is None:
            return {}
        result = self.validator(self.student, state.step)
        score = result.get("val/accuracy", float("nan"))
        if self.p.distill.select_best and math.isfinite(score) and score > state.best_score:
            state.best_score, state.best_step = score, state.step
            self.export(self.best_dir, extra={"step": state.step, "val_accuracy": score})
        return result

    def export(self, directory: Path, extra: dict | None = None) -> Path:
        """Write the student as a Hugging Face safetensors directory + tokenizer + sha256 manifest (rank 0)."""
        sd = get_model_state_dict(
            self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.env.is_main:
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            plain = AutoModelForCausalLM.from_config(self.student.config)
            plain.load_state_dict(sd, strict=True)
            plain.generation_config = self.student.generation_config
            plain.save_pretrained(tmp, safe_serialization=True)
            if not copy_tokenizer_files(self.tokenizer_dir, tmp):
                self.tokenizer.save_pretrained(tmp)
            (tmp / "oprd_export.json").write_text(
                json.dumps({"method": self.p.distill.method, **(extra or {})}, indent=2)
            )
            write_manifest(tmp)
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
        self.env.barrier()
        return directory

    def export_final(self, state: TrainState) -> Path:
        final = self.out / "student"
        best = self.best_dir
        if self.p.distill.select_best and state.best_step > 0 and best.is_dir():
            if self.env.is_main:
                shutil.rmtree(final, ignore_errors=True)
                shutil.copytree(best, final)
            self.env.barrier()
            return final
        return self.export(final, extra={"step": state.step})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.engine.close()
        self.logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def prompt_budget(model: nn.Module, max_new_tokens: int) -> int | None:
    """Longest prompt (tokens) that leaves ``max_new_tokens`` inside the model's ``max_position_embeddings``."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return None if max_pos is None else max_pos - max_new_tokens


def fit_prompts(prompt_ids: list[list[int]], model: nn.Module, params: Params) -> list[list[int]]:
    """The prompts whose rollout fits the model's context; the others are dropped with a warning on stderr.

    Raises:
        ConfigError: no prompt fits (``rollout.max_new_tokens`` too large for the model).
    """
    budget = prompt_budget(model, params.rollout.max_new_tokens)
    keep, dropped = drop_overlong(prompt_ids, budget)
    if not keep:
        raise ConfigError(
            f"no training prompt fits: every prompt is longer than {budget} tokens (max_position_embeddings "
            f"{model.config.max_position_embeddings} - rollout.max_new_tokens {params.rollout.max_new_tokens})"
        )
    if dropped:
        print(
            f"warning: {dropped} of {len(prompt_ids)} training prompts are longer than {budget} tokens "
            f"(max_position_embeddings - rollout.max_new_tokens) and are left out",
            file=sys.stderr,
        )
    return [prompt_ids[i] for i in keep]


def load_checked_bank(params: Params, plan, student: nn.Module, teacher: nn.Module, env: DistEnv):
    """The OPRD-Bridge bank of ``distill.bridge.bank``, checked against this pair and plan (pre-flight), on
    ``env.device``; projectors frozen unless ``distill.bridge.train_projector``.

    A trained projector is a replicated, non-FSDP module: under ``torchrun`` its gradients would not be
    synchronized (the reference's bug, oprd-method.md §9 item 9), so that combination is refused.
    """
    b = params.distill.bridge
    if b.train_projector and env.distributed:
        raise ConfigError(
            "distill.bridge.train_projector: true is single-process only (the projectors are not FSDP-sharded, so "
            "their gradients would differ per rank); keep it false (the paper's setting) under torchrun"
        )
    bank = load_bank(b.bank)
    m = params.models
    check_bank(
        bank, plan.student, plan.teacher, student.config.hidden_size, teacher.config.hidden_size,
        min_val_cosine=b.min_val_cosine,
        sources={"teacher": _manifest_sha(m.teacher.path), "student": _manifest_sha(m.student.path)},
    )  # fmt: skip
    bank.requires_grad_(False)
    if b.train_projector:
        bank.projectors.requires_grad_(True)
    return bank.to(env.device)


def _manifest_sha(path: str) -> str | None:
    f = Path(path) / "manifest.json"
    try:
        return str(json.loads(f.read_text())["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="On-policy distillation (OPRD / OPD baselines).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="artifacts/distill")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="end this process after N steps (preemption)"
    )
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        if params.parallel.launcher == "ray" and not in_ray_worker():
            return _ray_driver(params, args, sys.argv[1:] if argv is None else list(argv))
        trainer = Trainer(params, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.env.is_main:
        jsonl = JsonlLogger(Path(args.out) / "metrics.jsonl")  # fit() re-emits restored steps on resume
        trainer.logger = LoggerGroup(jsonl, ConsoleLogger())
    try:
        trainer.fit(stop_after=args.stop_after)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    return 0


def _ray_driver(params: Params, args: argparse.Namespace, argv: list[str]) -> int:
    """``parallel.launcher: ray``: run this same ``main`` on every worker of a Ray Train job (trainer.ray_job)."""
    from trainer.ray_job import RayJobError, run_ray_job

    if args.stop_after is not None:
        raise ConfigError("--stop-after is for single-process and torchrun runs, not parallel.launcher: ray")
    try:
        job = run_ray_job(
            params.parallel, "trainer.train:main", [argv], job_dir=Path(args.out), teacher=params.teacher
        )
    except RayJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(job.tags()), file=sys.stderr)
    return 0


def _bar_fields(history: list[dict]) -> dict[str, str]:
    """Progress-bar postfix: this step's loss and mean cosine, and the latest validation accuracy so far."""
    last = history[-1] if history else {}
    val = next((h["val/accuracy"] for h in reversed(history) if "val/accuracy" in h), None)
    fields = {"loss": last.get("loss/total"), "cos": last.get("rep/cosine/mean"), "val": val}
    return {k: f"{v:.4g}" for k, v in fields.items() if v is not None}


if __name__ == "__main__":
    sys.exit(main())
