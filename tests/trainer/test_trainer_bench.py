"""bench update / bench step end-to-end at tiny shapes, the CLI wiring and its error lines.

Memory assertions use the profiler replay, which is deterministic; nothing here asserts on time.
"""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from oprd_ci.bench_cli import register
from trainer.bench import METHODS, ModelShape, parse_methods, synthetic_batch
from trainer.bench_step import PHASES, StepBenchSpec, run_step_bench
from trainer.bench_update import UpdateBenchSpec, run_update_bench

TINY = ModelShape(vocab=20_000, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
TINY_ARGS = ["--vocab", "2000", "--hidden", "16", "--intermediate", "32", "--layers", "2",
             "--heads", "2", "--kv-heads", "1", "--rounds", "1", "--warmup", "0", "--quiet"]  # fmt: skip
ROW_KEYS = {"name", "peak_memory_bytes", "median_step_seconds", "step_seconds", "mem_vs_opd_topk",
            "time_vs_opd_topk", "mem_vs_floor", "time_vs_floor"}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def update_result():
    torch.set_num_threads(1)
    spec = UpdateBenchSpec(shape=TINY, prompt_len=8, response_len=48, rounds=1, warmup=1, threads=1)
    return run_update_bench(spec)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def test_synthetic_batch_has_a_shorter_row_and_left_padding():
    b = synthetic_batch(2, 8, 16, 100, seed=0)
    assert b.input_ids.shape == (2, 24)
    assert b.response_mask[0].sum() == 16 and b.response_mask[1].sum() == 12
    assert b.attention_mask[1, :2].sum() == 0 and b.attention_mask[0].sum() == 24


def test_update_bench_reports_every_method_with_all_fields(update_result):
    r = update_result
    assert {"shape", "dtype", "optimizer", "device", "versions", "cpu", "threads", "methods"} <= r.keys()
    assert {"torch", "transformers", "python"} <= r["versions"].keys()
    assert [m["name"] for m in r["methods"]] == list(METHODS)
    for m in r["methods"]:
        assert m.keys() >= ROW_KEYS
        assert m["peak_memory_bytes"] > 0 and len(m["step_seconds"]) == 1
    topk = next(m for m in r["methods"] if m["name"] == "opd_topk")
    assert topk["mem_vs_opd_topk"] == pytest.approx(1.0) and topk["time_vs_opd_topk"] == pytest.approx(1.0)
    json.dumps(r)  # serializable as is


def test_oprd_transient_peak_is_below_opd_topk_when_the_vocab_dominates(update_result):
    # V=20000 >> d=32: OPD keeps [N, V] fp32 tensors alive through backward, OPRD never builds logits.
    peaks = {m["name"]: m["peak_memory_bytes"] for m in update_result["methods"]}
    assert peaks["oprd"] < 0.5 * peaks["opd_topk"]
    assert peaks["oprd"] < peaks["opd_sampled"] < peaks["full_kl"]
    assert peaks["full_kl_chunked"] < peaks["full_kl"]
    # OPRD on all layers and positions costs about the same as the bare backbone.
    assert peaks["oprd"] <= 1.25 * peaks["floor"]


def test_step_bench_phases_and_no_old_logprob_pass_for_oprd():
    spec = StepBenchSpec(
        shape=ModelShape(vocab=500, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1),
        prompts=2, n=2, prompt_len=4, max_new_tokens=5, rounds=1, warmup=0, methods=["oprd", "opd_topk"],
        threads=1,
    )  # fmt: skip
    r = run_step_bench(spec)
    rows = {m["name"]: m for m in r["methods"]}
    for m in rows.values():
        assert set(m["phases_median_seconds"]) == set(PHASES) and m["peak_memory_bytes"] > 0
    assert not rows["oprd"]["has_old_logprob_pass"] and rows["opd_topk"]["has_old_logprob_pass"]
    assert not rows["oprd"]["builds_logits_in_update"]


def test_cli_update_and_step_write_json(tmp_path):
    runner = CliRunner()
    out = tmp_path / "u.json"
    res = runner.invoke(_app(), ["bench", "update", "--out", str(out), "--methods", "oprd,opd_topk,floor",
                                 "--prompt-len", "4", "--response-len", "8", *TINY_ARGS])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["methods"]] == ["oprd", "opd_topk", "floor"]
    out2 = tmp_path / "s.json"
    res = runner.invoke(_app(), ["bench", "step", "--out", str(out2), "--methods", "oprd,floor", "--prompts", "2",
                                 "--n", "1", "--prompt-len", "3", "--max-new-tokens", "3", *TINY_ARGS])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(out2.read_text())["benchmark"] == "step"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "oprd,bogus"], "unknown method 'bogus'"),
        (["--vocab", "-5"], "--vocab must be >= 1"),
        (["--response-len", "0"], "--response-len must be >= 1"),
        (["--optimizer", "sgd"], "unknown optimizer"),
        (["--oprd-layers", "9"], "out of range"),
    ],
)
def test_cli_bad_flags_give_one_error_line(tmp_path, args, message):
    res = CliRunner().invoke(_app(), ["bench", "update", "--out", str(tmp_path / "x.json"), *args])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_parse_methods_accepts_dashes_and_deduplicates():
    assert parse_methods("opd-topk, oprd,oprd") == ["opd_topk", "oprd"]
    with pytest.raises(ValueError, match="no method"):
        parse_methods(" , ")
