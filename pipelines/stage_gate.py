"""DVC stage ``gate`` (always changed): submit the distilled student and its evidence to the registry.

    python -m pipelines.stage_gate --params params.yaml

1. Copy the student into a content-addressed store (``registry-store/<manifest sha256>/``): the registry records
   an artifact path whose hashes it re-verifies before every promotion, and ``artifacts/models/student`` is
   rewritten by the next ``dvc repro``.
2. Build the evidence (``server.schemas.EvidenceIn``): per-problem results of the candidate, the teacher and the
   student base (role ``student_base``: the ``min_gap_closed`` criterion) from
   ``artifacts/eval/per_problem.jsonl``, the distillation cost, lineage refs (MLflow runs, digests).
3. ``oprd-ci gate --evidence ... --out artifacts/gate/decision.json``: the registry registers the version, decides
   PROMOTE / REJECT / INCONCLUSIVE under the model's policy and, on PROMOTE, moves ``gate.alias`` in MLflow.
   With ``gate.registry_url`` (or ``$OPRD_REGISTRY_URL``) unset, the same app runs in-process on the local DB.
4. The record: ``metrics/gate.json`` (numbers only), the gate run's tags (verdict, one ``n/a``/pass/fail tag per
   criterion), ``gate/decision.md`` + ``decision.json`` artifacts, the model version's markdown description
   (verdict, criteria table, policy, cost, links to every stage run and model from
   :func:`pipelines.lineage.lineage_links`; also the gate run's note), ``lineage/lineage.png`` (a picture) and
   ``cost/trend.png`` (accuracy, tokens per response and cost per version from ``oprd-ci history --cost``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from pipelines.cost_trend import log_cost_trend, registry_cost_history
from pipelines.failures_stages import ChampionMoved, failures_evidence, fixes_lines
from pipelines.lineage import LineageEdge, LineageNode, lineage_links, short_digest, verdict_kind
from pipelines.stage_distill import METRICS as DISTILL_METRICS
from pipelines.stage_distill import REF as DISTILL_REF
from pipelines.stage_distill import STUDENT_DIR
from pipelines.stage_evaluate import METRICS as EVAL_METRICS
from pipelines.stage_evaluate import REF as EVAL_REF
from pipelines.stage_evaluate import SUITES as EVAL_SUITES
from pipelines.stage_io import stage_cli, write_json
from pipelines.suites import suite_tags
from pipelines.tracking import StageRun, TrackingUnreachable, flatten_params, repo_relative, short_commit
from pipelines.tracking_models import log_lineage, registry_fields, set_version_record
from trainer.config import Params, load_params
from trainer.export import verify_manifest
from trainer.signing import SIGNATURE_FILES

STORE = Path("registry-store")
PER_PROBLEM = Path("artifacts/eval/per_problem.jsonl")
EVIDENCE = Path("artifacts/gate/evidence.json")
METRICS = Path("metrics/gate.json")
DECISION = Path("artifacts/gate/decision.json")
ROLE_TO_EVIDENCE = {
    "student": "candidate",
    "teacher": "teacher",
    "student_base": "base",
    "champion": "champion",
}
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
    # The signature files are outside the manifest identity: the same bytes signed again (or signed now, after
    # an unsigned run) carry the current signatures into the stored copy the registry verifies.
    for name in SIGNATURE_FILES:
        src, dst = student_dir / name, dest / name
        if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            shutil.copyfile(src, dst)
    verify_manifest(dest)
    return dest.resolve(), sha


def build_evidence(
    params: Params, artifact_path: Path, per_problem: Path = PER_PROBLEM, eval_suites: Path = EVAL_SUITES
) -> dict:
    """The gate file (``server.schemas.EvidenceIn``) from the evaluate stage's outputs; ``lineage.eval_suites``
    carries each suite's digest and grader versions (``artifacts/eval/suites.json``) when the file exists."""
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
    for suite, extra in failures_evidence(params).items():  # failure-bank suites: who failed what
        if suite in suites:
            suites[suite].update(extra)
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
            "method": params.distill.method,  # a signed attestation's method must equal it (docs/signing.md)
            "dataset_digests": {},
            "mlflow_run_ids": {},
            "logged_model_ids": {},
            "eval_suites": {
                name: rec
                for name, rec in (
                    json.loads(eval_suites.read_text()) if eval_suites.is_file() else {}
                ).items()
                if name in suites
            },
        },
    }


