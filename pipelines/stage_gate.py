"""DVC stage ``gate`` (always changed): submit the distilled student and its evidence to the registry.

    python -m pipelines.stage_gate --params params.yaml

1. Copy the student into a content-addressed store (``registry-store/<manifest sha256>/``): the registry records
   an artifact path whose hashes it re-verifies before every promotion, and ``artifacts/models/student`` is
   rewritten by the next ``dvc repro``.
2. Build the evidence (``server.schemas.EvidenceIn``): per-problem results of the candidate and the teacher from
   ``artifacts/eval/per_problem.jsonl``, the distillation cost, lineage refs (MLflow runs, digests).
3. ``oprd-ci gate --evidence ... --out metrics/gate.json``: the registry registers the version, decides
   PROMOTE / REJECT / INCONCLUSIVE under the model's policy and, on PROMOTE, moves ``gate.alias`` in MLflow.
   With ``gate.registry_url`` (or ``$OPRD_REGISTRY_URL``) unset, the same app runs in-process on the local DB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from pipelines.stage_distill import METRICS as DISTILL_METRICS
from pipelines.stage_distill import STUDENT_DIR
from pipelines.stage_io import write_json
from trainer.config import ConfigError, Params, load_params
from trainer.export import verify_manifest

STORE = Path("registry-store")
PER_PROBLEM = Path("artifacts/eval/per_problem.jsonl")
EVIDENCE = Path("artifacts/gate/evidence.json")
METRICS = Path("metrics/gate.json")
ROLE_TO_EVIDENCE = {"student": "candidate", "teacher": "teacher"}


def freeze_student(student_dir: Path = STUDENT_DIR, store: Path = STORE) -> tuple[Path, str]:
    """Copy ``student_dir`` to ``store/<sha256>`` once (verified); returns ``(path, sha256)``."""
    sha = verify_manifest(student_dir)
    dest = store / sha
    if not dest.is_dir():
        tmp = store / f".{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(student_dir, tmp)
        tmp.rename(dest)
    verify_manifest(dest)
    return dest.resolve(), sha


def build_evidence(params: Params, artifact_path: Path, per_problem: Path = PER_PROBLEM) -> dict:
    suites: dict[str, dict[str, list]] = defaultdict(dict)
    for line in per_problem.read_text().splitlines():
        row = json.loads(line)
        role = ROLE_TO_EVIDENCE.get(row["role"])
        if role is None:
            continue
        suites[row["suite"]].setdefault(role, []).append(
            {k: row[k] for k in ("problem_id", "k", "n_correct", "mean_length")}
        )
    if not suites or any("candidate" not in s for s in suites.values()):
        raise ValueError(f"{per_problem}: no per-problem results for the distilled student (role 'student')")
    distill = json.loads(DISTILL_METRICS.read_text()) if DISTILL_METRICS.is_file() else {}
    wall = float(distill.get("wall_seconds") or 0.0)
    devices = int(distill.get("world_size") or 1)
    device_hours = wall * devices / 3600.0
    teacher_sha = _dir_sha(Path(params.models.teacher.path))
    return {
        "model": params.gate.model_name,
        "artifact_path": str(artifact_path),
        "suites": dict(suites),
        "cost": {"device_hours": device_hours, "usd": device_hours * params.tracking.price_per_device_hour},
        "lineage": {
            "teacher": f"{params.models.teacher.revision or Path(params.models.teacher.path).name}@{teacher_sha}",
            "student_base": _dir_sha(Path(params.models.student.path)),
            "dataset_digests": {},
            "mlflow_run_ids": {},
            "logged_model_ids": {},
        },
    }


def _dir_sha(path: Path) -> str:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text())["sha256"] if manifest.is_file() else "unknown"


def run(params_path: str, overrides: list[str]) -> int:
    params = load_params(params_path, overrides)
    artifact, _ = freeze_student()
    evidence = build_evidence(params, artifact)
    write_json(EVIDENCE, evidence)
    cmd = [sys.executable, "-m", "oprd_ci", "gate", "--evidence", str(EVIDENCE), "--out", str(METRICS),
           "--alias", params.gate.alias, "--policy", params.gate.policy]  # fmt: skip
    env = dict(os.environ)
    if params.gate.registry_url:
        env["OPRD_REGISTRY_URL"] = params.gate.registry_url
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DVC stage: gate")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        return run(args.params, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
