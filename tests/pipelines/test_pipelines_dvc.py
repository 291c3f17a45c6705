"""`dvc repro` end to end on a shrunken embedded default, in a scratch git repository.

bootstrap -> rollout -> distill -> evaluate -> gate all run for real (tiny sizes); a second `dvc repro` re-runs
only the always-changed gate; an experiment with another method runs side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "task": {"num_train": 300, "num_val": 50, "num_eval": 50, "teacher_steps": 40, "student_base_step": 20,
             "eval_every": 20, "teacher_warmup_steps": 5, "teacher_batch_size": 32},
    "models": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 2}},
    "rollout": {"num_prompts": 8, "min_cosine": -1.0},
    "distill": {"steps": 4, "prompts_per_step": 4, "n_responses": 2, "eval_every": 2, "memory_every": 2},
    "evaluate": {"k": 2, "batch_size": 64},
    "optim": {"num_threads": 1},
}  # fmt: skip


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_TRACKING_URI": ""}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proj")
    for name in ("pipelines", "trainer", "policies"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text(
        "mlflow.db\nmlartifacts/\nregistry.db*\nregistry-store/\nartifacts/checkpoints/\n"
    )
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "init"], root)
    return root


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_a_no_op(project):
    first = _run(["dvc", "repro"], project)
    for stage in ("bootstrap", "rollout", "distill", "evaluate", "gate"):
        assert f"Running stage '{stage}'" in first.stdout
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["decision"]["verdict"] in {"PROMOTE", "REJECT", "INCONCLUSIVE"}
    eval_tree = json.loads((project / "metrics/eval.json").read_text())
    assert set(eval_tree["embedded"]) == {"teacher", "student_base", "student", "student_final"}
    assert json.loads((project / "metrics/distill.json").read_text())["steps"] == 4
    second = _run(["dvc", "repro"], project)
    assert "Running stage 'gate'" in second.stdout  # always_changed
    for stage in ("bootstrap", "rollout", "distill", "evaluate"):
        assert f"Running stage '{stage}'" not in second.stdout
    shown = _run(["dvc", "metrics", "show", "--json"], project)
    assert "avg_at_k" in shown.stdout
    # lineage: every stage left one MLflow run, linked to its upstream runs through the ref files
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("oprd-ci").experiment_id])
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["oprd.stage"], []).append(r)
    assert {"rollout", "distill", "evaluate", "gate"} <= set(by_stage)
    distill = by_stage["distill"][0]
    assert distill.data.tags["oprd.upstream.rollout"] == by_stage["rollout"][0].info.run_id
    assert "loss/total" in distill.data.metrics and distill.data.tags["oprd.method"] == "oprd"
    assert by_stage["gate"][0].data.tags["oprd.gate.verdict"] == gate["decision"]["verdict"]


@pytest.mark.slow
def test_dvc_experiment_with_another_method(project):
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline", "--allow-empty"], project)
    _run(["dvc", "exp", "run", "--temp", "-n", "opd", "-S", "distill.method=opd_sampled"], project)
    table = _run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert "opd_sampled" in table


def _student_sha(project: Path) -> str:
    return json.loads((project / "artifacts/models/student/manifest.json").read_text())["sha256"]


def _lock_entry(project: Path, stage: str) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"].get(stage, {})


@pytest.mark.slow
def test_killed_distill_stage_resumes_and_matches_a_clean_run(project):
    import psutil

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"].update({"steps": 10, "eval_every": 5})
    params["checkpoint"]["every"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lock_before = _lock_entry(project, "distill")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["dvc", "repro", "-s", "distill"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpts = project / "artifacts/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("*/step_00000[4-9]/COMPLETE")):
        time.sleep(0.05)
    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("*/step_*/COMPLETE")), "no checkpoint before the kill"
    assert _lock_entry(project, "distill") == lock_before, "a killed stage must not update dvc.lock"
    _run(["dvc", "repro", "-s", "distill"], project)  # resumes from the newest complete checkpoint
    resumed = _student_sha(project)
    resumed_rows = (project / "artifacts/distill/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in resumed_rows] == list(range(1, 11))
    assert not ckpts.exists() or not any(ckpts.iterdir()), "checkpoints of a finished run are removed"
    _run(["dvc", "repro", "-f", "-s", "distill"], project)  # clean, uninterrupted
    assert _student_sha(project) == resumed
