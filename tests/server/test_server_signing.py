"""The registry's signing rule at gate (422) and promote (409), over real HTTP handlers, a real SQLite registry and
real signed tiny HF directories (docs/signing.md).

The trusted key is the session key of the ``signing_keys`` plugin (its public half is the only key in
$OPRD_TRUSTED_KEYS_DIR, which ServerSettings reads); "unknown" keys are generated here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ADMIN, CI, POLICY, auth, evidence, server_env
from tiny_pair import tiny_params
from typer.testing import CliRunner

from oprd_ci.cli import app
from pipelines.attestation import distillation_predicate
from trainer.export import verify_manifest, write_manifest
from trainer.signing import (
    ATTESTATION_NAME,
    KEY_ENV,
    SIGNATURE_NAME,
    fingerprint,
    generate_key_pair,
    sign_directory,
)

NAME = "signed-student"
TRAIN = {"train_prompts": "a" * 64}
SUITES = {"embedded": {"digest": "b" * 64, "graders": {"math": "1"}}}
SIGNED_POLICY = {**POLICY, "signing": {"required": True}}


@pytest.fixture
def pair(tiny_pair, tmp_path) -> dict:
    """Teacher and student base with manifests, and params naming them (the distill stage's view)."""
    root = tmp_path / "inputs"
    dirs = {}
    for role, src in (("teacher", tiny_pair["teacher"]), ("base", tiny_pair["student"])):
        dirs[role] = Path(shutil.copytree(src, root / role))
        write_manifest(dirs[role])
    params = tiny_params(
        {"teacher": dirs["teacher"], "student": dirs["base"], "prompts": tiny_pair["prompts"]}, tmp_path
    )
    return {**dirs, "params": params, "tiny": tiny_pair}


def _student(pair, tmp_path, name: str, *, key: Path | None = None, teacher_sha: str | None = None) -> Path:
    """A signed copy of the student under the registry's artifact root (bytes differ per ``name``)."""
    d = Path(shutil.copytree(pair["tiny"]["student"], tmp_path / "artifacts" / name))
    (d / "oprd_export.json").write_text(json.dumps({"name": name}))
    write_manifest(d)
    pred = distillation_predicate(pair["params"], d, TRAIN, SUITES, commit="0" * 40)
    if teacher_sha:
        pred["teacher"]["manifest_sha256"] = teacher_sha
    sign_directory(d, key or Path(os.environ[KEY_ENV]), pred, verify_manifest(d))
    return d


def _evidence(pair, artifact: Path, acc: float = 0.5) -> dict:
    ev = evidence(NAME, artifact, acc, seed=1)
    teacher = json.loads((pair["teacher"] / "manifest.json").read_text())["sha256"]
    base = json.loads((pair["base"] / "manifest.json").read_text())["sha256"]
    ev["lineage"] = {
        "teacher": f"teacher@{teacher}",
        "student_base": base,
        "method": pair["params"].distill.method,
        "dataset_digests": TRAIN,
        "eval_suites": SUITES,
    }
    return ev


def _policy(c, spec=SIGNED_POLICY) -> None:
    r = c.put(
        f"/v1/models/{NAME}/policy", json={"spec": spec, "reason": "signed artifacts"}, headers=auth(ADMIN)
    )
    assert r.status_code == 200, r.text


def _gate(c, ev, **params):
    return c.post("/v1/gate", json=ev, headers=auth(CI), params=params)


def _promote(c, version: int, revision: int):
    body = {"version": version, "expected_revision": revision, "reason": "promote signed"}
    return c.post(f"/v1/models/{NAME}/aliases/champion/promote", json=body, headers=auth(CI))


def _tamper_one_weight(d: Path) -> None:
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    write_manifest(d)  # the forger rewrites the manifest: only the signature can tell


def test_signed_student_is_gated_and_promoted_and_verified_as_champion(
    client_no_mlflow, pair, tmp_path, monkeypatch
):
    c = client_no_mlflow
    _policy(c)
    r = _gate(c, _evidence(pair, _student(pair, tmp_path, "ok")))
    assert r.status_code == 200, r.text
    assert r.json()["decision"]["verdict"] == "PROMOTE" and r.json()["promoted"]["version"] == 1

    # `oprd-ci verify --champion`: the in-process registry on the same database names the stored directory
    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    out = CliRunner().invoke(app, ["verify", "--champion", NAME])
    assert out.exit_code == 0, out.output
    teacher = json.loads((pair["teacher"] / "manifest.json").read_text())["sha256"]
    assert f"teacher        teacher manifest {teacher}" in out.output
    assert f"student        ok manifest {r.json()['version']['manifest_sha256']}" in out.output
    assert f"gate decision  {r.json()['decision']['id']}: PROMOTE of {NAME} v1" in out.output


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", r"signing: signature mismatch: .*model\.safetensors"),
        ("unsigned", r"signing: unsigned: no model\.sig"),
        ("unknown_key", r"signing: untrusted key: the model signature is signed by key"),
        (
            "other_teacher",
            r"signing: attestation does not match: teacher: attestation names ffffffffffffffff",
        ),
    ],
)
def test_gate_refuses_with_the_reason(client_no_mlflow, pair, tmp_path, case, reason):
    c = client_no_mlflow
    _policy(c)
    if case == "other_teacher":
        d = _student(pair, tmp_path, case, teacher_sha="f" * 64)
    elif case == "unknown_key":
        d = _student(pair, tmp_path, case, key=generate_key_pair(tmp_path / "rogue" / "k.pem")[0])
    else:
        d = _student(pair, tmp_path, case)
    if case == "tampered":
        _tamper_one_weight(d)
    if case == "unsigned":
        (d / SIGNATURE_NAME).unlink()
        (d / ATTESTATION_NAME).unlink()
    r = _gate(c, _evidence(pair, d))
    assert r.status_code == 422, r.text
    import re

    assert re.search(reason, r.json()["detail"]), r.json()["detail"]
    assert c.get(f"/v1/models/{NAME}/versions", headers=auth(CI)).json() == []  # nothing registered


