"""The ``bridge`` stage: a versioned bank with its digest and an MLflow run for oprd_bridge; a no-op otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from tiny_pair import tiny_params

from pipelines import stage_bridge
from trainer.bridge import load_bank


def _params_file(tmp: Path, params) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def _bridge(tiny_pair, wide_teacher, tmp, **over):
    return tiny_params(tiny_pair, tmp, **{
        "models.teacher.path": str(wide_teacher), "distill.method": "oprd_bridge",
        "distill.bridge.bank": str(tmp / "artifacts" / "bridge"), "distill.bridge.num_prompts": 40,
        "distill.bridge.rank": 4, "distill.bridge.epochs": 30, "distill.bridge.lr": 1e-2,
        "distill.bridge.batch_rows": 64, "distill.bridge.min_val_cosine": 0.3,
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", **over,
    })  # fmt: skip


def test_stage_writes_bank_digest_and_lineage(tiny_pair, wide_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _bridge(tiny_pair, wide_teacher, tmp_path)
    assert stage_bridge.main(["--params", str(_params_file(tmp_path, params))]) == 0
    out = tmp_path / "artifacts" / "bridge"
    summary = json.loads((out / "bridge.json").read_text())
    assert summary["bank_sha256"] == stage_bridge.bank_digest(out)
    assert summary["layer_pairs"] == ["s1_t1", "s2_t3"] and summary["rank"] == 4
    assert summary["val_cosine_mean"] > 0.5
    bank = load_bank(out)
    assert bank.meta.sources["pairs"] == summary["pairs_sha256"]
    ref = json.loads((out / "bridge.mlflow.json").read_text())
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(ref["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["oprd.bridge.bank.sha256"] == summary["bank_sha256"]
    assert run.data.tags["oprd.bridge.rank"] == "4"
    assert run.data.tags["oprd.teacher.path"].endswith("teacher-wide")
    assert run.data.metrics["bridge/val_cosine/s2_t3"] == pytest.approx(summary["val_cosine"]["s2_t3"])
    metrics = json.loads((tmp_path / "metrics" / "bridge.json").read_text())
    assert metrics["bridge/val_cosine_mean"] == pytest.approx(summary["val_cosine_mean"])
    assert (metrics["bridge/fitted"], metrics["bridge/rank"]) == (1, 4)
    assert all(isinstance(v, (int, float)) for v in metrics.values()), (
        metrics
    )  # numbers only; strings: record


def test_stage_refuses_a_poor_bank(tiny_pair, wide_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = _bridge(tiny_pair, wide_teacher, tmp_path, **{"distill.bridge.min_val_cosine": 0.999})
    assert stage_bridge.main(["--params", str(_params_file(tmp_path, params))]) == 2
    assert "min_val_cosine" in capsys.readouterr().err


def test_other_methods_are_a_cheap_no_op(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tiny_params(tiny_pair, tmp_path, **{
        "distill.bridge.bank": str(tmp_path / "artifacts" / "bridge"),
        "models.teacher.path": str(tmp_path / "does-not-exist"),  # never loaded
        "tracking.uri": "http://127.0.0.1:9",  # never contacted
    })  # fmt: skip
    assert stage_bridge.main(["--params", str(_params_file(tmp_path, params))]) == 0
    out = tmp_path / "artifacts" / "bridge"
    assert sorted(p.name for p in out.iterdir()) == ["bridge.json"]
    assert json.loads((out / "bridge.json").read_text()) == {"bank": None, "method": "oprd"}
    assert json.loads((tmp_path / "metrics" / "bridge.json").read_text()) == {"bridge/fitted": 0}
