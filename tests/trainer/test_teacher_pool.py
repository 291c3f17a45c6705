"""``teacher.placement: ray``: the teacher pool against the in-process teacher, on a real local Ray cluster.

fp32 on CPU with greedy rollouts: a Ray replica runs the same capture code on the same weights with the same thread
count, so its targets must be *bitwise* the local ones and a short run must give identical losses and weights.
Faults are real: a replica's process is SIGKILLed while requests are queued on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from tiny_pair import tiny_params, train_argv

from trainer.checkpoint import TrainState
from trainer.config import ConfigError, ModelsConfig, ModelSource, ParallelConfig, TeacherConfig, load_params
from trainer.distributed import torchrun_command
from trainer.microbatch import micro_batches
from trainer.models import load_model
from trainer.teacher import TeacherIdentity, TeacherMismatchError, TeacherRequest, teacher_digest
from trainer.teacher_pool import TeacherPool, TeacherPoolError, wait_for_restart
from trainer.train import Trainer

ray = pytest.importorskip("ray")

CUDA = torch.cuda.is_available()
"""On a GPU machine the trainer computes on CUDA, so the replicas share the GPU (bitwise parity needs one device)."""
GPU_SHARE = {"teacher.num_gpus": 0.25} if CUDA else {}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray for the module (starting Ray costs ~10-30 s here); the pools create their actors in it."""
    # address="local": always a fresh cluster (never attach to another process's cluster on this host).
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=1 if CUDA else 0,
        include_dashboard=False,
        log_to_driver=False,
        namespace="oprd_ci_tests",
    )
    yield
    ray.shutdown()


def _params(tiny_pair, tmp, placement, **overrides):
    return tiny_params(tiny_pair, tmp, **{
        "teacher.placement": placement, "teacher.replicas": 2, "rollout.temperature": 0.0,
        "distill.micro_batch_tokens": 40,  # several micro-batches per step: several requests in flight
        "checkpoint.every": 0, "checkpoint.resume": False, **GPU_SHARE, **overrides,
    })  # fmt: skip


def _steps(trainer: Trainer, n: int) -> list[dict]:
    state, rows = TrainState(), []
    for _ in range(n):
        rows.append(trainer.train_step(state))
        state.step += 1
    return rows


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trained.state_dict().items()}


def _run(params, out, n=2):
    trainer = Trainer(params, out)
    try:
        return _steps(trainer, n), _weights(trainer)
    finally:
        trainer.close()


def _same_targets(a, b) -> None:
    for name, x in a.__dict__.items():
        y = getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f"targets.{name} differ"


def _bridge_overrides(tiny_pair, wide_teacher, tmp):
    from pipelines.stage_bridge import build_bank
    from trainer.bridge import save_bank

    o = {
        "models.teacher.path": str(wide_teacher), "distill.method": "oprd_bridge",
        "distill.bridge.bank": str(tmp / "bank"), "distill.bridge.num_prompts": 16, "distill.bridge.rank": 4,
        "distill.bridge.epochs": 5, "distill.bridge.lr": 1e-2, "distill.bridge.batch_rows": 64,
        "distill.bridge.min_val_cosine": -1.0,
    }  # fmt: skip
    save_bank(build_bank(tiny_params(tiny_pair, tmp, **o)).fit.bank, tmp / "bank")
    return o


