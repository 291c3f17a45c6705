"""FSDP2 under torchrun (gloo, CPU): 2 processes match 1 process on the same global batch, and a kill -9
mid-run resumes from the newest complete checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trainer.checkpoint import complete_checkpoints

# Greedy rollouts make the global batch independent of how prompts are split over ranks.
TOLERANCE = dict(rel=2e-4, abs=1e-6)


def _args(pair, tmp: Path, steps=4, every=2, extra=()):
    sets = {
        "models.teacher.path": pair["teacher"], "models.student.path": pair["student"], "models.embedded": False,
        "task.prompts_file": pair["prompts"], "rollout.max_new_tokens": 8, "rollout.temperature": 0,
        "distill.steps": steps, "distill.prompts_per_step": 4, "distill.n_responses": 1, "distill.eval_every": 0,
        "distill.memory_every": 0, "optim.lr": 3e-3, "optim.num_threads": 1, "checkpoint.dir": tmp / "ckpt",
        "checkpoint.every": every,
    }  # fmt: skip
    empty = tmp / "params.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    empty.write_text("{}\n")
    out = ["--params", str(empty), "--out", str(tmp / "out")]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out + list(extra)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _column(tmp: Path, key: str) -> list[float]:
    rows = [json.loads(r) for r in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows]


def _losses(tmp: Path) -> list[float]:
    return _column(tmp, "loss/total")


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "trainer.train",
    ]


@pytest.mark.slow
def test_two_process_fsdp2_matches_single_process(tiny_pair, tmp_path):
    one = subprocess.run([sys.executable, "-m", "trainer.train", *_args(tiny_pair, tmp_path / "one")],
                         env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*_torchrun(2), *_args(tiny_pair, tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, **TOLERANCE)
    cos = _column(tmp_path / "two", "rep/cosine/mean")
    assert l2[-1] < l2[0] and cos[-1] > cos[0]  # the 2-process run learns: loss falls, cosine rises
    assert (tmp_path / "two" / "out" / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_kill_9_mid_run_resumes_from_newest_complete_checkpoint(tiny_pair, tmp_path):
    args = _args(tiny_pair, tmp_path, steps=40, every=1)
    proc = subprocess.Popen([*_torchrun(2), *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    # keep_last=2 retains at most two checkpoints, so wait for the *newest step*, not for a count
    while (
        time.time() < deadline
        and max((st for st, _ in complete_checkpoints(tmp_path / "ckpt")), default=0) < 3
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the kill; nothing was interrupted"
    # SIGKILL the launcher and both ranks at once, wherever they are (mid-step or mid-save). The ranks may
    # run in their own process groups, so walk the tree rather than killing one group.
    victims = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_proc, victims) if p is not None], timeout=30)
    done = complete_checkpoints(tmp_path / "ckpt")
    assert done, "no checkpoint was completed before the kill"
    newest = done[-1][0]
    resumed = subprocess.run([*_torchrun(2), *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 41)), "each step logged exactly once after the resume"
    assert newest >= 1 and not list((tmp_path / "ckpt").glob("*.tmp"))
