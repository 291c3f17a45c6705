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

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from pipelines.lineage import LineageEdge, LineageNode, short_digest
from pipelines.stage_distill import METRICS as DISTILL_METRICS
from pipelines.stage_distill import REF as DISTILL_REF
from pipelines.stage_distill import STUDENT_DIR
from pipelines.stage_evaluate import METRICS as EVAL_METRICS
from pipelines.stage_evaluate import REF as EVAL_REF
from pipelines.stage_io import stage_cli, write_json
from pipelines.tracking import StageRun, TrackingUnreachable, flatten_params
from pipelines.tracking_models import log_lineage, registry_fields
from trainer.config import Params, load_params
from trainer.export import verify_manifest

STORE = Path("registry-store")
PER_PROBLEM = Path("artifacts/eval/per_problem.jsonl")
EVIDENCE = Path("artifacts/gate/evidence.json")
METRICS = Path("metrics/gate.json")
ROLE_TO_EVIDENCE = {"student": "candidate", "teacher": "teacher"}
ROLLOUT_REF = Path("artifacts/rollout/rollout.mlflow.json")


class GateFailed(RuntimeError):
    """The registry call failed (usage, auth, conflict or server error); the gate stage fails."""


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
    artifact, sha = freeze_student()
    with StageRun("gate", params, upstream=[ROLLOUT_REF, DISTILL_REF, EVAL_REF]) as run:
        evidence = build_evidence(params, artifact)
        distill, rollout = run.upstream["distill"], run.upstream["rollout"]
        model_id = distill.models["student"]
        evidence.update({k: v for k, v in registry_fields(model_id, distill.run_id, artifact).items()})
        evidence["lineage"]["mlflow_run_ids"] = {s: r.run_id for s, r in run.upstream.items()}
        evidence["lineage"]["logged_model_ids"] = {**rollout.models, **distill.models}
        evidence["lineage"]["dataset_digests"] = {
            k: v
            for r in run.upstream.values()
            for k, v in r.outputs.items()
            if k.startswith(("train_", "eval_"))
        }
        write_json(EVIDENCE, evidence)
        policy = _read_policy(params.gate.policy)
        run.client.log_batch(
            run.run_id, params=_params({f"policy.{k}": v for k, v in flatten_params(policy).items()})
        )
        cmd = [sys.executable, "-m", "oprd_ci", "gate", "--evidence", str(EVIDENCE), "--out", str(METRICS),
               "--alias", params.gate.alias, "--policy", params.gate.policy,
               "--reason", f"dvc gate stage, distill.method={params.distill.method}"]  # fmt: skip
        env = dict(os.environ)
        if params.gate.registry_url:
            env["OPRD_REGISTRY_URL"] = params.gate.registry_url
        env.setdefault("OPRD_MLFLOW_TRACKING_URI", run.tracking_uri)
        env.setdefault("MLFLOW_TRACKING_URI", run.tracking_uri)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise GateFailed(f"oprd-ci gate exited with {rc} (its message is above)")
        result = json.loads(METRICS.read_text())
        decision = result["decision"]
        _log_decision(run, decision, result)
        nodes, edges = _lineage_graph(params, evidence, decision, sha)
        log_lineage(run.run_id, nodes, edges, title="oprd-ci lineage", client=run.client)
    return 0


def _read_policy(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _params(d: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def _log_decision(run: StageRun, decision: dict, result: dict) -> None:
    metrics = {"gate/promoted": 1.0 if result.get("promoted") else 0.0}
    for c in decision["criteria"]:
        key = f"gate/{c['suite'] + '/' if c.get('suite') else ''}{c['criterion']}"
        metrics[f"{key}/pass"] = 1.0 if c["status"] == "PASS" else 0.0
        if c.get("observed") is not None:
            metrics[f"{key}/observed"] = c["observed"]
    run.log_metrics(metrics)
    run.set_tags({
        "oprd.gate.verdict": decision["verdict"],
        "oprd.gate.decision_id": str(decision["id"]),
        "oprd.gate.version": str(decision["version"]),
        "oprd.gate.policy_version": str(decision["policy_version"]),
        "oprd.gate.champion_version": str(decision.get("champion_version")),
    })  # fmt: skip


def _lineage_graph(params: Params, evidence: dict, decision: dict, sha: str):
    eval_tree = json.loads(EVAL_METRICS.read_text()) if EVAL_METRICS.is_file() else {}
    acc = {role: m["avg_at_k"] for roles in eval_tree.values() for role, m in roles.items()}
    lin = evidence["lineage"]
    nodes = [
        LineageNode("teacher", "teacher", "model", {"sha256": short_digest(lin["teacher"].split("@")[-1]),
                                                   "avg@k": f"{acc.get('teacher', float('nan')):.3f}"}),
        LineageNode("base", "student base", "model", {"sha256": short_digest(lin["student_base"]),
                                                     "avg@k": f"{acc.get('student_base', float('nan')):.3f}"}),
        LineageNode("data", "train prompts", "dataset", {k: short_digest(v) for k, v in lin["dataset_digests"].items()
                                                         if k.startswith("train")}),
        LineageNode("student", f"student v{decision['version']}", "model", {
            "method": params.distill.method, "sha256": short_digest(sha),
            "avg@k": f"{acc.get('student', float('nan')):.3f}"}),
        LineageNode("eval", "evaluate", "evaluation", {k: short_digest(v) for k, v in lin["dataset_digests"].items()
                                                       if k.startswith("eval")}),
        LineageNode("gate", f"gate: {decision['verdict']}", "gate", {"decision": str(decision["id"]),
                                                                      "policy": f"v{decision['policy_version']}"}),
    ]  # fmt: skip
    edges = [
        LineageEdge("teacher", "student", "distilled_from"),
        LineageEdge("base", "student", "initialized_from"),
        LineageEdge("data", "student", "consumed"),
        LineageEdge("student", "eval", "evaluated"),
        LineageEdge("eval", "gate", "evidence"),
    ]
    return nodes, edges


def main(argv: list[str] | None = None) -> int:
    return stage_cli(
        "DVC stage: gate",
        lambda a: run(a.params, a.overrides),
        argv,
        errors=(TrackingUnreachable, GateFailed),
    )


if __name__ == "__main__":
    sys.exit(main())