def test_evidence_naming_other_data_or_method_is_refused(client_no_mlflow, pair, tmp_path):
    c = client_no_mlflow
    _policy(c)
    d = _student(pair, tmp_path, "ok")
    ev = _evidence(pair, d)
    ev["lineage"]["method"] = "opd_topk"
    ev["lineage"]["dataset_digests"] = {"train_prompts": "c" * 64}
    r = _gate(c, ev)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "method: attestation 'oprd', evidence lineage.method 'opd_topk'" in detail
    assert "training data train_prompts" in detail


def test_unsigned_passes_when_the_policy_does_not_require_signing(client_no_mlflow, pair, tmp_path):
    c = client_no_mlflow
    _policy(c, POLICY)
    d = _student(pair, tmp_path, "plain")
    (d / SIGNATURE_NAME).unlink()
    assert _gate(c, _evidence(pair, d)).status_code == 200


def test_policy_pinning_a_key_the_keyring_lacks_is_refused(client_no_mlflow, pair, tmp_path):
    c = client_no_mlflow
    _, pub = generate_key_pair(tmp_path / "elsewhere" / "k.pem")
    _policy(c, {**POLICY, "signing": {"required": True, "trusted_keys": [fingerprint(pub.read_bytes())]}})
    r = _gate(c, _evidence(pair, _student(pair, tmp_path, "ok")))
    assert (
        r.status_code == 422
        and "the policy trusts key(s) the registry keyring does not hold" in r.json()["detail"]
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", r"signature mismatch: .*model\.safetensors|model\.safetensors sha256 does not match"),
        ("unsigned", r"signing: unsigned: no model\.sig"),
        ("unknown_key", r"signing: untrusted key"),
        (
            "other_teacher",
            r"signing: attestation does not match: teacher: attestation names ffffffffffffffff",
        ),
    ],
)
def test_promote_reverifies(client_no_mlflow, pair, tmp_path, case, reason):
    """v1 is gated and promoted; v2 passes the gate (promote=false) and is then changed on disk before an
    explicit promote, which re-verifies under the policy and refuses naming the mismatch."""
    import re

    c = client_no_mlflow
    _policy(c)
    assert _gate(c, _evidence(pair, _student(pair, tmp_path, "v1"))).json()["promoted"]["version"] == 1
    d = _student(pair, tmp_path, "v2")
    r = _gate(c, _evidence(pair, d, acc=0.55), promote="false")
    assert r.status_code == 200 and r.json()["decision"]["verdict"] == "PROMOTE", r.text
    stored = Path(r.json()["version"]["artifact_path"])
    if case == "tampered":
        w = stored / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 0x01
        w.write_bytes(bytes(data))
    elif case == "unsigned":
        (stored / SIGNATURE_NAME).unlink()
    elif case == "unknown_key":
        rogue = generate_key_pair(tmp_path / "rogue" / "k.pem")[0]
        sign_directory(stored, rogue, {"method": "oprd"}, verify_manifest(stored))
    else:  # re-signed by the trusted key, with an attestation that names another teacher
        pred = distillation_predicate(pair["params"], stored, TRAIN, SUITES, commit="0" * 40)
        pred["teacher"]["manifest_sha256"] = "f" * 64
        sign_directory(stored, Path(os.environ[KEY_ENV]), pred, verify_manifest(stored))
    rev = next(a["revision"] for a in c.get(f"/v1/models/{NAME}/status", headers=auth(CI)).json()["aliases"])
    r = _promote(c, 2, rev)
    assert r.status_code == 409, r.text
    assert re.search(reason, r.json()["detail"]), r.json()["detail"]