def _dir_sha(path: Path) -> str:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text())["sha256"] if manifest.is_file() else "unknown"


def run(params_path: str, overrides: list[str]) -> int:
    params = load_params(params_path, overrides)
    artifact, sha = freeze_student(store=Path(params.gate.store))
    with StageRun("gate", params, upstream=[ROLLOUT_REF, DISTILL_REF, EVAL_REF]) as run:
        evidence = build_evidence(params, artifact)
        distill, rollout = run.upstream["distill"], run.upstream["rollout"]
        model_id = distill.models["student"]
        evidence.update({k: v for k, v in registry_fields(model_id, distill.run_id, artifact).items()})
        evidence["lineage"]["mlflow_run_ids"] = {
            **{s: r.run_id for s, r in run.upstream.items()},
            "gate": run.run_id,
        }
        evidence["lineage"]["logged_model_ids"] = {**rollout.models, **distill.models}
        evidence["lineage"]["dataset_digests"] = {
            k: v
            for r in run.upstream.values()
            for k, v in r.outputs.items()
            if k.startswith(("train_", "eval_"))
        }
        write_json(EVIDENCE, evidence)
        cmd = [sys.executable, "-m", "oprd_ci", "gate", "--evidence", str(EVIDENCE), "--out", str(DECISION),
               "--alias", params.gate.alias, "--policy", params.gate.policy,
               "--reason", f"dvc gate stage, distill.method={params.distill.method}"]  # fmt: skip
        if params.gate.install_policy:  # a differing file becomes the next audited policy version
            cmd += ["--install-policy", "--policy-reason", str(params.gate.policy_reason)]
        if params.watch.trigger_id is not None:  # the cycle `oprd-ci watch` queued: link its decision
            cmd += ["--trigger-id", str(params.watch.trigger_id)]
        env = dict(os.environ)
        if params.gate.registry_url:
            env["OPRD_REGISTRY_URL"] = params.gate.registry_url
        env.setdefault("OPRD_MLFLOW_TRACKING_URI", run.tracking_uri)
        env.setdefault("MLFLOW_TRACKING_URI", run.tracking_uri)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise GateFailed(f"oprd-ci gate exited with {rc} (its message is above)")
        result = json.loads(DECISION.read_text())
        version = result.get("version") or {}
        if version.get(
            "artifact_path"
        ):  # the registry's frozen copy: recorded repo-relative, like every path
            version["artifact_path"] = repo_relative(version["artifact_path"])
            write_json(DECISION, result)
        decision = result["decision"]
        _log_policy_used(run, params.gate.policy, decision)
        write_json(METRICS, gate_metrics(result))
        _log_decision(run, decision, result)
        run.set_tags(suite_tags(evidence["lineage"]["eval_suites"]))
        links = stage_links(run, params, int(decision["version"]))
        record = decision_markdown(params, decision, result, evidence, links)
        run.client.log_text(run.run_id, record, "gate/decision.md")
        run.client.log_artifact(run.run_id, str(DECISION), "gate")
        run.set_tags({"mlflow.note.content": record})
        run.client.update_run(
            run.run_id, name=f"gate {decision['verdict']} v{decision['version']} {short_commit()}"
        )
        set_version_record(
            params.gate.model_name, int(decision["version"]), description=record, model_id=model_id,
            tags={"oprd.gate.verdict": decision["verdict"], "oprd.gate.decision_id": str(decision["id"]),
                  "oprd.gate.run_id": run.run_id, "oprd.gate.policy_version": str(decision["policy_version"]),
                  **trigger_tags(params)},
            client=run.client,
        )  # fmt: skip
        nodes, edges = _lineage_graph(params, evidence, decision, sha)
        log_lineage(
            run.run_id, nodes, edges, client=run.client,
            title=f"{params.gate.model_name} v{decision['version']}: {decision['verdict']}",
        )  # fmt: skip
        _log_cost_trend(run, params, decision, env)
    return 0


