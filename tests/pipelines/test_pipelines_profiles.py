"""Profiles (``pipelines.profiles``, ``oprd-ci params apply``): a deep merge into params.yaml that keeps its
comments, replaces lists, validates first and writes nothing on error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oprd_ci.cli import app
from pipelines.profiles import ProfileError, apply_profile
from trainer.config import load_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    return p


def _profile(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_merge_is_deep_lists_replace_and_comments_stay(params: Path, tmp_path: Path) -> None:
    before = params.read_text()
    profile = _profile(
        tmp_path,
        "distill: {method: oprd_bridge, bridge: {rank: 4}}\n"
        "evaluate: {suites: [{name: AIME24, path: data/benchmarks/AIME24.json, limit: 8}]}\n"
        "gate: {model_name: mine}\n",
    )
    changes, merged = apply_profile(params, profile)
    assert [str(c) for c in changes] == [
        'distill.method: "oprd" -> "oprd_bridge"',
        "distill.bridge.rank: 8 -> 4",
        'evaluate.suites: [{"name": "embedded", "path": null, "limit": null}] -> '
        '[{"name": "AIME24", "path": "data/benchmarks/AIME24.json", "limit": 8}]',
        'gate.model_name: "oprd-student" -> "mine"',
    ]
    after = params.read_text()
    p = load_params(params)
    assert p == merged and p.distill.method == "oprd_bridge" and p.distill.bridge.rank == 4
    assert p.distill.bridge.bank == "artifacts/bridge"  # siblings kept: dvc.yaml interpolates it
    assert [s.name for s in p.evaluate.suites] == ["AIME24"]  # the list was replaced, not merged
    for line in before.splitlines():  # every comment line and inline comment survives
        if "#" in line and "model_name" not in line:
            assert line in after, line
    assert len(after.splitlines()) == len(before.splitlines())


def test_a_profile_that_changes_nothing_leaves_the_file_byte_identical(params: Path, tmp_path: Path) -> None:
    before = params.read_bytes()
    changes, _ = apply_profile(params, _profile(tmp_path, "distill: {steps: 300}\nseed: 0\n"))
    assert changes == [] and params.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("distill: {stepz: 30}\n", "distill.stepz: unknown key; did you mean 'steps'?"),
        ("distill: {steps: -1}\n", "distill.steps: Input should be greater than 0"),
        ("gate: {install_policy: true}\n", "gate.install_policy: true needs gate.policy_reason"),
        ("- a list\n", "a profile is a non-empty mapping"),
        ("models: {teacher: [\n", "not valid YAML"),
    ],
)
def test_a_bad_profile_is_one_error_naming_the_key_and_nothing_is_written(
    params: Path, tmp_path: Path, text: str, says: str
) -> None:
    before = params.read_bytes()
    with pytest.raises(ProfileError) as exc:
        apply_profile(params, _profile(tmp_path, text))
    assert says in str(exc.value)
    assert params.read_bytes() == before
    r = CliRunner().invoke(app, ["params", "apply", str(tmp_path / "profile.yaml"), "--params", str(params)])
    assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1
    assert params.read_bytes() == before


def test_cli_dry_run_shows_changes_and_writes_nothing(params: Path, tmp_path: Path) -> None:
    before = params.read_bytes()
    profile = _profile(tmp_path, "distill: {steps: 30}\n")
    r = CliRunner().invoke(app, ["params", "apply", str(profile), "--params", str(params), "--dry-run"])
    assert r.exit_code == 0 and "would change 1 key(s)" in r.output and "distill.steps: 300 -> 30" in r.output
    assert params.read_bytes() == before
    r = CliRunner().invoke(app, ["params", "apply", str(profile), "--params", str(params)])
    assert r.exit_code == 0 and "git checkout" in r.output and load_params(params).distill.steps == 30
    # `oprd-ci params` (validate and print) is unchanged by the group
    r = CliRunner().invoke(app, ["params", "--params", str(params), "--set", "seed=3"])
    assert r.exit_code == 0 and "seed: 3" in r.output
