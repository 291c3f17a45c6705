"""The gate run's ``cost/trend.png``: its series on numbers, and the picture logged to a real MLflow SQLite store
from a real registry (in-process on SQLite, gates through the CLI, read back by ``oprd-ci history --cost``)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from oprd_ci.registry_cli import register
from pipelines.cost_trend import render_trend, trend_series
from pipelines.stage_gate import _log_cost_trend
from server.artifacts import listing_sha256
from trainer.config import load_params

MODEL = "trendy"
CANDIDATE_RING = np.array([31, 119, 180])  # matplotlib's tab:blue, used only for the candidate's ring


def _row(version, status, acc, tokens, usd, flagged=()):
    return {"version": version, "status": status, "accuracy": acc, "tokens_per_response": tokens, "usd": usd,
            "usd_per_point": None if usd is None or not acc else usd / (100 * sum(acc.values()) / len(acc)),
            "device_hours": None, "flagged": list(flagged), "verdict": None, "decision_id": None,
            "created_at": "2026-12-03T00:00:00"}  # fmt: skip


def test_trend_series_on_numbers():
    rows = [
        _row(1, "promoted", {"a": 0.5, "b": 0.3}, 20.0, 1.0),
        _row(2, "registered", {}, None, None),  # no evidence: not plotted
        _row(3, "champion", {"a": 0.6}, 22.0, 1.15),
        _row(4, "rejected", {"a": 0.6}, None, 1.5, flagged=["cost_usd_recent_median"]),
    ]
    s = trend_series(rows)
    assert s["version"] == [1, 3, 4] and s["status"] == ["promoted", "champion", "rejected"]
    assert s["accuracy_pct"] == pytest.approx([40.0, 60.0, 60.0])
    assert s["tokens"][:2] == [20.0, 22.0] and np.isnan(s["tokens"][2])
    assert s["usd"] == [1.0, 1.15, 1.5] and s["usd_per_point"] == pytest.approx([1 / 40, 1.15 / 60, 1.5 / 60])
    assert s["flagged"] == [False, False, True]


def test_candidate_is_ringed(tmp_path: Path):
    rows = [_row(v, "promoted", {"a": 0.5}, 20.0, 1.0 + v / 10) for v in (1, 2, 3)]

    def ring_pixels(candidate):
        img = np.asarray(
            Image.open(render_trend(tmp_path / f"{candidate}.png", rows, candidate)).convert("RGB")
        )
        return int((np.abs(img.astype(int) - CANDIDATE_RING).sum(axis=2) < 30).sum())

    assert ring_pixels(None) == 0 and ring_pixels(3) > 100


def _artifact(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    data = {"config.json": b"{}", "model.safetensors": name.encode() * 64}
    for rel, b in data.items():
        (d / rel).write_bytes(b)
    hashes = {rel: hashlib.sha256(b).hexdigest() for rel, b in data.items()}
    (d / "manifest.json").write_text(json.dumps({"files": hashes, "sha256": listing_sha256(hashes)}))
    return d


def _evidence(artifact: Path, usd: float, length: float) -> dict:
    rng = random.Random(1)
    cand = [{"problem_id": f"p{i}", "k": 4, "n_correct": 4 if rng.random() < 0.5 else 0, "mean_length": length}
            for i in range(60)]  # fmt: skip
    return {"model": MODEL, "artifact_path": str(artifact), "suites": {"embedded": {"candidate": cand}},
            "cost": {"device_hours": usd / 2, "usd": usd}, "lineage": {"teacher": "t@1"}}  # fmt: skip


def test_gate_logs_cost_trend_png_from_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = {
        "OPRD_DATABASE_URL": f"sqlite:///{tmp_path}/registry.db",
        "OPRD_MLFLOW_ENABLED": "false",
        "OPRD_ARTIFACT_ROOTS": str(tmp_path / "artifacts"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "suites": {"embedded": {"floor": 0.2, "non_inferiority_margin": 0.05, "min_problems": 50}},
        "cost_usd": {"max_ratio_to_champion": 1.5, "max_ratio_to_recent_median": 1.3},
        "bootstrap": {"n_resamples": 200},
    }))  # fmt: skip
    app = typer.Typer()
    register(app)
    for i in range(4):  # +15% cost per version: v4 drifts past 1.3x the median of v1..v3
        f = tmp_path / f"ev{i}.json"
        f.write_text(json.dumps(_evidence(_artifact(tmp_path / "artifacts", f"v{i + 1}"), 1.15**i, 20.0 + i)))
        r = CliRunner().invoke(app, ["gate", "--evidence", str(f), "--policy", str(policy), "--install-policy",
                                     "--policy-reason", "drift test", "--reason", f"nightly v{i + 1}"], catch_exceptions=False)  # fmt: skip
        assert r.exit_code == 0, r.output

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    run_id = client.create_run(
        client.create_experiment("gate", artifact_location=str(tmp_path / "mlart"))
    ).info.run_id
    params = load_params(None, {"gate.model_name": MODEL})
    import os

    _log_cost_trend(SimpleNamespace(client=client, run_id=run_id), params, {"version": 4, "verdict": "REJECT"},
                    {**os.environ, **env})  # fmt: skip

    assert {a.path for a in client.list_artifacts(run_id, "cost")} == {"cost/trend.png", "cost/history.json"}
    local = Path(client.download_artifacts(run_id, "cost", str(tmp_path / "dl")))
    rows = json.loads((local / "history.json").read_text())
    assert [(r["version"], r["status"]) for r in rows] == [(1, "promoted"), (2, "promoted"), (3, "champion"),
                                                           (4, "rejected")]  # fmt: skip
    assert rows[3]["flagged"] == ["cost_usd_recent_median"]
    s = trend_series(rows)
    assert s["usd"] == pytest.approx([1.15**i for i in range(4)]) and s["tokens"] == [20.0, 21.0, 22.0, 23.0]
    img = Image.open(local / "trend.png")
    img.load()  # decodes the whole PNG
    assert img.format == "PNG" and img.size == (750, 700)
    pixels = np.asarray(img.convert("RGB")).astype(int)
    assert (np.abs(pixels - CANDIDATE_RING).sum(axis=2) < 30).sum() > 100  # the candidate, v4, is ringed