def trigger_tags(params: Params) -> dict[str, str]:
    """``oprd.trigger_id`` / ``oprd.trigger_kind`` of the cycle `oprd-ci watch` queued (none otherwise): on the
    model version too, so MLflow shows trigger -> run -> version -> decision."""
    w = params.watch
    return (
        {}
        if w.trigger_id is None
        else {"oprd.trigger_id": str(w.trigger_id), "oprd.trigger_kind": str(w.trigger_kind)}
    )


def _log_cost_trend(run: StageRun, params: Params, decision: dict, env: dict[str, str]) -> None:
    """``cost/trend.png`` (+ ``cost/history.json``) on the gate run from the registry's ``history --cost``. The
    decision is already recorded when this runs, so a registry read that fails is reported, not fatal."""
    try:
        rows = registry_cost_history(params.gate.model_name, params.gate.alias, env)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"gate: cost trend not logged: {exc}", file=sys.stderr)
        return
    title = f"{params.gate.model_name}: cost over time (v{decision['version']} {decision['verdict']})"
    log_cost_trend(run.client, run.run_id, rows, int(decision["version"]), title=title)


def stage_links(run: StageRun, params: Params, version: int) -> dict[str, str]:
    """The version page's links (relative ``#/...``: the MLflow UI renders the description and resolves them
    against its own address, whatever host and port it is served on), from the one link plan
    :func:`pipelines.lineage.lineage_links` that ``oprd-ci lineage`` also uses."""
    runs = {stage: ref.run_id for stage, ref in run.upstream.items()} | {"gate": run.run_id}
    models = {**run.upstream["rollout"].models, **run.upstream["distill"].models}
    return lineage_links(
        "", model_name=params.gate.model_name, version=version, experiment_id=run.experiment_id,
        run_ids=runs, model_ids=models,
    )  # fmt: skip


def gate_metrics(result: dict) -> dict[str, float]:
    """``metrics/gate.json``: numbers only (``dvc metrics show``); the verdict text and the criteria table are
    in ``artifacts/gate/decision.json``, the gate run's tags and the model version's description."""
    d = result["decision"]
    statuses = [c["status"] for c in d["criteria"]]
    out = {
        "promote": int(d["verdict"] == "PROMOTE"),
        "alias_moved": int(bool(result.get("promoted"))),
        "version": int(d["version"]),
        "decision_id": int(d["id"]),
        "policy_version": int(d["policy_version"]),
        **{
            f"criteria_{s.lower()}": statuses.count(s)
            for s in ("PASS", "FAIL", "INCONCLUSIVE", "NOT_APPLICABLE")
        },
    }
    if d.get("champion_version") is not None:
        out["champion_version"] = int(d["champion_version"])
    return out


_STATUS_TEXT = {"PASS": "pass", "FAIL": "**FAIL**", "INCONCLUSIVE": "inconclusive", "NOT_APPLICABLE": "n/a"}


