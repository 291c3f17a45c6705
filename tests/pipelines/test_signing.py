"""Signing the exported student: model-signing signature + distillation attestation on real tiny HF directories.

Keys are real P-256 keys: the session key from the ``signing_keys`` plugin ($OPRD_SIGNING_KEY, trusted by the
$OPRD_TRUSTED_KEYS_DIR keyring) and, for "re-signed by an unknown key", one generated here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_pair import tiny_params
from typer.testing import CliRunner

from oprd_ci.cli import app
from pipelines.attestation import SigningKeyMissing, sign_student
from pipelines.precheck import check_params, check_signing_key
from server.signatures import load_keyring
from trainer.export import verify_manifest, write_manifest
from trainer.signing import (
    ATTESTATION_NAME,
    KEY_ENV,
    PREDICATE_TYPE,
    SIGNATURE_NAME,
    SignatureError,
    generate_key_pair,
    sign_directory,
    verify_directory,
)

TRAIN = {"train_prompts": "a" * 64}
SUITES = {"embedded": {"digest": "b" * 64, "graders": {"math": "1"}}}


def _keyring() -> dict[str, bytes]:
    return load_keyring(Path(os.environ["OPRD_TRUSTED_KEYS_DIR"]))


@pytest.fixture
def signed(tiny_pair, tmp_path) -> dict[str, Path]:
    """Teacher, student base (each with a manifest) and a signed student copy, as the distill stage leaves them."""
    dirs = {}
    for role, src in (
        ("teacher", tiny_pair["teacher"]),
        ("base", tiny_pair["student"]),
        ("student", tiny_pair["student"]),
    ):
        dirs[role] = Path(shutil.copytree(src, tmp_path / role))
        write_manifest(dirs[role])
    params = tiny_params(
        {"teacher": dirs["teacher"], "student": dirs["base"], "prompts": tiny_pair["prompts"]}, tmp_path
    )
    att = sign_student(params, dirs["student"], TRAIN, SUITES, commit="0" * 40)
    assert att == dirs["student"] / ATTESTATION_NAME
    dirs["params"] = params  # type: ignore[assignment]
    return dirs


def test_sign_verify_and_attested_edge(signed):
    student = signed["student"]
    manifest_sha = verify_manifest(student)  # the signature files are outside the manifest identity
    v = verify_directory(student, _keyring())
    assert v.subject_sha256 == manifest_sha
    assert v.statement["predicateType"] == PREDICATE_TYPE
    assert "manifest.json" in v.files and "model.safetensors" in v.files
    p = v.predicate
    teacher_sha = json.loads((signed["teacher"] / "manifest.json").read_text())["sha256"]
    base_sha = json.loads((signed["base"] / "manifest.json").read_text())["sha256"]
    assert p["teacher"]["manifest_sha256"] == teacher_sha and p["teacher"]["signature_sha256"] is None
    assert p["student_base"]["manifest_sha256"] == base_sha
    assert p["method"] == signed["params"].distill.method
    assert p["training_data"] == TRAIN and p["eval_suites"] == SUITES
    assert p["code"]["commit"] == "0" * 40 and len(p["tokenizer_sha256"]) == 64
    assert p["model_signature_sha256"] == v.signature_sha256


def test_signed_teacher_is_chained(signed, tmp_path):
    """A teacher that has its own model.sig is named by that signature's digest too."""
    sign_directory(
        signed["teacher"], Path(os.environ[KEY_ENV]), {"method": "base"}, verify_manifest(signed["teacher"])
    )
    sign_student(signed["params"], signed["student"], TRAIN, SUITES, commit="c")
    sig = verify_directory(signed["teacher"], _keyring()).signature_sha256
    assert verify_directory(signed["student"], _keyring()).predicate["teacher"]["signature_sha256"] == sig


def test_one_changed_weight_is_refused_naming_the_file(signed):
    weights = signed["student"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    write_manifest(signed["student"])  # a forger rewrites the manifest too: only the signature can tell
    with pytest.raises(SignatureError, match=r"signature mismatch: .*model\.safetensors"):
        verify_directory(signed["student"], _keyring())


def test_unsigned_is_refused(signed):
    (signed["student"] / SIGNATURE_NAME).unlink()
    with pytest.raises(SignatureError, match=r"^unsigned: no model\.sig"):
        verify_directory(signed["student"], _keyring())


def test_resigned_by_unknown_key_is_refused(signed, tmp_path):
    other, _ = generate_key_pair(tmp_path / "other" / "k.pem")
    sign_directory(signed["student"], other, {"method": "oprd"}, verify_manifest(signed["student"]))
    with pytest.raises(SignatureError, match=r"^untrusted key: the model signature is signed by key"):
        verify_directory(signed["student"], _keyring())


def test_attestation_of_another_signature_is_refused(signed, tmp_path):
    """An attestation lifted from another signed directory does not vouch for this model.sig."""
    other = Path(shutil.copytree(signed["student"], tmp_path / "other-student"))
    sign_directory(other, Path(os.environ[KEY_ENV]), {"method": "oprd"}, verify_manifest(other))
    shutil.copyfile(other / ATTESTATION_NAME, signed["student"] / ATTESTATION_NAME)
    with pytest.raises(SignatureError, match="names another model signature"):
        verify_directory(signed["student"], _keyring())


def test_edited_attestation_is_refused(signed):
    att = signed["student"] / ATTESTATION_NAME
    bundle = json.loads(att.read_text())
    import base64

    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    stmt["predicate"]["teacher"]["manifest_sha256"] = "f" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    att.write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="attestation signature: does not verify"):
        verify_directory(signed["student"], _keyring())


