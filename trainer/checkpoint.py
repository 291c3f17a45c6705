"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``checkpoint.dir``::

    step_000050/            a complete checkpoint (renamed into place only after every rank finished)
        .metadata, __*.distcp   DCP: model, optimizer, scheduler and train state (sharded under FSDP2)
        rng_rank{r}.pt          per-rank RNG states (tensors only; loaded with weights_only=True)
        COMPLETE                written last, by rank 0: {"step": 50, "world_size": 2}
    step_000100.tmp/        a save in progress (or killed): never loaded, removed at the next start

Completion is therefore "directory without ``.tmp`` and with ``COMPLETE``". A ``kill -9`` at any moment leaves
either the previous complete checkpoint or a ``.tmp`` directory that is ignored. Retention keeps the newest
``keep_last`` complete checkpoints and never deletes the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.config import CheckpointConfig
from trainer.distributed import DistEnv

__all__ = ["Checkpointer", "TrainState", "complete_checkpoints"]

_MARKER = "COMPLETE"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    """Position in the current epoch's prompt permutation (global, world-size independent)."""
    best_score: float = float("-inf")
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> TrainState:
        return cls(**json.loads(s))


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if (
            p.is_dir()
            and p.name.startswith("step_")
            and not p.name.endswith(".tmp")
            and (p / _MARKER).is_file()
        ):
            try:
                out.append((int(p.name.split("_", 1)[1]), p))
            except ValueError:
                continue
    return sorted(out)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(_flatten_py_rng(random.getstate()), dtype=torch.int64),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _flatten_py_rng(state: tuple) -> list[int]:
    version, internal, gauss = state
    assert version == 3 and gauss is None, "python RNG state with a cached gauss value is not supported"
    return list(internal)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Save / restore model, optimizer, scheduler, train state and RNG with DCP; all ranks call every method."""

    def __init__(self, cfg: CheckpointConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.root = Path(cfg.dir)

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "scheduler": scheduler.state_dict(),
        }

    def clean_partial(self) -> None:
        """Remove ``*.tmp`` directories left by a killed save (rank 0 only)."""
        if self.env.is_main and self.root.is_dir():
            for p in self.root.glob("step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.env.barrier()

    def save(self, step: int, model: nn.Module, optimizer, scheduler, state: TrainState) -> Path:
        final = _step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.env.barrier()
        sd = self._state(model, optimizer, scheduler)
        sd["train"] = {"json": state.to_json()}
        dcp.save(sd, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{self.env.rank}.pt")
        self.env.barrier()
        if self.env.is_main:
            marker = tmp / _MARKER
            marker.write_text(json.dumps({"step": step, "world_size": self.env.world_size}))
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after resume): replace atomically enough
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._retain()
        self.env.barrier()
        return final

    def _retain(self) -> None:
        done = complete_checkpoints(self.root)
        for _, path in done[: max(0, len(done) - self.cfg.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load_latest(self, model: nn.Module, optimizer, scheduler) -> TrainState | None:
        """Restore the newest complete checkpoint; ``None`` when there is none (fresh start)."""
        self.clean_partial()
        done = complete_checkpoints(self.root)
        if not done:
            return None
        step, path = done[-1]
        meta = json.loads((path / _MARKER).read_text())
        if meta["world_size"] != self.env.world_size and not (path / f"rng_rank{self.env.rank}.pt").exists():
            raise RuntimeError(
                f"{path} was written by {meta['world_size']} ranks and has no RNG state for rank {self.env.rank}; "
                "resume with the same parallel.nproc_per_node x nnodes"
            )
        sd = self._state(model, optimizer, scheduler)
        sd["train"] = {"json": ""}
        dcp.load(sd, checkpoint_id=str(path))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, optimizer, sd["optim"])
        scheduler.load_state_dict(sd["scheduler"])
        _set_rng_state(torch.load(path / f"rng_rank{self.env.rank}.pt", weights_only=True))
        state = TrainState.from_json(sd["train"]["json"])
        assert state.step == step, f"checkpoint {path} holds step {state.step}"
        return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
