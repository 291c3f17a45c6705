"""The policy file a pipeline names and the installed policy are one policy (``server.policy_sync``,
``oprd-ci gate --policy``): compared parsed, installed when absent, refused when different unless asked, and the
decision records the digest of the policy it applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import evidence, server_env
from typer.testing import CliRunner

from oprd_ci.registry_cli import EXIT_CONFLICT
from server.policy import PolicySpec, load_policy_file, policy_differences, policy_digest
from server.policy_sync import PolicyMismatch, plan_policy, read_installed_policy

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "policies/default.yaml"


def _run(cli, args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _variant(tmp_path: Path, name: str, **suite_rule) -> Path:
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["suites"]["embedded"].update(suite_rule)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=True))  # comments gone, keys reordered
    return p


def test_digest_is_of_the_parsed_policy_not_its_bytes(tmp_path):
    spec = load_policy_file(DEFAULT)
    same = _variant(tmp_path, "same.yaml")  # no comments, other key order
    spelled = tmp_path / "spelled.yaml"
    spelled.write_text(DEFAULT.read_text().replace("floor: 0.50", "floor: 0.5"))
    assert (
        policy_digest(load_policy_file(same))
        == policy_digest(spec)
        == policy_digest(load_policy_file(spelled))
    )
    changed = load_policy_file(_variant(tmp_path, "changed.yaml", floor=0.3))
    assert policy_digest(changed) != policy_digest(spec)
    assert policy_differences(spec, changed) == ["suites.embedded.floor: 0.5 -> 0.3"]


def test_plan_policy_install_first_same_refuse_or_install_change(tmp_path):
    spec = load_policy_file(DEFAULT)
    changed = load_policy_file(_variant(tmp_path, "changed.yaml", floor=0.3))
    assert plan_policy("m", "policies/m.yaml", spec, None).action == "install_first"
    assert (
        plan_policy("m", "policies/m.yaml", spec, load_policy_file(_variant(tmp_path, "s.yaml"))).action
        == "same"
    )
    with pytest.raises(PolicyMismatch) as exc:
        plan_policy("m", "policies/m.yaml", changed, spec, 3)
    msg = str(exc.value)
    assert "\n" not in msg and "m v3" in msg and "suites.embedded.floor: 0.5 -> 0.3" in msg
    assert "oprd-ci policy set m --file policies/m.yaml --reason" in msg and "gate.install_policy" in msg
    with pytest.raises(PolicyMismatch):  # asking to install without a reason is not enough
        plan_policy("m", "policies/m.yaml", changed, spec, install=True)
    plan = plan_policy("m", "policies/m.yaml", changed, spec, install=True, reason="stricter floor")
    assert plan.action == "install_change" and plan.reason == "stricter floor"


def test_gate_installs_compares_refuses_and_installs_on_request(cli, tmp_path, make_artifact, monkeypatch):
    env = server_env(tmp_path, OPRD_MLFLOW_ENABLED="false")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    db = env["OPRD_DATABASE_URL"]
    assert read_installed_policy("student", db) is None and not (tmp_path / "registry.db").exists()

    def gate(i: int, policy: Path, *extra: str):
        f = tmp_path / f"ev{i}.json"
        f.write_text(json.dumps(evidence("student", make_artifact(f"v{i}"), 0.5, n=60, seed=i)))
        out = tmp_path / f"decision{i}.json"
        r = _run(cli, ["gate", "--evidence", str(f), "--policy", str(policy), "--out", str(out), *extra])
        return r, out

    r, out = gate(1, DEFAULT)  # no policy yet: installed from the file
    assert r.exit_code == 0, r.output
    version, spec = read_installed_policy("student", db)
    assert version == 1 and spec == load_policy_file(DEFAULT)
    assert json.loads(out.read_text())["decision"]["policy_digest"] == policy_digest(spec)

    r, _ = gate(2, _variant(tmp_path, "reformatted.yaml"))  # same policy, other bytes: proceeds
    assert r.exit_code == 0, r.output and read_installed_policy("student", db)[0] == 1

    stricter = _variant(tmp_path, "stricter.yaml", floor=0.6)
    r, out = gate(3, stricter)
    assert r.exit_code == EXIT_CONFLICT and not out.exists()
    line = " ".join(r.output.split())
    assert "oprd-ci policy set student --file" in line and "suites.embedded.floor: 0.5 -> 0.6" in line
    status = json.loads(_run(cli, ["status", "student", "--json"]).output)
    assert read_installed_policy("student", db)[0] == 1  # nothing installed, and no version 3 registered
    assert status["versions"] == 2

    r, out = gate(4, stricter, "--install-policy", "--policy-reason", "floor 0.6 after review")
    assert r.exit_code == 0, r.output
    version, spec = read_installed_policy("student", db)
    assert version == 2 and spec.suites["embedded"].floor == 0.6
    decision = json.loads(out.read_text())["decision"]
    assert decision["policy_version"] == 2 and decision["policy_digest"] == policy_digest(spec)
    history = json.loads(_run(cli, ["history", "student", "--json"]).output)
    change = [e for e in history if e["action"] == "policy_set"]
    assert [e["reason"] for e in change][-1] == "floor 0.6 after review"
    shown = json.loads(_run(cli, ["policy", "show", "student", "--json"]).output)
    assert shown["digest"] == policy_digest(PolicySpec.model_validate(shown["spec"]))


def test_digests_recorded_before_min_gap_closed_still_name_the_same_policy():
    """A field added later (``min_gap_closed``) does not change the digest of a policy that leaves it unset: the
    pre-issue-19 default policy keeps the digest its decisions and gate runs recorded."""
    before = PolicySpec.model_validate(
        {
            "suites": {"embedded": {"floor": 0.2, "non_inferiority_margin": 0.05, "max_teacher_gap": 0.8,
                                    "min_problems": 50}},
            "length_tokens": {"max": 64, "max_ratio_to_champion": 1.5},
            "cost_usd": {"max_ratio_to_champion": 1.5},
            "device_hours": {"max": 24},
            "bootstrap": {"seed": 0, "n_resamples": 2000, "confidence": 0.95},
            "auto_rollback": True,
        }
    )  # fmt: skip
    assert policy_digest(before) == "sha256:e6907bf2f4a69f75fcdf42897527c6bf3c9af6a0d4949d0962c0eaa4059516ee"
    with_gap = before.model_copy(
        update={"suites": {"embedded": before.suites["embedded"].model_copy(update={"min_gap_closed": 0.75})}}
    )
    assert policy_digest(with_gap) != policy_digest(before)
