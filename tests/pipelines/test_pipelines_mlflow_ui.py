"""The MLflow UI shows what pipelines.tracking records: a real lean server, real headless Chromium.

A stage run with ``oprd.*`` tags and a registered student version are created through our API over HTTP;
Chromium then renders the JS app (``--dump-dom`` after a virtual-time budget) and the DOM must contain them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.tracking import StageRun
from pipelines.tracking_models import log_logged_model, register_student
from pipelines.tracking_server import LeanMlflowServer
from trainer.config import load_params
from trainer.export import write_manifest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeanMlflowServer]:
    with LeanMlflowServer(tmp_path_factory.mktemp("ui-srv")) as srv:
        yield srv


def dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after Chromium ran its JS for 15 s of virtual time."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI: apt-get install -y chromium)")
def test_run_and_model_pages_show_oprd_lineage(server: LeanMlflowServer, tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    student = tmp_path / "artifacts" / "models" / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text('{"hidden_size": 8}')
    (student / "model.safetensors").write_bytes(b"s" * 1024)
    write_manifest(student)
    params = load_params(
        None,
        {"tracking.uri": server.uri, "tracking.experiment": "ui-check", "distill.method": "opd_topk"},
    )
    with StageRun("distill", params, root=tmp_path, run_name="distill-ui-probe") as run:
        model_id = log_logged_model("student", student, role="student", run_id=run.run_id, client=run.client)
    version = register_student(
        "oprd-student-ui",
        model_id=model_id,
        run_id=run.run_id,
        tags={"oprd.method": "opd_topk"},
        client=run.client,
    )
    assert version == 1

    run_dom = dump_dom(f"{server.uri}/#/experiments/{run.experiment_id}/runs/{run.run_id}", tmp_path / "p1")
    assert "distill-ui-probe" in run_dom
    assert "oprd.method" in run_dom and "opd_topk" in run_dom

    model_dom = dump_dom(f"{server.uri}/#/models/oprd-student-ui", tmp_path / "p2")
    assert "oprd-student-ui" in model_dom
    assert "Version 1" in model_dom, json.dumps(model_dom[-3000:])