@pytest.mark.parametrize("method", ["oprd", "opd_topk", "oprd_bridge"])
def test_ray_teacher_matches_local_bitwise(method, tiny_pair, wide_teacher, tmp_path):
    extra = {"distill.method": method, "distill.opd.top_k": 4}
    if method == "oprd_bridge":
        extra |= _bridge_overrides(tiny_pair, wide_teacher, tmp_path)
    else:
        extra["distill.rep.positions"] = "last_k"
        extra["distill.rep.k"] = 3
    local_rows, local_w = _run(_params(tiny_pair, tmp_path / "l", "local", **extra), tmp_path / "lo")

    trainer = Trainer(_params(tiny_pair, tmp_path / "r", "ray", **extra), tmp_path / "ro")
    try:
        # Targets of one rollout, micro-batch by micro-batch: the in-process module vs the pool, bitwise.
        r = trainer.p.rollout
        batch = trainer.engine.generate(
            trainer.student, trainer.prompt_ids[:2], n=2, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
        )  # fmt: skip
        teacher = load_model(trainer.p.models.teacher, trainer.p.models, role="teacher", trainable=False).to(
            trainer.env.device
        )
        micro = micro_batches(batch, trainer.p.distill.micro_batch_tokens)
        assert len(micro) > 1
        pending = [trainer.objective.submit(trainer.student, trainer.pool, mb) for mb in micro]
        for mb, p in zip(micro, pending, strict=True):
            _same_targets(trainer.objective.prepare(trainer.student, teacher, mb), p.result())
        before = trainer.pool.stats["requests"]
        ray_rows = _steps(trainer, 2)
        ray_w = _weights(trainer)
        served = [info["pid"] for info in trainer.pool.infos]
    finally:
        trainer.close()
    assert len(set(served)) == 2  # two replica processes
    assert trainer.pool.stats["requests"] - before == sum(row["teacher/requests"] for row in ray_rows)
    for lr, rr in zip(local_rows, ray_rows, strict=True):
        assert lr["loss/total"] == rr["loss/total"]
        assert rr["teacher/reply_bytes"] > 0 and rr["teacher/retries"] == 0
        assert "teacher/reply_bytes" not in lr
    assert all(torch.equal(local_w[k], ray_w[k]) for k in local_w)


def _kill_when_queued(pool: TeacherPool, replica: int, pid: int, timeout_s: float = 60.0) -> threading.Thread:
    """SIGKILL the replica's process as soon as this client has a request queued on it (mid-step)."""

    def watch():
        t0 = time.monotonic()
        while pool._inflight[replica] == 0 and time.monotonic() - t0 < timeout_s:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def test_replica_killed_mid_step_is_replaced_and_the_step_is_identical(tiny_pair, tmp_path):
    local_rows, local_w = _run(_params(tiny_pair, tmp_path / "l", "local"), tmp_path / "lo")
    trainer = Trainer(_params(tiny_pair, tmp_path / "r", "ray"), tmp_path / "ro")
    try:
        state = TrainState()
        rows = [trainer.train_step(state)]
        state.step += 1
        pid = trainer.pool.pids()[0]
        # Keep replica 0 busy so that the step's requests routed to it are certainly still queued when it dies.
        trainer.pool.actors[0].__ray_call__.remote(lambda _self: time.sleep(120))
        watcher = _kill_when_queued(trainer.pool, 0, pid)
        rows.append(trainer.train_step(state))
        watcher.join()
        w = _weights(trainer)
        # Ray restarts the replica: a fresh process that reloads the teacher.
        new_pid = wait_for_restart(trainer.pool, 0, pid)
    finally:
        trainer.close()
    assert rows[1]["teacher/retries"] >= 1
    assert new_pid != pid
    assert [r["loss/total"] for r in rows] == [r["loss/total"] for r in local_rows]
    assert all(torch.equal(local_w[k], w[k]) for k in local_w)


def test_retries_exhausted_is_a_clear_error_and_the_weights_are_untouched(tiny_pair, tmp_path):
    params = _params(tiny_pair, tmp_path, "ray", **{
        "teacher.replicas": 1, "teacher.max_restarts": 0, "teacher.max_retries": 2,
    })  # fmt: skip
    trainer = Trainer(params, tmp_path / "o")
    try:
        before = _weights(trainer)
        os.kill(trainer.pool.pids()[0], signal.SIGKILL)
        with pytest.raises(
            TeacherPoolError, match=r"failed 3 times.*max_retries=2 exhausted.*weights untouched"
        ):
            trainer.train_step(TrainState())
        assert trainer.pool.stats["retries"] == 2
        assert all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
        assert all(p.grad is None for p in trainer.trained.parameters())
    finally:
        trainer.close()


