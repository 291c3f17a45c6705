"""The distillation edge as an attestation predicate, and signing the exported student (docs/signing.md).

The distill stage calls :func:`sign_student` after export: ``model-signing`` signs the student directory and a
second DSSE statement records what it was distilled from and how (:func:`distillation_predicate`). The registry
checks that predicate against the gate evidence (``server.signatures``), so every field here that the evidence
also carries is computed the way ``pipelines.stage_gate.build_evidence`` computes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.precheck import check_signing_key
from trainer.config import Params
from trainer.export import file_sha256, verify_manifest
from trainer.models import TOKENIZER_FILES
from trainer.signing import SIGNATURE_NAME, sign_directory, signing_key_path

DVC_LOCK = Path("dvc.lock")


class SigningKeyMissing(RuntimeError):
    """``signing.sign`` is on and the private key file does not exist (precheck reports it before any stage)."""


def model_ref(path: str | Path) -> dict[str, Any]:
    """A model directory as the attestation names it: its manifest sha256 (the registry's identity, as the
    evidence's ``lineage.teacher`` / ``student_base`` carry it) and the sha256 of its own ``model.sig`` when it
    has one (a signed teacher: the chain continues there)."""
    path = Path(path)
    manifest = path / "manifest.json"
    sig = path / SIGNATURE_NAME
    return {
        "name": path.name,
        "manifest_sha256": json.loads(manifest.read_text())["sha256"] if manifest.is_file() else "unknown",
        "signature_sha256": file_sha256(sig) if sig.is_file() else None,
    }


def _files_digest(directory: Path, names: tuple[str, ...]) -> str | None:
    """sha256 over ``"<name>  <sha256>\\n"`` lines of the listed files present in ``directory`` (None: none)."""
    lines = [f"{n}  {file_sha256(directory / n)}\n" for n in sorted(names) if (directory / n).is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None


def chat_template_digest(directory: Path) -> str | None:
    """sha256 of the chat template the student's tokenizer renders prompts with (a ``chat_template.*`` file or
    the ``chat_template`` key of ``tokenizer_config.json``); None when it has none (plain-prompt tasks)."""
    found = _files_digest(directory, ("chat_template.jinja", "chat_template.json"))
    if found:
        return found
    cfg = directory / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest() if template else None


def _canonical_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def distillation_predicate(
    params: Params, student: Path, training_data: dict[str, str], eval_suites: dict[str, dict], commit: str
) -> dict[str, Any]:
    """The edge teacher + student base -> student (field meanings: docs/signing.md). ``training_data`` and
    ``eval_suites`` are the digests the evidence will carry (``dataset_digests`` ``train_*`` keys,
    ``lineage.eval_suites``); ``gate_decision_id`` is null (the decision comes after signing; the registry
    links the two)."""
    d = params.distill
    cfg = params.model_dump(mode="json")
    return {
        "teacher": model_ref(params.models.teacher.path),
        "student_base": model_ref(params.models.student.path),
        "tokenizer_sha256": _files_digest(Path(student), TOKENIZER_FILES),
        "chat_template_sha256": chat_template_digest(Path(student)),
        "layer_plan": {
            "layers": cfg["distill"]["rep"]["layers"],
            "positions": d.rep.positions,
            **({"bridge": cfg["distill"]["bridge"]} if d.method == "oprd_bridge" else {}),
        },
        "method": d.method,
        "loss_config_sha256": _canonical_sha({"distill": cfg["distill"], "optim": cfg["optim"]}),
        "training_data": dict(training_data),
        "eval_suites": eval_suites,
        "code": {
            "commit": commit,
            "dvc_lock_sha256": file_sha256(DVC_LOCK) if DVC_LOCK.is_file() else None,
        },
        "gate_decision_id": None,
    }


def sign_student(
    params: Params, student: Path, training_data: dict[str, str], eval_suites: dict[str, dict], commit: str
) -> Path | None:
    """Sign ``student`` (verified against its manifest first) with the key from ``$OPRD_SIGNING_KEY``;
    returns the attestation path, or None when ``signing.sign`` is off. Raises :class:`SigningKeyMissing`."""
    if not params.signing.sign:
        return None
    if problem := check_signing_key(params):
        raise SigningKeyMissing(problem)
    predicate = distillation_predicate(params, student, training_data, eval_suites, commit)
    return sign_directory(student, signing_key_path(), predicate, subject_sha256=verify_manifest(student))
