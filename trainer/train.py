"""The on-policy distillation loop (OPRD and the OPD baselines), single-process or under ``torchrun`` + FSDP2.

One step, as in the paper's Algorithm / oprd-method.md §1.1:

1. take the next ``prompts_per_step`` prompts (each rank its slice);
2. the **current student** samples ``n_responses`` per prompt (on-policy rollout);
3. no-grad passes on the same token ids: the teacher (selected hidden states, or log-probs for OPD) and, for
   output-space methods only, the student's old-log-prob / top-k pass;
4. one student forward with grad, the loss normalized by the **global** count of selected tokens, backward,
   finite check (all ranks agree) *before* ``optimizer.step``, clip, step.

Usage::

    python -m trainer.train --params params.yaml --out artifacts/distill
    torchrun --nproc_per_node 2 -m trainer.train --params params.yaml --out artifacts/distill
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

from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import ConfigError, Params, load_params
from trainer.data import PromptSampler, encode_prompts, load_prompts
from trainer.distributed import DistEnv, all_reduce_max, all_reduce_sum, init_distributed, shard_model
from trainer.export import write_manifest
from trainer.memory import PeakMemory
from trainer.metrics import ConsoleLogger, JsonlLogger, LoggerGroup, MetricLogger, NullLogger
from trainer.models import check_compatibility, load_model, load_tokenizer
from trainer.objectives import Denominators, Objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.rollout import build_engine

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "main"]

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


class Trainer:
    """Wires config, models, data, sharding, optimizer, objective, checkpoints and logging for :meth:`fit`."""

    def __init__(
        self,
        params: Params,
        out_dir: str | Path,
        *,
        prompts: list[str] | None = None,
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
        self.tokenizer = load_tokenizer(m.tokenizer or m.student.path, m)
        teacher_tok = load_tokenizer(m.teacher.path, m) if _has_tokenizer(m.teacher.path) else self.tokenizer
        self.student = load_model(m.student, m, role="student", trainable=True).to(self.env.device)
        if params.rollout.engine == "vllm":  # pre-flight: a missing vLLM is one clear error before any work
            from trainer.rollout_vllm import require_vllm

            require_vllm(self.student.config, self.env.device.type)
        self.teacher = load_model(m.teacher, m, role="teacher", trainable=False).to(self.env.device)
        self.plan = check_compatibility(
            self.student, self.teacher, self.tokenizer, teacher_tok, d.rep,
            uses_hidden_states=d.method in ("oprd", "combined"),
        )  # fmt: skip
        if prompts is None:
            if not params.task.prompts_file:
                raise ConfigError(
                    "no training prompts: set task.prompts_file (json/jsonl/parquet with a prompt column)"
                )
            prompts = load_prompts(params.task.prompts_file)
        self.prompt_ids = encode_prompts(self.tokenizer, prompts)
        self.sampler = PromptSampler(len(self.prompt_ids), d.seed)
        shard_model(self.student, self.env)
        shard_model(self.teacher, self.env)
        self.optimizer = build_optimizer(self.student, params.optim)
        self.scheduler = build_scheduler(self.optimizer, d.steps, params.optim)
        # Chunked full-vocab KL reads the LM-head weight outside forward, which FSDP2 keeps sharded.
        self.objective = Objective(d, self.plan, chunked_kl=not self.env.distributed)
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
            self.ckpt.load_latest(self.student, self.optimizer, self.scheduler) if ck.resume else None
        ) or TrainState()
        start = state.step
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
            if d.eval_every and (state.step % d.eval_every == 0 or state.step == d.steps):
                metrics.update(self.validate(state))
            state.history.append({"step": state.step, **metrics})
            if self.env.is_main:
                self.logger.log_metrics(metrics, state.step)
            if (ck.every and state.step % ck.every == 0) or state.step == d.steps:
                self.ckpt.save(state.step, self.student, self.optimizer, self.scheduler, state)
            bar.update(1)
        bar.close()
        export = self.export_final(state) if state.step >= d.steps else None
        return TrainResult(state.step, export, state.best_step, state.best_score, state.history)

    def train_step(self, state: TrainState) -> dict[str, float]:
        d, r, env = self.p.distill, self.p.rollout, self.env
        t0 = time.perf_counter()
        idx, state.epoch, state.cursor = self.sampler.take(state.epoch, state.cursor, d.prompts_per_step)
        per_rank = d.prompts_per_step // env.world_size
        mine = idx[env.rank * per_rank : (env.rank + 1) * per_rank]
        batch = self.engine.generate(
            self.student, [self.prompt_ids[i] for i in mine], n=d.n_responses, temperature=r.temperature,
            top_p=r.top_p, max_new_tokens=r.max_new_tokens, synced_gpus=env.distributed,
        ).to(env.device)  # fmt: skip
        self.engine.release_memory()  # CUDA vLLM: free the KV cache for the update
        t_rollout = time.perf_counter()
        targets = self.objective.prepare(self.student, self.teacher, batch)
        local = self.objective.denominators(batch, targets)
        den = Denominators(all_reduce_sum(local.selected), all_reduce_sum(local.response))
        t_teacher = time.perf_counter()
        measure = self.p.distill.memory_every and (state.step % self.p.distill.memory_every == 0)
        with PeakMemory("auto", device=env.device) if measure else nullcontext() as mem:
            with self._autocast():
                loss, metrics = self.objective.loss(self.student, batch, targets, den)
            # Each rank's loss is already normalized by the global count; FSDP2 averages gradients over
            # ranks, so scale by the world size to get the gradient of the global loss.
            (loss * env.world_size).backward()
            self._checked_step(loss)
        t_update = time.perf_counter()
        self.engine.load_weights(self.student)  # on-policy: the next rollout samples from the new weights
        t_end = time.perf_counter()
        out = self._reduce_metrics(metrics)
        lengths = batch.response_lengths.float()
        n_tok = all_reduce_sum(lengths.sum())
        out |= {
            "response/length_mean": (n_tok / all_reduce_sum(torch.tensor(float(lengths.numel())))).item(),
            "response/length_max": all_reduce_max(lengths.max()).item(),
            "perf/step_seconds": t_end - t0,
            "perf/rollout_seconds": t_rollout - t0,
            "perf/teacher_seconds": t_teacher - t_rollout,
            "perf/update_seconds": t_update - t_teacher,
            "perf/sync_seconds": t_end - t_update,
            "perf/tokens_per_second": n_tok.item() / (t_end - t0),
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/grad_norm": self._last_grad_norm,
        }
        if measure and mem.peak_bytes is not None:
            out["mem/actor_update_delta_peak_GiB"] = mem.peak_bytes / 2**30
        return out

    # ------------------------------------------------------------------------------------------ pieces
    def _autocast(self):
        if not self.p.optim.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)

    def _checked_step(self, loss: torch.Tensor) -> None:
        """Clip, agree across ranks that loss and grad norm are finite, then step; else raise before stepping."""
        clip = self.p.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip if clip > 0 else float("inf"))
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

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Loss terms are globally normalized per rank, so they sum; other metrics (cosines) average."""
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        total = all_reduce_sum(vals)
        out = {
            k: (total[i].item() if k.startswith("loss/") else total[i].item() / self.env.world_size)
            for i, k in enumerate(keys)
        }
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
        self.engine.close()
        self.logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


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


if __name__ == "__main__":
    sys.exit(main())
