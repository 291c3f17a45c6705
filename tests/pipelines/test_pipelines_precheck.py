"""The precheck stage: every unusable input is reported, in one message, before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefix_grader import prefix_grader_fixture  # noqa: F401 (the prefix_grader fixture)

from pipelines import precheck
from pipelines.graders import known_graders
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


def test_graders_and_references_are_checked_before_any_stage(
    project: Path, prefix_grader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"prompt": "ok", "reference": {"prefix": "1"}},
        {"id": "r2", "prompt": "bad", "reference": {"prfix": 1}},
    ]
    (project / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # training prompts may carry a grader and a reference (ignored by training, checked all the same)
    (project / "prompts.jsonl").write_text(
        json.dumps({"prompt": "1+1?", "grader": prefix_grader, "reference": '{"prefix": "2"}'}) + "\n"
        + json.dumps({"prompt": "2+2?"}) + "\n"
    )  # fmt: skip
    suites = (
        f"[{{name: embedded}}, {{name: tools, path: tools.jsonl, grader: {prefix_grader}}}, "
        "{name: typo, path: tools.jsonl, grader: exakt}, {name: mathy, path: tools.jsonl, grader: maht}]"
    )
    (project / "params.yaml").write_text(
        "models: {embedded: false, teacher: {path: models/teacher}, student: {path: models/student}}\n"
        f"task: {{prompts_file: prompts.jsonl}}\nevaluate: {{embedded_path: eval.jsonl, suites: {suites}}}\n"
        "gate: {policy: policy.yaml}\n"
    )
    assert precheck.main(["--params", "params.yaml", "--no-tracking"]) == 2
    known = ", ".join(known_graders())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert lines == [
        f"  evaluate.suites: suite 'tools': tools.jsonl: row 2: grader '{prefix_grader}': bad reference in "
        "'reference': reference must be an object with a string 'prefix', got {'prfix': 1}",
        f"  evaluate.suites[typo].grader: unknown grader 'exakt' (known: {known}); did you mean 'exact'?",
        f"  evaluate.suites[mathy].grader: unknown grader 'maht' (known: {known}); did you mean 'math'?",
    ]
    assert not (project / precheck.OK_FILE).exists()
    (project / "prompts.jsonl").write_text(
        json.dumps({"prompt": "1+1?", "grader": "maht", "answer": "2"}) + "\n"
    )
    problems = precheck.check_params(_params(), check_tracking=False)
    assert problems == [
        f"task.prompts_file: prompts.jsonl: row 1: unknown grader 'maht' (known: {known}); did you mean 'math'?"
    ]