def decision_markdown(
    params: Params, decision: dict, result: dict, evidence: dict, links: dict[str, str]
) -> str:
    """The gate record as markdown (model-version description and gate run note): verdict, policy, cost, the
    criteria table (criteria that did not apply read "n/a") and links to every stage run and model."""
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    champion = decision.get("champion_version")
    moved = result.get("promoted")
    lines = [
        f"**{decision['verdict']}**: {decision['model']} v{decision['version']} under policy "
        f"v{decision['policy_version']} `{short_digest(decision['policy_digest'])}` (decision {decision['id']}; "
        "champion before: "
        f"{'v' + str(champion) if champion is not None else 'none'}"
        + (f"; `{moved['alias']}` now points here" if moved else "")
        + ").",
        "",
        "| criterion | suite | status | observed | threshold | detail |",
        "|---|---|---|---|---|---|",
    ]
    for c in decision["criteria"]:
        lines.append(
            f"| {c['criterion']} | {c.get('suite') or ''} | {_STATUS_TEXT.get(c['status'], c['status'])} | "
            f"{fmt(c.get('observed'))} | {fmt(c.get('threshold'))} | {str(c.get('detail') or '').replace('|', '/')} |"
        )
    if fixes := fixes_lines(decision["criteria"]):
        lines += ["", "Failure bank:", *fixes]
    cost = evidence.get("cost") or {}
    lin = evidence["lineage"]
    digests = lin.get("dataset_digests", {})
    train = ", ".join(f"{k} `{short_digest(v)}`" for k, v in digests.items() if k.startswith("train"))
    evals = ", ".join(f"{k} `{short_digest(v)}`" for k, v in digests.items() if k.startswith("eval"))
    lines += [
        "",
        f"Cost: {cost.get('device_hours', 0.0):.4g} device-hours, ${cost.get('usd', 0.0):.4g}. "
        f"Method: `{params.distill.method}`.",
        "",
        "Lineage:",
        f"- teacher: [teacher `{short_digest(lin['teacher'].split('@')[-1])}`]({links['teacher']})",
        f"- student base: [student base `{short_digest(lin['student_base'])}`]({links['student_base']})",
        f"- student: [student `{short_digest(result['version']['manifest_sha256'])}`]({links['student']})",
        f"- training data: [{train or 'train prompts'}]({links['training_data']}) (dataset inputs of the distill run)",
        f"- distill run: [distill {params.distill.method}]({links['distill']}), "
        f"rollout run: [rollout]({links['rollout']})",
        f"- evaluation: [evaluate run]({links['evaluate']}) on {evals or 'the eval suites'}",
        *_grader_lines(lin.get("eval_suites") or {}),
        f"- gate decision: [gate {decision['verdict']} (decision {decision['id']})]({links['gate']}), "
        f"lineage picture: [lineage.png]({links['picture']})",
        "",
        f"The same links from a terminal: `oprd-ci lineage {decision['model']}/{decision['version']}`.",
    ]
    return "\n".join(lines) + "\n"


def _grader_lines(records: dict) -> list[str]:
    """One line per suite: which grader(s), at which version, scored which file (by digest)."""
    return [
        f"- suite {name}: graded by "
        + ", ".join(f"`{g}` v{v}" for g, v in rec.get("graders", {}).items())
        + f" on file `{short_digest(rec['digest'])}`"
        for name, rec in records.items()
    ]


def _log_policy_used(run: StageRun, path: str, decision: dict) -> None:
    """Log the policy the registry *decided under* (version and digest from the decision record) as the gate
    run's ``policy.version`` / ``policy.digest`` params and tags. Its settings are logged as ``policy.*`` params
    only when the params file's parsed policy has that digest (``oprd-ci gate`` made sure it does); otherwise the
    run says the file differs rather than recording settings the decision did not use."""
    from server.policy import load_policy_file, policy_digest

    used = decision["policy_digest"]
    spec = load_policy_file(path)
    same = policy_digest(spec) == used
    logged = {"policy.version": decision["policy_version"], "policy.digest": used}
    if same:
        logged.update({f"policy.{k}": v for k, v in flatten_params(spec.model_dump(mode="json")).items()})
    run.client.log_batch(run.run_id, params=_params(logged))
    run.set_tags({
        "oprd.gate.policy_digest": used,
        "oprd.gate.policy_file": repo_relative(path),
        "oprd.gate.policy_file_matches": str(same).lower(),
    })  # fmt: skip


