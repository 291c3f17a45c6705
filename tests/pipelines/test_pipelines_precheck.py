"""The precheck stage: every unusable input is reported, in one message, before any stage runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefix_grader import prefix_grader_fixture  # noqa: F401 (the prefix_grader fixture)

from pipelines import precheck
from pipelines.graders import known_graders
from trainer.config import load_params

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = {"teacher": "teacher", "student": "student-base", "teacher-wide": "teacher-wide"}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose pair is a copy of the committed embedded pair (real Qwen2 directories, 4 MB each)."""
    monkeypatch.chdir(tmp_path)
    for var in ("OPRD_DATABASE_URL", "OPRD_REGISTRY_URL"):
        monkeypatch.delenv(var, raising=False)
    for name, src in EMBEDDED.items():
        shutil.copytree(REPO / "artifacts/models" / src, tmp_path / "models" / name)
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


def _edit_json(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_the_pair_is_checked_against_the_method_before_any_stage(project: Path) -> None:
    """Hidden sizes against the method, the layer plan, special tokens and chat templates: one line each."""
    wide = {"models.teacher.path": "models/teacher-wide"}
    (problem,) = precheck.check_params(_params(**wide), check_tracking=False)
    assert problem.startswith("models (distill.method=oprd): hidden sizes differ (student 128, teacher 160)")
    assert (
        precheck.check_params(_params(**wide, **{"distill.method": "oprd_bridge"}), check_tracking=False)
        == []
    )
    (problem,) = precheck.check_params(_params(**{"distill.rep.layers": [1, 9]}), check_tracking=False)
    assert "models (distill.method=oprd):" in problem and "9" in problem

    # Same vocabulary, another end-of-sequence token: not the same tokenizer.
    _edit_json(project / "models/student/tokenizer_config.json", eos_token="<pad>")
    (problem,) = precheck.check_params(_params(), check_tracking=False)
    assert "special tokens" in problem and "eos_token: '<pad>' vs '</s>'" in problem and "\n" not in problem
    shutil.copy(
        project / "models/teacher/tokenizer_config.json", project / "models/student/tokenizer_config.json"
    )
    assert precheck.check_params(_params(), check_tracking=False) == []

    for name, turn in (("student", "{{ m.content }}"), ("teacher", "<s>{{ m.content }}</s>")):
        (project / "models" / name / "chat_template.jinja").write_text(
            "{% for m in messages %}" + turn + "{% endfor %}"
        )
    (problem,) = precheck.check_params(_params(), check_tracking=False)
    assert "chat templates differ" in problem


def test_a_policy_file_that_differs_from_the_installed_one_is_refused(project: Path) -> None:
    """Read-only from the local registry database: missing -> fine (the gate installs it); equal -> fine;
    different -> one line naming `oprd-ci policy set`; with gate.install_policy + reason -> fine."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.policy import load_policy_file
    from server.settings import ServerSettings

    assert precheck.check_params(_params(**{"gate.model_name": "mine"}), check_tracking=False) == []
    assert not (project / "registry.db").exists()  # reading created nothing
    settings = ServerSettings(database_url=f"sqlite:///{project}/registry.db", mlflow_enabled=False)
    spec = load_policy_file(project / "policy.yaml").model_dump(mode="json")
    with TestClient(create_app(settings, local_actor="t")) as c:
        r = c.put(
            "/v1/models/mine/policy",
            json={"spec": spec, "reason": "first"},
            headers={"Idempotency-Key": "k1"},
        )
        assert r.status_code == 200, r.text
    (project / "policy.yaml").write_text("# reformatted\nsuites:\n  embedded:\n    floor: 0.10\n")
    assert precheck.check_params(_params(**{"gate.model_name": "mine"}), check_tracking=False) == []
    (project / "policy.yaml").write_text("suites: {embedded: {floor: 0.3}}\n")
    (problem,) = precheck.check_params(_params(**{"gate.model_name": "mine"}), check_tracking=False)
    assert "differs from the policy installed for mine v1 (suites.embedded.floor: 0.1 -> 0.3)" in problem
    assert "oprd-ci policy set mine --file policy.yaml --reason" in problem
    asked = {"gate.model_name": "mine", "gate.install_policy": True, "gate.policy_reason": "stricter"}
    assert precheck.check_params(_params(**asked), check_tracking=False) == []


@pytest.mark.parametrize("key", ["rollout.engine", "evaluate.engine"])
def test_vllm_engine_without_vllm_is_one_line(
    project: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """``rollout.engine`` / ``evaluate.engine: vllm`` on a machine without vLLM: one problem naming the key and the
    setup command, before any stage runs (vLLM hidden from the import system, whether installed or not)."""
    import importlib.util

    from trainer import rollout_vllm

    real = importlib.util.find_spec
    monkeypatch.setattr(
        rollout_vllm.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert precheck.check_params(_params(), check_tracking=False) == []
    problems = precheck.check_params(_params(**{key: "vllm"}), check_tracking=False)
    assert len(problems) == 1, problems
    assert (
        problems[0].startswith(f"{key}: vllm but vLLM is not installed") and "setup.sh --vllm" in problems[0]
    )
    assert f"or set {key}: hf" in problems[0]
