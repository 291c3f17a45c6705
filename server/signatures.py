"""The registry's signing check: model signature + distillation attestation against policy and evidence.

Called at gate (before registration: 422) and before every promotion (409), only when the model's current policy
says ``signing.required`` (docs/signing.md). Every refusal starts with ``signing:`` and names what does not match.
Like the hash check, it reads files outside any transaction.
"""

from __future__ import annotations

from pathlib import Path

from server.policy import SigningRule
from server.schemas import EvidenceBody
from trainer.signing import SignatureError, Verified, fingerprint, verify_directory


class SigningRefused(ValueError):
    """The artifact fails the policy's signing rule; the message names the mismatch (route maps it to 4xx)."""


def load_keyring(directory: Path) -> dict[str, bytes]:
    """``{fingerprint: public key PEM}`` of the ``*.pub`` / ``*.pem`` files in ``directory`` (missing: empty).
    A file that is not an EC public key is skipped: the keyring is admin-written, a stray file must not take the
    registry down (``oprd-ci keys list`` shows what it holds)."""
    keys: dict[str, bytes] = {}
    if not directory.is_dir():
        return keys
    for path in sorted([*directory.glob("*.pub"), *directory.glob("*.pem")]):
        pem = path.read_bytes()
        if b"PRIVATE KEY" in pem:
            continue  # never trust (or read further) a private key dropped here by mistake
        try:
            keys[fingerprint(pem)] = pem
        except SignatureError:
            continue
    return keys


def trusted_for(rule: SigningRule, keyring: dict[str, bytes]) -> dict[str, bytes]:
    """The keys the policy trusts: its ``trusted_keys`` (each must be in the keyring) or the whole keyring."""
    if not rule.trusted_keys:
        return keyring
    missing = [fp for fp in rule.trusted_keys if fp not in keyring]
    if missing:
        raise SigningRefused(
            "signing: the policy trusts key(s) the registry keyring does not hold: "
            + ", ".join(fp[:16] + "..." for fp in missing)
            + " (an admin adds them with `oprd-ci keys add`)"
        )
    return {fp: keyring[fp] for fp in rule.trusted_keys}


def _sha_of(identity: str | None) -> str | None:
    """The digest part of ``name@sha256`` (the evidence's teacher form) or the string itself."""
    return None if identity is None else identity.rsplit("@", 1)[-1]


def evidence_mismatches(verified: Verified, manifest_sha256: str, evidence: EvidenceBody) -> list[str]:
    """Every way the signed attestation disagrees with the artifact and the evidence (empty: they agree).
    Fields the attestation records are required in the evidence (a missing one is a mismatch: fail closed)."""
    pred = verified.predicate
    lin = evidence.lineage
    out: list[str] = []
    if verified.subject_sha256 != manifest_sha256:
        out.append(
            f"attestation subject sha256 {verified.subject_sha256[:16]}... is not this artifact's manifest "
            f"{manifest_sha256[:16]}..."
        )
    if not set(verified.files) >= {"manifest.json"}:
        out.append("model signature does not cover manifest.json")
    for field, given in (("teacher", lin.teacher), ("student_base", lin.student_base)):
        signed = (pred.get(field) or {}).get("manifest_sha256")
        if _sha_of(given) != signed:
            out.append(
                f"{field}: attestation names {str(signed)[:16]}..., evidence lineage.{field} is "
                f"{given if given is None else str(_sha_of(given))[:16] + '...'}"
            )
    if pred.get("method") != lin.method:
        out.append(f"method: attestation {pred.get('method')!r}, evidence lineage.method {lin.method!r}")
    for name, digest in sorted((pred.get("training_data") or {}).items()):
        got = lin.dataset_digests.get(name)
        if got != digest:
            out.append(f"training data {name}: attestation {str(digest)[:16]}..., evidence {got}")
    for suite, rec in sorted((pred.get("eval_suites") or {}).items()):
        if suite not in evidence.suites:
            continue  # scored elsewhere or not at all: nothing in this evidence to compare
        got = lin.eval_suites.get(suite)
        if (
            got is None
            or got.digest != rec.get("digest")
            or dict(got.graders) != dict(rec.get("graders") or {})
        ):
            seen = None if got is None else {"digest": got.digest, "graders": dict(got.graders)}
            out.append(f"eval suite {suite}: attestation {rec}, evidence lineage.eval_suites {seen}")
    return out


def check_signed(
    path: Path,
    manifest_sha256: str,
    rule: SigningRule,
    keyring: dict[str, bytes],
    evidence: EvidenceBody | None,
) -> Verified | None:
    """Verify ``path`` under ``rule`` (None when the rule does not require signing). ``evidence`` None: the
    version has none on record, which a required rule refuses. Raises :class:`SigningRefused`."""
    if not rule.required:
        return None
    try:
        verified = verify_directory(path, trusted_for(rule, keyring))
    except SignatureError as exc:
        raise SigningRefused(f"signing: {exc}") from exc
    if evidence is None:
        raise SigningRefused("signing: no evidence on record to check the attestation against")
    if problems := evidence_mismatches(verified, manifest_sha256, evidence):
        raise SigningRefused("signing: attestation does not match: " + "; ".join(problems))
    return verified