def _params(d: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def _log_decision(run: StageRun, decision: dict, result: dict) -> None:
    metrics = {"gate/promote": 1.0 if decision["verdict"] == "PROMOTE" else 0.0,
               "gate/alias_moved": 1.0 if result.get("promoted") else 0.0}  # fmt: skip
    tags = {}
    for c in decision["criteria"]:
        key = f"gate/{c['suite'] + '/' if c.get('suite') else ''}{c['criterion']}"
        tags[f"oprd.{key.replace('/', '.')}"] = _STATUS_TEXT.get(c["status"], c["status"]).strip("*").lower()
        if c["status"] == "NOT_APPLICABLE":
            continue  # nothing was compared: no pass/fail number, the tag says "n/a"
        metrics[f"{key}/pass"] = 1.0 if c["status"] == "PASS" else 0.0
        if c.get("observed") is not None:
            metrics[f"{key}/observed"] = c["observed"]
    run.log_metrics(metrics)
    run.set_tags({
        **tags,
        "oprd.gate.verdict": decision["verdict"],
        "oprd.gate.decision_id": str(decision["id"]),
        "oprd.gate.version": str(decision["version"]),
        "oprd.gate.policy_version": str(decision["policy_version"]),
        "oprd.gate.champion_version": str(decision.get("champion_version") or "none"),
    })  # fmt: skip


def _lineage_graph(params: Params, evidence: dict, decision: dict, sha: str):
    """Nodes and edges of the lineage picture (no links: the picture is an image; the links are on the version
    page)."""
    eval_tree = json.loads(EVAL_METRICS.read_text()) if EVAL_METRICS.is_file() else {}
    acc = {role: m["avg_at_k"] for roles in eval_tree.values() for role, m in roles.items()}
    lin = evidence["lineage"]
    digests = lin["dataset_digests"]
    cost = evidence.get("cost") or {}
    nodes = [
        LineageNode("teacher", "teacher", "model", {"sha256": short_digest(lin["teacher"].split("@")[-1]),
                    "avg@k": f"{acc.get('teacher', float('nan')):.3f}"}),
        LineageNode("base", "student base", "model", {"sha256": short_digest(lin["student_base"]),
                    "avg@k": f"{acc.get('student_base', float('nan')):.3f}"}),
        LineageNode("data", "train prompts", "dataset",
                    {k: short_digest(v) for k, v in digests.items() if k.startswith("train")}),
        LineageNode("distill", f"distill run ({params.distill.method})", "run",
                    {"cost $": f"{cost.get('usd', 0.0):.4g}", "device-h": f"{cost.get('device_hours', 0.0):.3g}"}),
        LineageNode("student", f"student v{decision['version']}", "model", {
            "sha256": short_digest(sha), "avg@k": f"{acc.get('student', float('nan')):.3f}"}),
        LineageNode("eval", "evaluate", "evaluation",
                    {k: short_digest(v) for k, v in digests.items() if k.startswith("eval")}),
        LineageNode("gate", f"gate: {decision['verdict']}", verdict_kind(decision["verdict"]),
                    {"decision": str(decision["id"]), "policy": f"v{decision['policy_version']}"}),
    ]  # fmt: skip
    edges = [
        LineageEdge("teacher", "distill", "distilled_from"),
        LineageEdge("base", "distill", "initialized_from"),
        LineageEdge("data", "distill", "consumed"),
        LineageEdge("distill", "student", "produced"),
        LineageEdge("student", "eval", "evaluated"),
        LineageEdge("eval", "gate", "evidence"),
    ]
    return nodes, edges


def main(argv: list[str] | None = None) -> int:
    return stage_cli(
        "DVC stage: gate",
        lambda a: run(a.params, a.overrides),
        argv,
        errors=(TrackingUnreachable, GateFailed, ChampionMoved),
    )


if __name__ == "__main__":
    sys.exit(main())