def test_pool_refuses_another_teacher_and_a_foreign_layer_plan(tiny_pair):
    models = ModelsConfig(teacher=ModelSource(path=str(tiny_pair["teacher"])))
    good = TeacherIdentity(teacher_digest(tiny_pair["teacher"]), num_layers=2, hidden_size=32)
    cfg = TeacherConfig(placement="ray", replicas=1, num_gpus=0.25 if CUDA else 0.0)
    with pytest.raises(TeacherMismatchError, match="replica 0 loaded"):
        TeacherPool(cfg, models, TeacherIdentity("0" * 64, num_layers=2, hidden_size=32))
    pool = TeacherPool(cfg, models, good)
    try:
        ids = torch.tensor([[1, 5, 6, 2]])  # CPU tensors: the pool moves them to the replica's device
        args = (ids, torch.ones_like(ids), torch.arange(4).unsqueeze(0), torch.ones(1, 2, dtype=torch.long))
        ok = pool.submit(*args, TeacherRequest(layers=(1, 2), positions="all", identity=good)).result()
        assert ok.states.shape == (1, 2, 2, 32) and ok.logprobs is None  # states only: no logits computed
        other = TeacherIdentity("f" * 64, num_layers=2, hidden_size=32)  # e.g. the directory was rewritten
        with pytest.raises(TeacherMismatchError, match="planned for"):
            pool.submit(*args, TeacherRequest(layers=(1,), identity=other)).result()
        with pytest.raises(TeacherMismatchError, match="layer plan"):
            pool.submit(*args, TeacherRequest(layers=(1, 3), identity=good)).result()
        assert pool.stats["retries"] == 0  # a mismatch is never re-sent
    finally:
        pool.close()


def test_ray_teacher_refuses_full_kl():
    with pytest.raises(ConfigError, match="full_kl"):
        load_params(None, {"teacher.placement": "ray", "distill.method": "full_kl"})


