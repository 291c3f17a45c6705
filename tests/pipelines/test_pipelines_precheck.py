"""The precheck stage: every unusable input is reported, in one message, before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import precheck
from trainer.config import load_params
from trainer.export import write_manifest


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("teacher", "student"):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w")
        write_manifest(d)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1?"}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    (tmp_path / "policy.yaml").write_text("suites: {embedded: {floor: 0.1}}\n")
    return tmp_path


def _params(**over: object):
    base = {
        "models.embedded": False, "models.teacher.path": "models/teacher", "models.student.path": "models/student",
        "task.prompts_file": "prompts.jsonl", "evaluate.embedded_path": "eval.jsonl", "gate.policy": "policy.yaml",
    }  # fmt: skip
    return load_params(None, {**base, **over})


def test_good_inputs_pass_and_write_a_constant_marker(project: Path) -> None:
    assert precheck.check_params(_params(), check_tracking=False) == []
    params = project / "params.yaml"
    params.write_text(
        "models: {embedded: false, teacher: {path: models/teacher}, student: {path: models/student}}\n"
        "task: {prompts_file: prompts.jsonl}\nevaluate: {embedded_path: eval.jsonl}\ngate: {policy: policy.yaml}\n"
    )
    assert precheck.main(["--params", str(params), "--no-tracking"]) == 0
    first = (project / precheck.OK_FILE).read_bytes()
    assert precheck.main(["--params", str(params), "--no-tracking"]) == 0
    assert (project / precheck.OK_FILE).read_bytes() == first  # same bytes: downstream stages stay up to date


def test_every_problem_is_named(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "empty.jsonl").write_text("")
    problems = precheck.check_params(
        _params(
            **{"task.prompts_file": "empty.jsonl", "models.teacher.path": "nowhere", "gate.policy": "no.yaml"}
        ),
        check_tracking=False,
    )
    text = "\n".join(problems)
    assert "task.prompts_file: empty.jsonl: no prompts" in text
    assert "models.teacher.path: 'nowhere' is not a directory" in text
    assert "gate.policy: 'no.yaml' is not a file" in text
    assert len(problems) == 3
    (project / "params.yaml").write_text("task: {prompts_file: empty.jsonl}\nmodels: {embedded: false}\n")
    assert precheck.main(["--params", "params.yaml", "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "precheck failed (no stage ran, nothing was deleted)" in err and "no prompts" in err
    assert not (project / precheck.OK_FILE).exists()


def test_embedded_outputs_of_bootstrap_may_be_missing(project: Path) -> None:
    # Bootstrap will write these; only a present-but-broken file is an error.
    params = load_params(None, {"gate.policy": "policy.yaml"})
    assert precheck.check_params(params, check_tracking=False) == []
    bad = load_params(None, {"gate.policy": "policy.yaml", "tracking.uri": "http://127.0.0.1:9"})
    assert any(p.startswith("tracking.uri:") for p in precheck.check_params(bad))