def test_verify_cli_prints_the_chain_and_refuses_tampering(signed):
    runner = CliRunner()
    r = runner.invoke(app, ["verify", str(signed["student"])])
    assert r.exit_code == 0, r.output
    teacher_sha = json.loads((signed["teacher"] / "manifest.json").read_text())["sha256"]
    assert f"teacher        teacher manifest {teacher_sha}" in r.output
    assert f"student        student manifest {verify_manifest(signed['student'])}" in r.output
    assert "distilled with method oprd" in r.output and "training data train_prompts " + "a" * 64 in r.output
    (signed["student"] / SIGNATURE_NAME).unlink()
    r = runner.invoke(app, ["verify", str(signed["student"])])
    assert r.exit_code == 2 and "unsigned: no model.sig" in r.output


def test_missing_key_is_a_precheck_problem_and_stops_signing(signed, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "nowhere.pem"))
    line = check_signing_key(signed["params"])
    assert line and line.startswith("signing: no private key at") and KEY_ENV in line
    assert line in check_params(signed["params"], check_tracking=False)  # what the precheck stage prints
    with pytest.raises(SigningKeyMissing, match="no private key"):
        sign_student(signed["params"], signed["student"], TRAIN, SUITES, commit="c")
    off = signed["params"].model_copy(
        update={"signing": signed["params"].signing.model_copy(update={"sign": False})}
    )
    assert check_signing_key(off) is None
    assert sign_student(off, signed["student"], TRAIN, SUITES, commit="c") is None


def test_keys_cli_generate_add_list(tmp_path):
    runner = CliRunner()
    key = tmp_path / "k" / "signing.pem"
    r = runner.invoke(app, ["keys", "generate", "--out", str(key)])
    assert r.exit_code == 0 and oct(key.stat().st_mode & 0o777) == "0o600"
    assert runner.invoke(app, ["keys", "generate", "--out", str(key)]).exit_code == 2
    assert runner.invoke(app, ["keys", "generate", "--out", str(key), "--if-missing"]).exit_code == 0
    ring = tmp_path / "ring"
    assert (
        runner.invoke(app, ["keys", "add", str(key), "--keyring", str(ring)]).exit_code == 2
    )  # private: refused
    r = runner.invoke(app, ["keys", "add", str(key.with_suffix(".pub")), "--keyring", str(ring)])
    assert r.exit_code == 0, r.output
    fp = r.output.split()[2]
    assert runner.invoke(app, ["keys", "list", "--keyring", str(ring)]).output.strip() == fp


def test_the_signed_edge_agrees_with_the_evidence_the_gate_stage_builds(signed, tmp_path, monkeypatch):
    """What distill signs and what the gate stage submits are computed apart; under a required policy they must
    agree field by field (teacher ``name@sha``, student base, method, train digests, eval suites)."""
    from pipelines.stage_gate import build_evidence, freeze_student
    from server.schemas import EvidenceBody, EvidenceIn
    from server.signatures import evidence_mismatches

    monkeypatch.chdir(tmp_path)
    rows = [
        {"suite": "embedded", "role": role, "problem_id": f"p{i}", "k": 2, "n_correct": 1, "mean_length": 5.0}
        for role in ("student", "teacher") for i in range(3)
    ]  # fmt: skip
    (tmp_path / "pp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "suites.json").write_text(json.dumps(SUITES))
    stored, sha = freeze_student(signed["student"], tmp_path / "store")
    ev = build_evidence(signed["params"], stored, tmp_path / "pp.jsonl", tmp_path / "suites.json")
    ev["lineage"]["dataset_digests"] = {
        **TRAIN,
        "eval_embedded": SUITES["embedded"]["digest"],
    }  # as run() fills it
    body = EvidenceIn.model_validate(ev)
    v = verify_directory(stored, _keyring())  # the stored copy carries the signatures
    assert evidence_mismatches(v, sha, EvidenceBody(suites=body.suites, lineage=body.lineage)) == []

    # re-signed after an earlier freeze of the same bytes: the store gets the current signatures
    before = (stored / SIGNATURE_NAME).read_bytes()
    sign_student(signed["params"], signed["student"], TRAIN, SUITES, commit="1" * 40)
    assert freeze_student(signed["student"], tmp_path / "store") == (stored, sha)
    assert (stored / SIGNATURE_NAME).read_bytes() != before
    assert verify_directory(stored, _keyring()).predicate["code"]["commit"] == "1" * 40
