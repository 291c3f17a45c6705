"""``oprd-ci init`` (``pipelines.onboard``): the starting policy's numbers, and the command on the embedded pair:
good inputs write the profile and policy, install it and apply the profile; every bad input is one line, exit 2,
and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oprd_ci.cli import app
from pipelines.onboard import OnboardError, SuiteInfo, derive_policy, policy_yaml
from server.decision import decide
from server.policy import PolicySpec, policy_digest
from server.policy_sync import read_installed_policy
from server.schemas import EvidenceBody
from trainer.config import load_params

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("n", "floor", "margin", "min_problems"),
    [
        (30, 0.1, 0.1, 30),
        (10, 0.3, 0.1, 10),
        (200, 0.1, 0.05, 100),
        (500, 0.1, 0.04, 100),
        (5000, 0.1, 0.02, 100),
    ],
)
def test_policy_numbers_follow_the_suite_size(n, floor, margin, min_problems):
    (rule,) = derive_policy([SuiteInfo("s", "s.json", n)]).values()
    assert rule == {"floor": floor, "non_inferiority_margin": margin, "max_teacher_gap": 0.3,
                    "min_problems": min_problems}  # fmt: skip


def test_vacuous_thresholds_are_refused():
    suites = [SuiteInfo("s", "s.json", 30)]
    with pytest.raises(OnboardError, match=r"--floor 0\.0"):
        derive_policy(suites, floor=0.0)
    with pytest.raises(OnboardError, match=r"--max-teacher-gap 1\.0"):
        derive_policy(suites, max_teacher_gap=1.0)


def _evidence(cand: float, teacher: float, n: int = 30) -> EvidenceBody:
    rows = lambda acc: [{"problem_id": f"p{i}", "k": 4, "n_correct": 4 * (i < round(acc * n)),  # noqa: E731
                         "mean_length": 20.0} for i in range(n)]  # fmt: skip
    return EvidenceBody.model_validate({
        "suites": {"AIME24": {"candidate": rows(cand), "teacher": rows(teacher)}},
        "cost": {"device_hours": 0.1, "usd": 0.01},  # the gate stage always sends it (a set budget needs it)
    })  # fmt: skip


def test_with_no_champion_a_weak_student_is_rejected_and_a_good_one_promoted():
    """The written file (comments and all) parses to the policy, and its floor and teacher gap decide a first
    version on their own: the real decision engine, no champion."""
    suites = [SuiteInfo("AIME24", "data/benchmarks/AIME24.json", 30)]
    spec = PolicySpec.model_validate(yaml.safe_load(policy_yaml("m", derive_policy(suites), suites)))
    for cand, teacher, verdict, failing in [
        (0.0, 0.3, "REJECT", {"floor"}),  # a broken student
        (0.2, 0.6, "REJECT", {"teacher_gap"}),  # above the floor, far behind its teacher
        (0.4, 0.5, "PROMOTE", set()),
    ]:
        got, rows = decide(spec, _evidence(cand, teacher), None)
        assert got == verdict and {r.criterion for r in rows if r.status == "FAIL"} == failing, (
            cand,
            teacher,
        )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with params.yaml, the embedded pair as 'your' directories, prompts and a suite."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPRD_DATABASE_URL", f"sqlite:///{tmp_path}/registry.db")
    monkeypatch.setenv("OPRD_MLFLOW_ENABLED", "false")
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for name, src in (("teacher", "teacher"), ("student", "student-base"), ("wide", "teacher-wide")):
        shutil.copytree(REPO / "artifacts/models" / src, tmp_path / "mine" / name)
    shutil.copy(REPO / "artifacts/task/train.jsonl", tmp_path / "mine/prompts.jsonl")
    (tmp_path / "mine/arith.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40))
    )
    (tmp_path / "mine/no-answers.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    return tmp_path


def _init(*extra: str, teacher: str = "mine/teacher", student: str = "mine/student", name: str = "team-a"):
    args = ["init", "--teacher", teacher, "--student", student, "--prompts", "mine/prompts.jsonl",
            "--suite", "mine/arith.jsonl", "--name", name, *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_init_writes_installs_applies_and_prints_the_next_command(project: Path) -> None:
    r = _init()
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("next: dvc repro\nthen: oprd-ci status team-a")
    profile = yaml.safe_load((project / "profiles/team-a.yaml").read_text())
    assert profile["models"]["teacher"] == {"path": "mine/teacher", "revision": None}  # repo-relative
    assert profile["distill"] == {"method": "oprd"}
    assert profile["evaluate"]["suites"] == [
        {"name": "arith", "path": "mine/arith.jsonl", "limit": None, "grader": "math"}
    ]
    p = load_params(project / "params.yaml")  # applied and valid
    assert not p.models.embedded and p.gate.model_name == "team-a" and p.gate.policy == "policies/team-a.yaml"
    assert p.task.prompts_file == "mine/prompts.jsonl" and p.distill.bridge.bank == "artifacts/bridge"
    version, spec = read_installed_policy("team-a", f"sqlite:///{project}/registry.db")
    written = PolicySpec.model_validate(yaml.safe_load((project / "policies/team-a.yaml").read_text()))
    assert version == 1 and spec == written and spec.suites["arith"].min_problems == 40
    assert policy_digest(spec) in r.output
    # a second init for the name is refused without --force; with it, the same policy stays v1
    again = _init()
    assert again.exit_code == 2 and "profiles/team-a.yaml exists" in again.output
    assert _init("--force").exit_code == 0
    assert read_installed_policy("team-a", f"sqlite:///{project}/registry.db")[0] == 1


def test_a_wider_teacher_gets_the_bridge(project: Path) -> None:
    r = _init(teacher="mine/wide")
    assert r.exit_code == 0, (
        r.output and "oprd_bridge (hidden sizes differ (student 128, teacher 160)" in r.output
    )
    assert load_params(project / "params.yaml").distill.method == "oprd_bridge"


def _other_eos(project: Path) -> str:
    d = project / "mine/other"
    shutil.copytree(project / "mine/student", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<pad>"}))
    return "mine/other"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"name": "oprd-student"}, "--name oprd-student: that is the embedded task's model"),
        ({"name": "bad name!"}, "--name 'bad name!'"),
        ({"teacher": "mine/nowhere"}, "--teacher mine/nowhere: not a directory"),
        ({"student": "OTHER"}, "pair: tokenizers share a vocabulary but not their special tokens"),
        ({"extra": ("--suite", "mine/no-answers.jsonl")}, "--suite mine/no-answers.jsonl:"),
        ({"extra": ("--floor", "0")}, "--floor 0.0: must be in (0, 1]"),
        ({"extra": ("--method", "oprdd")}, "--method 'oprdd'"),
    ],
)
def test_every_bad_input_is_one_line_exit_2_and_nothing_written(project: Path, args: dict, says: str) -> None:
    before = (project / "params.yaml").read_bytes()
    if args.get("student") == "OTHER":
        args["student"] = _other_eos(project)
    extra = args.pop("extra", ())
    r = _init(*extra, **args)
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (project / "params.yaml").read_bytes() == before
    assert not (project / "profiles").exists() and not (project / "policies").exists()
    assert not (project / "registry.db").exists()