@pytest.mark.slow
def test_two_ranks_share_one_pool_and_match_a_local_teacher(tiny_pair, tmp_path):
    """torchrun, 2 ranks (gloo): rank 0 starts a fresh Ray and the replicas, broadcasts the address and names, rank 1
    joins; both ranks' requests go to the same 2 replicas. Same losses as the local teacher under torchrun.

    Prompts of different lengths under a token budget: the ranks pack their rows into different numbers of
    micro-batches, so the rank with fewer splits streamed micro-batches after the fact (their requests cancelled,
    the halves sent): the losses still match the local teacher, which splits the same way."""
    import json
    import subprocess
    from pathlib import Path

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"prompt": "{10**a + b}+{b}="}}\n' for a in range(1, 9) for b in range(3, 7))
    )

    def args(tmp, placement):
        sets = {
            "models.teacher.path": tiny_pair["teacher"], "models.student.path": tiny_pair["student"],
            "models.embedded": False, "task.prompts_file": prompts, "rollout.max_new_tokens": 8,
            "rollout.temperature": 0, "distill.steps": 2, "distill.prompts_per_step": 8, "distill.n_responses": 1,
            "distill.micro_batch_tokens": 30, "distill.eval_every": 0, "distill.memory_every": 0,
            "optim.num_threads": 1, "checkpoint.dir": tmp / "ckpt", "checkpoint.every": 0,
            "teacher.placement": placement, "teacher.replicas": 2,
        }  # fmt: skip
        return train_argv(tmp, sets)

    # The ranks start their own Ray (this module's in-process cluster is not theirs).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    run = torchrun_command(ParallelConfig(nproc_per_node=2), "trainer.train")
    rows = {}
    for placement in ("local", "ray"):
        p = subprocess.run([*run, *args(tmp_path / placement, placement)], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        text = (tmp_path / placement / "out" / "metrics.jsonl").read_text()
        rows[placement] = [json.loads(r) for r in text.splitlines()]
    assert [r["loss/total"] for r in rows["ray"]] == pytest.approx(
        [r["loss/total"] for r in rows["local"]], rel=1e-6
    )
    assert (
        sum(r["perf/micro_batch_splits"] for r in rows["ray"]) >= 1
    )  # the counts differed: halves were made
    for r in rows["ray"]:
        # each rank's micro-batches, plus the requests of split micro-batches (cancelled, then sent as halves)
        assert r["teacher/requests"] == 2 * r["perf/micro_batches"] + r["perf/micro_batch_splits"] / 2
        assert r["teacher/reply_bytes"] > 0


@pytest.mark.slow
def test_vllm_rollout_streams_teacher_requests_as_rows_finish(tmp_path):
    """vLLM engine (in-process) + teacher pool on the embedded teacher, whose responses end at different lengths: the
    micro-batches of short rows go to the pool while the engine still samples the long ones, and every reply is
    bitwise the in-process teacher's targets for exactly the micro-batches the finished batch splits into."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("vLLM is not installed in CI: .ci/run must run `bash scripts/setup.sh --vllm`")
        pytest.skip("vLLM not installed (bash scripts/setup.sh --vllm)")
    root = Path(__file__).resolve().parents[2]
    # The teacher as its own student: it answers the task, so its greedy responses end at different lengths.
    teacher = root / "artifacts/models/teacher"
    pair = {"teacher": teacher, "student": teacher, "prompts": root / "artifacts/task/train.jsonl"}
    params = _params(pair, tmp_path, "ray", **{
        "rollout.engine": "vllm", "rollout.vllm.multiprocessing": False, "rollout.max_new_tokens": 48,
        "distill.prompts_per_step": 8, "distill.n_responses": 1, "distill.micro_batch_tokens": 130,
    })  # fmt: skip
    trainer = Trainer(params, tmp_path / "o")
    try:
        stream = trainer._teacher_stream(trainer.prompt_ids[:8])
        batch = trainer.engine.generate(
            trainer.student, trainer.prompt_ids[:8], n=1, temperature=0.0, top_p=1.0, max_new_tokens=48,
            on_progress=stream.progress,
        )  # fmt: skip
        micro, pending = stream.finish(batch)
        assert len(set(batch.response_lengths.tolist())) > 2 and len(micro) > 2
        assert stream.submitted_early >= 1  # sent while the engine was still sampling
        assert [sorted(g) for g in stream.groups] == stream.groups and len(pending) == len(micro)
        teacher = load_model(trainer.p.models.teacher, trainer.p.models, role="teacher", trainable=False)
        for mb, p in zip(micro, pending, strict=True):
            _same_targets(trainer.objective.prepare(trainer.student, teacher, mb), p.result())
        rows = _steps(trainer, 2)
    finally:
        trainer.close()
    assert all(r["teacher/requests_during_rollout"] >= 1 for r in rows)
    assert all(r["teacher/requests"] == r["perf/micro_batches"] for r in rows)


def test_bench_step_runs_local_and_pool_placements_side_by_side():
    """``bench step --teachers local,ray:1`` at a micro shape: one row per method and placement, the pool rows with
    a payload and the reference's layout to compare with, the local rows without a payload."""
    from trainer.bench_step import ModelShape, StepBenchSpec, run_step_bench

    shape = ModelShape(vocab=200, hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1)
    spec = StepBenchSpec(shape=shape, prompts=2, n=2, max_new_tokens=8, rounds=1, methods=["oprd", "opd_topk"],
                         teachers=["local", "ray:1"], micro_batch_tokens=24, threads=1)  # fmt: skip
    out = run_step_bench(spec)
    rows = {r["name"]: r for r in out["methods"]}
    assert set(rows) == {"oprd@local", "oprd@ray:1", "opd_topk@local", "opd_topk@ray:1"}
    for method in ("oprd", "opd_topk"):
        assert rows[f"{method}@local"]["teacher_reply_bytes"] == 0
        assert rows[f"{method}@ray:1"]["teacher_reply_bytes"] > 0
    assert rows["oprd@ray:1"]["teacher_reference_bytes"] > 0
    assert all(r["teacher_requests_during_rollout"] >= 0 for r in rows.values())


def test_bench_step_teacher_placements_are_validated():
    from trainer.bench_step import StepBenchSpec, paper_shape_payload

    with pytest.raises(ValueError, match="local or ray:<replicas>"):
        StepBenchSpec(teachers=["local", "ray:0"]).validate()
    with pytest.raises(ValueError, match="full_kl"):
        StepBenchSpec(methods=["oprd", "full_kl"], teachers=["ray:1"]).validate()
    assert StepBenchSpec(teachers=["local", "ray:1", "ray:2"]).pools() == {"ray:1": 1, "ray:2": 2}
    paper = paper_shape_payload()
    assert paper["reference_bytes"] == 16_384 * 28 * 1536 * 4 and round(paper["ratio"], 3) == 0.5
