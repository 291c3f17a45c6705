"""`oprd-ci watch` end to end (docs/triggers.md): registering a new teacher version in MLflow starts exactly one
distill-and-gate cycle, a queued DVC experiment run by a real `dvc queue` worker, which ends in a registry decision
linked to that trigger; trigger -> experiment -> decision shows in `oprd-ci history` and in MLflow.

A scratch copy of the project holds the committed embedded pair (no bootstrap) and micro budgets; the MLflow store
and the registry are the project's own sqlite files, as on a laptop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipelines_dvc import _merge

REPO = Path(__file__).resolve().parents[2]
TEACHER = "oprd-teacher"
MICRO = {
    "rollout": {"num_prompts": 8, "min_cosine": -1.0},
    "distill": {"steps": 2, "prompts_per_step": 4, "n_responses": 2, "eval_every": 2, "memory_every": 2,
                "val": {"limit": 8}},
    "evaluate": {"k": 2, "batch_size": 64, "suites": [{"name": "embedded", "path": None, "limit": 10}],
                 "roles": ["teacher", "student_base", "student"]},
    "optim": {"num_threads": 1},
    "gate": {"policy": "policies/tiny.yaml"},
    "signing": {"sign": False},
    "watch": {"teacher_model": TEACHER, "failure_rows": None, "start_worker": False},
}  # fmt: skip
TINY_POLICY = """suites:
  embedded: {floor: 0.0, non_inferiority_margin: 1.0, max_teacher_gap: 1.0, min_problems: 10}
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPRD_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})  # fmt: skip
    return env


def _run(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _oprd(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "oprd_ci", *args], cwd, ok)


def _project(root: Path) -> Path:
    for name in ("pipelines", "trainer", "policies", "failures"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for name in ("artifacts/task", "artifacts/models/teacher", "artifacts/models/student-base",
                 "artifacts/models/teacher-wide", "artifacts/toolcall"):  # fmt: skip
        shutil.copytree(REPO / name, root / name)  # the committed bootstrap outputs of a fresh clone
    for name in ("artifacts/bootstrap.json", "artifacts/bootstrap-wide.json", "artifacts/precheck.ok"):
        shutil.copy(REPO / name, root / name)
    (root / "policies/tiny.yaml").write_text(TINY_POLICY)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), MICRO)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text(
        "mlflow.db\nmlartifacts/\nregistry.db*\nregistry-store/\nartifacts/checkpoints/\n"
    )
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["dvc", "commit", "-f", "bootstrap", "bootstrap_wide", "bootstrap_toolcall"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "fresh clone"], root)
    return root