@pytest.mark.parametrize("route", ["gate", "promote"])
def test_policy_requiring_signatures_mid_request_is_a_409(
    client_no_mlflow, pair, tmp_path, monkeypatch, route
):
    """The signature is checked outside the write transaction (it hashes every file). An admin who makes the
    policy require signatures while that check ran under the old policy must not let an unsigned artifact
    through: the transaction sees another policy and answers 409 (submit again), recording nothing."""
    import server.routes.aliases
    import server.routes.versions

    c = client_no_mlflow
    _policy(c, POLICY)
    d = _student(pair, tmp_path, "v1")
    (d / SIGNATURE_NAME).unlink()
    module = server.routes.versions if route == "gate" else server.routes.aliases
    real = module.verify_signing

    def then_admin_tightens(*args, **kwargs):
        checked = real(*args, **kwargs)  # passed: the old policy does not require signing
        _policy(c, SIGNED_POLICY)  # the concurrent admin, between the check and the write transaction
        return checked

    if route == "gate":
        monkeypatch.setattr(module, "verify_signing", then_admin_tightens)
        r = _gate(c, _evidence(pair, d))
    else:
        assert _gate(c, _evidence(pair, d), promote="false").json()["decision"]["verdict"] == "PROMOTE"
        monkeypatch.setattr(module, "verify_signing", then_admin_tightens)
        r = _promote(c, 1, 0)
    assert r.status_code == 409 and "policy changed while this request verified" in r.json()["detail"], r.text
    status = c.get(f"/v1/models/{NAME}/status", headers=auth(CI)).json()
    assert status["aliases"] == [] and status["versions"] == (0 if route == "gate" else 1)
    monkeypatch.setattr(module, "verify_signing", real)  # submitted again: checked under the new policy
    r = _gate(c, _evidence(pair, d)) if route == "gate" else _promote(c, 1, 0)
    assert r.status_code in (409, 422) and "signing: unsigned" in r.json()["detail"], r.text


def test_the_signing_block_at_its_default_keeps_a_policys_digest():
    """Policies stored before the block existed keep their digest; turning it on changes it."""
    from server.policy import PolicySpec, policy_digest

    plain = policy_digest(PolicySpec.model_validate(POLICY))
    assert policy_digest(PolicySpec.model_validate({**POLICY, "signing": {"required": False}})) == plain
    assert policy_digest(PolicySpec.model_validate(SIGNED_POLICY)) != plain
