"""The distillation as a Ray Train job (``parallel.launcher: ray``) on a two-node Ray cluster in one machine, and
the plain multi-node torchrun path (two node agents over loopback rendezvous).

Every run is the same micro distill (tiny pair, greedy rollouts, gloo on CPU, 1 thread per rank). Reference: the
2-process single-node torchrun run. The comparison is **bitwise** (``==`` on the per-step losses and the exported
safetensors bytes): each launcher ends in the same two ranks running the same ops in the same order (same
per-rank seeds, same 2-rank gloo all-reduce), only who started them differs, so any difference is a bug, not
rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_pair import assert_resumed, train_argv

from trainer.checkpoint import complete_checkpoints
from trainer.config import ConfigError, ParallelConfig, TeacherConfig
from trainer.distributed import torchrun_command
from trainer.ray_job import PLACEMENT_FILE, ray_placement
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
KILL_AFTER = 3  # the kill test kills a worker once this step's checkpoint is complete


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(pair, tmp: Path, *extra: str) -> list[str]:
    sets = {
        "models.teacher.path": pair["teacher"], "models.student.path": pair["student"], "models.embedded": False,
        "task.prompts_file": pair["prompts"], "rollout.max_new_tokens": 8, "rollout.temperature": 0,
        "distill.steps": STEPS, "distill.prompts_per_step": 4, "distill.n_responses": 1, "distill.eval_every": 0,
        "distill.memory_every": 0, "optim.lr": 3e-3, "optim.num_threads": 1, "checkpoint.dir": tmp / "ckpt",
        "checkpoint.every": 1,
    }  # fmt: skip
    return train_argv(tmp, sets) + [a for e in extra for a in ("--set", e)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}


def _rows(tmp: Path) -> list[dict]:
    return [json.loads(r) for r in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


def _losses(tmp: Path) -> list[float]:
    return [r["loss/total"] for r in _rows(tmp)]


def _weights(tmp: Path) -> bytes:
    return (tmp / "out" / "student" / "model.safetensors").read_bytes()


def _ok(proc: subprocess.CompletedProcess | subprocess.Popen, err: str) -> None:
    assert proc.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory) -> Path:
    """The 2-process single-node torchrun run every other launcher must reproduce."""
    tmp = tmp_path_factory.mktemp("torchrun2")
    cmd = [*torchrun_command(ParallelConfig(nproc_per_node=2), "trainer.train"), *_args(tiny_pair, tmp)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    _ok(out, out.stderr)
    assert len(_losses(tmp)) == STEPS
    return tmp


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this host, 1 CPU each: a 2-worker job (1 CPU per worker) must use both nodes."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _ray_cmd(pair, tmp: Path, address: str) -> list[str]:
    ray = ("parallel.launcher=ray", f"parallel.ray_address={address}", "parallel.nproc_per_node=2")
    return [sys.executable, "-m", "trainer.train", *_args(pair, tmp, *ray)]


def _job_tags(stderr: str) -> dict[str, str]:
    """The tags line the driver prints last (``RayJobResult.tags``)."""
    line = next(ln for ln in reversed(stderr.splitlines()) if ln.startswith('{"oprd.parallel.launcher"'))
    return json.loads(line)


def _attempts(tmp: Path) -> list[dict]:
    path = tmp / "out" / PLACEMENT_FILE
    return json.loads(path.read_text()) if path.is_file() else []


@pytest.mark.slow
def test_ray_job_on_two_nodes_matches_torchrun(tiny_pair, reference, cluster, tmp_path):
    out = subprocess.run(_ray_cmd(tiny_pair, tmp_path, cluster.address), env=_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    _ok(out, out.stderr)
    assert _losses(tmp_path) == _losses(reference)  # bitwise, see the module docstring
    assert _weights(tmp_path) == _weights(reference)
    tags = _job_tags(out.stderr)
    assert tags["oprd.parallel.launcher"] == "ray" and tags["oprd.parallel.backend"] == "gloo"
    assert (tags["oprd.ray.cluster_nodes"], tags["oprd.ray.nodes"], tags["oprd.ray.workers"]) == (
        "2",
        "2",
        "2",
    )
    (attempt,) = _attempts(tmp_path)
    assert sorted(w["rank"] for w in attempt["workers"]) == [0, 1]
    assert len({w["node_id"] for w in attempt["workers"]}) == 2  # one worker on each Ray node
    assert [r["run/resumed_from"] for r in _rows(tmp_path)] == [0] * STEPS


@pytest.mark.slow
def test_killed_ray_worker_restarts_the_group_and_resumes_from_dcp(tiny_pair, reference, cluster, tmp_path):
    proc = subprocess.Popen(_ray_cmd(tiny_pair, tmp_path, cluster.address), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (
            not _attempts(tmp_path)
            or max((s for s, _ in complete_checkpoints(tmp_path / "ckpt")), default=0) < KILL_AFTER
        ):
            assert proc.poll() is None, "the job ended before the kill"
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the kill; nothing was interrupted"
        victim = next(w for w in _attempts(tmp_path)[0]["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)  # rank 1's Ray Train worker process, from outside the job
        _, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    _ok(proc, err)
    _, second = _attempts(tmp_path)  # Ray Train started the worker group a second time
    assert victim["pid"] not in {w["pid"] for w in second["workers"]}
    assert _job_tags(err)["oprd.ray.attempts"] == "2"
    rows = _rows(tmp_path)
    resumed_at = int(rows[-1]["run/resumed_from"])
    assert resumed_at >= KILL_AFTER, rows[-1]
    assert f"resumed from the step {resumed_at} checkpoint" in err
    assert_resumed(rows, resumed_at, STEPS)  # the restarted group began at the checkpoint, recomputed nothing
    assert _losses(tmp_path) == _losses(reference)  # and ends where the uninterrupted run ends, bitwise
    assert _weights(tmp_path) == _weights(reference)


@pytest.mark.slow
def test_torchrun_two_node_agents_over_loopback_match_single_node(tiny_pair, reference, tmp_path):
    cfg = ParallelConfig(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}")
    cmd = [*torchrun_command(cfg, "trainer.train"), *_args(tiny_pair, tmp_path)]
    assert "--nnodes=2" in cmd and "--rdzv_backend=c10d" in cmd
    agents = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    try:
        errs = [a.communicate(timeout=300)[1] for a in agents]
    finally:
        for a in agents:
            with contextlib.suppress(ProcessLookupError):
                a.kill()
    for a, err in zip(agents, errs, strict=True):
        _ok(a, err)
    assert _losses(tmp_path) == _losses(reference)
    assert _weights(tmp_path) == _weights(reference)


def test_ray_launcher_with_a_bad_address_is_one_line(tiny_pair, tmp_path, capsys):
    port = _free_port()  # nothing listens there
    for address, expect in (
        (f"127.0.0.1:{port}", "no Ray cluster answers there"),
        ("headnode", "not host:port"),
    ):
        rc = train_main(
            _args(tiny_pair, tmp_path, "parallel.launcher=ray", f"parallel.ray_address={address}")
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"error: parallel.ray_address={address}") and expect in err, err
        assert len(err.splitlines()) == 1, err


def test_ray_placement_refuses_what_the_cluster_cannot_hold():
    two = ParallelConfig(nproc_per_node=2, launcher="ray")
    p = ray_placement(two, {"CPU": 2.0})
    assert (p.num_workers, p.use_gpu, p.torch_backend, p.resources_per_worker) == (
        2,
        False,
        "gloo",
        {"CPU": 1.0},
    )
    gpu = ray_placement(two, {"CPU": 8.0, "GPU": 2.0})
    assert (gpu.use_gpu, gpu.torch_backend, gpu.resources_per_worker) == (
        True,
        "nccl",
        {"CPU": 1.0, "GPU": 1.0},
    )
    assert not ray_placement(two.model_copy(update={"backend": "gloo"}), {"CPU": 2.0, "GPU": 2.0}).use_gpu
    with pytest.raises(ConfigError, match="nccl needs GPUs"):
        ray_placement(two.model_copy(update={"backend": "nccl"}), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="2 Ray workers x 1 need 2 CPU and the Ray cluster has 1"):
        ray_placement(two, {"CPU": 1.0})
    pool = TeacherConfig(placement="ray", replicas=2, num_cpus=1.5)
    with pytest.raises(
        ConfigError, match=r"\+ 2 teacher replica\(s\) x 1.5 need 5 CPU and the Ray cluster has 4"
    ):
        ray_placement(two, {"CPU": 4.0}, pool)
    p = ray_placement(two, {"CPU": 5.0}, pool)
    assert (p.teacher_replicas, p.teacher_resources) == (2, {"CPU": 1.5})
    assert ray_placement(two, {"CPU": 2.0}, TeacherConfig()).teacher_replicas == 0  # local: in the workers


def test_oprd_ci_train_hands_a_ray_launcher_to_the_ray_driver_not_torchrun(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from oprd_ci.cli import app

    address = f"127.0.0.1:{_free_port()}"
    args = _args(tiny_pair, tmp_path, "parallel.launcher=ray", f"parallel.ray_address={address}")
    res = CliRunner().invoke(app, ["train", "--nproc-per-node", "2", *args])
    # torchrun would start two ranks that each launch a Ray job; the driver refuses the address before any work
    assert res.exit_code == 2, res.output
    assert f"error: parallel.ray_address={address}: no Ray cluster answers there" in res.output


def test_step_floor_passes_only_steps_a_restarted_sink_has_not_seen():
    from trainer.metrics import StepFloor

    class Sink:
        def __init__(self):
            self.steps: list[int] = []

        def log_metrics(self, metrics, step):
            self.steps.append(step)

        def close(self):
            pass

    sink = Sink()
    floor = StepFloor(sink, floor=3)
    for step in range(1, 7):  # a resumed trainer re-emits its restored steps 1..3 first
        floor.log_metrics({"loss/total": 1.0}, step)
    assert sink.steps == [4, 5, 6]


@pytest.mark.slow
def test_ray_job_with_the_teacher_in_a_ray_pool_matches_torchrun(tiny_pair, reference, cluster, tmp_path):
    """``parallel.launcher: ray`` + ``teacher.placement: ray``: the workers hold no teacher; rank 0 starts one
    replica in the job's cluster, on a third node's CPU (the two workers fill the other two). The teacher pool's
    answer is bitwise the in-process teacher's (same ops, fp32, 1 thread), so the run equals the reference."""
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cmd = [*_ray_cmd(tiny_pair, tmp_path, cluster.address), "--set", "teacher.placement=ray"]
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        cluster.remove_node(node)
    _ok(out, out.stderr)
    assert _losses(tmp_path) == _losses(reference)
    assert _weights(tmp_path) == _weights(reference)
    rows = _rows(tmp_path)
    assert all(r["teacher/requests"] >= 1 and r["teacher/reply_bytes"] > 0 for r in rows)  # the pool answered
    tags = _job_tags(out.stderr)
    assert (tags["oprd.ray.cluster_nodes"], tags["oprd.ray.teacher_replicas"]) == ("3", "1")
    assert json.loads(tags["oprd.ray.teacher_resources"]) == {"CPU": 1.0}