def _register_teacher(root: Path, source: Path) -> str:
    """A new version of the teacher's registered model in the project's MLflow store (its source: a local
    directory, as a team registers a checkpoint); returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(TEACHER)
    return client.create_model_version(TEACHER, source=str(source)).version


@pytest.mark.slow
@pytest.mark.timeout(1200)  # one micro cycle (~2 min on a quiet 2-core machine), more when it is shared
def test_a_new_teacher_version_runs_exactly_one_cycle_linked_to_its_decision(tmp_path):
    root = _project(tmp_path / "proj")
    teacher = tmp_path / "teachers/v1"
    shutil.copytree(root / "artifacts/models/teacher", teacher)  # the "new" checkpoint (same bytes, new path)
    version = _register_teacher(root, teacher)

    first = json.loads(_oprd(["watch", "--once", "--json"], root).stdout)["pass"]
    kinds = {t["kind"]: t for t in first["new"]}
    assert kinds["teacher_version"]["key"] == f"teacher-version:{TEACHER}/{version}"
    assert kinds["teacher_manifest"]["status"] == "baseline"  # the workspace teacher: reference, no cycle
    queued = first["queued"]
    assert queued is not None and queued["kind"] == "teacher_version"
    assert queued["overrides"]["models.teacher.path"] == str(teacher)
    assert queued["overrides"]["models.teacher.revision"] == f"models:/{TEACHER}/{version}"
    trigger_id, exp = queued["trigger_id"], queued["exp_name"]

    second = json.loads(_oprd(["watch", "--once", "--json"], root).stdout)["pass"]
    assert second["new"] == [] and second["queued"] is None  # de-duplicated, and one cycle at a time
    assert second["active"]["id"] == trigger_id

    # the worker runs the cycle; the pass after it sees the decision the gate linked
    done = _oprd(["watch", "--once", "--worker", "--wait", "900", "--json"], root, ok=False)
    out = json.loads(done.stdout)
    assert done.returncode == 0, (
        f"{out}\n{_run(['dvc', 'queue', 'logs', exp], root, ok=False).stdout[-4000:]}"
    )
    t = out["trigger"]
    assert (t["id"], t["status"], t["exp_name"]) == (trigger_id, "done", exp)
    assert t["decision_id"] is not None and t["verdict"] == "PROMOTE" and t["version"] == 1
    assert out["after"]["queued"] is None
    # the gate installed policy v1 (the model had none): the policy source's first observation, a baseline
    assert [(n["kind"], n["status"]) for n in out["after"]["new"]] == [("policy", "baseline")]

    # exactly one experiment ran, and it carries the trigger
    shown = json.loads(_run(["dvc", "exp", "show", "--json", "--no-pager"], root).stdout)
    exps = [e for base in shown for e in base.get("experiments") or []]
    assert [e["name"] for e in exps] == [exp]
    params = yaml.safe_load(_run(["git", "show", f"{exps[0]['revs'][0]['rev']}:params.yaml"], root).stdout)
    assert (
        params["watch"]["trigger_id"] == trigger_id and params["watch"]["trigger_kind"] == "teacher_version"
    )
    assert params["models"]["teacher"]["revision"] == f"models:/{TEACHER}/{version}"

    # the registry: the decision is linked to the trigger, and history shows the chain
    lineage = json.loads(_oprd(["lineage", "oprd-student/1", "--json"], root).stdout)
    assert [(d["id"], d["trigger_id"]) for d in lineage["decisions"]] == [(t["decision_id"], trigger_id)]
    # the student the registry recorded was frozen in the workspace's store, not in the experiment's temporary copy
    assert Path(lineage["version"]["artifact_path"]).parent == root / "registry-store"
    chain = json.loads(_oprd(["history", "oprd-student", "--triggers", "--json"], root).stdout)
    assert [(c["kind"], c["status"]) for c in chain if c["status"] != "baseline"] == [
        ("teacher_version", "done")
    ]
    table = _oprd(["history", "oprd-student"], root).stdout
    assert exp in table and "PROMOTE" in table and "teacher_version" in table

    # MLflow: every stage run of the cycle is tagged with the trigger, and so is the model version
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`oprd.trigger_id` = '{trigger_id}'"
    )
    assert {r.data.tags["oprd.stage"] for r in runs} >= {"rollout", "distill", "evaluate", "gate"}
    assert {r.data.tags["oprd.trigger_kind"] for r in runs} == {"teacher_version"}
    gate_run = next(r for r in runs if r.data.tags["oprd.stage"] == "gate")
    assert gate_run.data.tags["oprd.gate.decision_id"] == str(t["decision_id"])
    mv = client.get_model_version("oprd-student", "1")
    assert mv.tags["oprd.trigger_id"] == str(trigger_id)

    # nothing new: a further pass queues nothing
    again = json.loads(_oprd(["watch", "--once", "--json"], root).stdout)["pass"]
    assert again["new"] == [] and again["queued"] is None and again["active"] is None


# ------------------------------------------------------------------ the sources, fast (no DVC, no experiment)
def _registry(tmp_path: Path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path}/registry.db", mlflow_enabled=False, artifact_roots=[tmp_path]
    )
    client = TestClient(create_app(settings, local_actor="test", run_reconciler=False))

    def call(method, path, body=None, params=None, missing_ok=False):
        r = client.request(method, path, json=body, params=params)
        if r.status_code == 404 and missing_ok:
            return None
        assert r.status_code < 400, r.text
        return r.json()

    return client, call


def test_manifest_bank_and_policy_sources_fire_on_change_and_their_first_observation_is_a_baseline(tmp_path):
    from pipelines.watch import PassReport, Watcher

    teacher = tmp_path / "teacher"
    shutil.copytree(REPO / "artifacts/models/teacher", teacher)
    bank = tmp_path / "bank.jsonl"
    params = {"models": {"teacher": {"path": str(teacher)}}, "failures": {"bank": str(bank)},
              "watch": {"failure_rows": 2}, "gate": {"model_name": "m"}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    client, call = _registry(tmp_path)
    watcher = Watcher(tmp_path, call)

    def observe() -> list[tuple[str, str]]:
        report = PassReport()
        watcher.observe(watcher.params(), report)
        return [(t["kind"], t["status"]) for t in report.new]

    assert observe() == [("teacher_manifest", "baseline"), ("failure_bank", "baseline")]  # no policy yet
    assert observe() == []  # nothing changed: every key is known
    bank.write_text('{"id": "a"}\n')
    assert observe() == []  # one row: below watch.failure_rows
    bank.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert observe() == [("failure_bank", "pending")]  # two rows since the baseline
    call("PUT", "/v1/models/m/policy", body={"spec": yaml.safe_load(TINY_POLICY), "reason": "first"})
    assert observe() == [("policy", "baseline")]
    call("PUT", "/v1/models/m/policy", body={"spec": {**yaml.safe_load(TINY_POLICY), "auto_rollback": True},
                                             "reason": "second"})  # fmt: skip
    manifest = json.loads((teacher / "manifest.json").read_text())
    (teacher / "manifest.json").write_text(json.dumps({**manifest, "sha256": "f" * 64}))  # a new checkpoint
    assert observe() == [("teacher_manifest", "pending"), ("policy", "pending")]
    # the three pending triggers become one cycle: the newest owns it, the others are coalesced into it
    cycle = call("POST", "/v1/models/m/triggers/claim", body={})["trigger"]
    rows = {t["id"]: t for t in call("GET", "/v1/models/m/triggers")}
    assert cycle["kind"] == "policy" and cycle["exp_name"] == f"watch-m-t{cycle['id']}"
    assert sorted(t["kind"] for t in rows.values() if t["coalesced_into"] == cycle["id"]) == [
        "failure_bank",
        "teacher_manifest",
    ]
    client.close()


def test_a_later_cycle_keeps_the_teacher_of_the_newest_teacher_version_cycle(tmp_path, monkeypatch):
    from pipelines.watch import Watcher
    from trainer.config import Params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    w = Watcher(tmp_path, call=None)
    teacher = {"models.teacher.path": "/teachers/v2", "models.teacher.revision": "models:/t/2"}
    triggers = [
        {"id": 1, "kind": "teacher_version", "status": "done", "overrides": teacher},
        {"id": 2, "kind": "failure_bank", "status": "queued", "overrides": {}},
    ]
    sets = w.exp_overrides(Params(), triggers[1], triggers)
    assert {k: sets[k] for k in teacher} == teacher
    assert (sets["watch.trigger_id"], sets["watch.trigger_kind"]) == (2, "failure_bank")
    # what a queued experiment (a temporary copy of the repository) must share with the workspace is absolute
    assert sets["gate.store"] == str(tmp_path.resolve() / "registry-store")
    assert sets["tracking.uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
