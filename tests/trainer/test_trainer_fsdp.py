"""FSDP2 under torchrun (gloo, CPU): 2 processes match 1 process on the same global batch, and a kill -9
mid-run resumes from the newest complete checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_pair import assert_resumed

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


def _kill_mid_run(args: list[str], ckpt: Path) -> int:
    """Start a 2-process run, SIGKILL it (launcher and ranks) once step 3 is checkpointed; the newest step."""
    proc = subprocess.Popen([*_torchrun(2), *args], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    # keep_last=2 retains at most two checkpoints, so wait for the *newest step*, not for a count
    while time.time() < deadline and max((st for st, _ in complete_checkpoints(ckpt)), default=0) < 3:
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
    done = complete_checkpoints(ckpt)
    assert done, "no checkpoint was completed before the kill"
    return done[-1][0]


def _rows(tmp: Path) -> list[dict]:
    return [json.loads(r) for r in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_mid_run_resumes_from_newest_complete_checkpoint(tiny_pair, tmp_path):
    args = _args(tiny_pair, tmp_path, steps=40, every=1)
    newest = _kill_mid_run(args, tmp_path / "ckpt")
    # the broken twin (test of the test below) starts from the very same killed state
    shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "-broken"))
    resumed = subprocess.run([*_torchrun(2), *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from the step {newest} checkpoint" in resumed.stderr
    assert_resumed(_rows(tmp_path), newest, 40)  # began at the checkpoint, recomputed no earlier step
    assert not list((tmp_path / "ckpt").glob("*.tmp"))

    # Test of the test: the same killed state, resumed by a run that ignores its checkpoints
    # (checkpoint.resume=false restarts at step 0; deterministic, so losses and weights come out the same).
    broken_tmp = tmp_path.with_name(tmp_path.name + "-broken")
    broken_args = _args(tiny_pair, broken_tmp, steps=40, every=1, extra=["--set", "checkpoint.resume=false"])
    broken = subprocess.run(
        [*_torchrun(2), *broken_args], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert broken.returncode == 0, broken.stderr[-3000:]
    assert [r["step"] for r in _rows(broken_tmp)] == list(range(1, 41))  # what the old test checked
    assert _losses(broken_tmp) == pytest.approx(_losses(tmp_path), **TOLERANCE)
    with pytest.raises(AssertionError, match="not computed by a process that resumed at step"):
        assert_resumed(_rows(broken_tmp), newest, 40)
