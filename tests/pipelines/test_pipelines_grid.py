"""The methods grid end to end on a micro budget: queue real DVC experiments, run them, collect the table.

A scratch git+DVC project with the shrunken embedded default (as test_pipelines_dvc.py) runs a 5-cell grid (OPRD at
two rates, OPD sampled-token at one, two seeds at the chosen rates) through ``dvc exp run --queue`` and ``dvc queue``;
the collected table must hold exactly those cells, with the numbers DVC itself reads from each experiment.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_pipelines_dvc import _merge

from pipelines.grid import cell_name, cells, collect, load_spec, queue, queue_states

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "task": {"num_train": 300, "num_val": 50, "num_eval": 50, "teacher_steps": 40, "student_base_step": 20,
             "eval_every": 20, "teacher_warmup_steps": 5, "teacher_batch_size": 32},
    "models": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 2}},
    "rollout": {"num_prompts": 8, "min_cosine": -1.0},
    "distill": {"steps": 4, "prompts_per_step": 4, "n_responses": 2, "eval_every": 2, "memory_every": 0,
                "val": {"protocol": "evaluate", "limit": 12}},
    "evaluate": {"k": 2, "batch_size": 64},
    "optim": {"num_threads": 1},
}  # fmt: skip
SPEC = {
    "prefix": "g",
    "seeds": [0, 1],
    "set": ["distill.steps=4"],
    "methods": {
        "oprd": {"lrs": [1e-3, 3e-3], "best_lr": 1e-3},
        "opd_sampled": {"lrs": [1e-4], "best_lr": 1e-4},
    },
}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    for name in ("pipelines", "trainer", "policies", "failures"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "grid.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nartifacts/checkpoints/\n")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(
        ["dvc", "repro", "bootstrap"], root
    )  # its outputs are git-tracked: the experiments' baseline holds them
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "baseline"], root)
    return root


def _wait_for_queue(root: Path, timeout_s: float = 1500) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = queue_states(root)
        if not any(s in ("queued", "running") for s in states.values()):
            failed = [n for n, s in states.items() if s != "success"]
            assert not failed, f"grid cells failed: {failed}\n{_run(['dvc', 'queue', 'status'], root)}"
            return
        time.sleep(5)
    pytest.fail("the grid did not finish in time")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 5 queued DVC experiments of 3 stages each, plus the tiny bootstrap
def test_grid_queues_runs_and_collects_every_cell(grid_project, tmp_path, monkeypatch):
    root = grid_project
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = load_spec(root / "grid.yaml")
    report = queue(spec, root)
    assert [status for _, status in report] == ["queued"] * 5
    # queue order: each method at its chosen rate (seed 0), the other seed, then the rest of the sweep
    assert [cell_name(spec, c) for c, _ in report] == [
        "g-oprd-lr1e-03-s0", "g-opdsampled-lr1e-04-s0", "g-oprd-lr1e-03-s1", "g-opdsampled-lr1e-04-s1",
        "g-oprd-lr3e-03-s0",
    ]  # fmt: skip
    _run(["dvc", "queue", "start", "-j", "2"], root)
    _wait_for_queue(root)

    out = collect(spec, root, tmp_path / "methods")
    assert out["complete"] and out["missing"] == []
    assert {c["name"] for c in out["cells"]} == {cell_name(spec, c) for c in cells(spec)}

    # The numbers are the experiments' own: DVC's reading of each experiment's metrics/eval.json.
    shown = json.loads(_run(["dvc", "exp", "show", "--json", "--no-pager"], root))
    dvc_eval = {
        exp["name"]: exp["revs"][0]["data"]["metrics"]["metrics/eval.json"]["data"]["embedded"]
        for base in shown for exp in base.get("experiments") or []
    }  # fmt: skip
    assert set(dvc_eval) == {c["name"] for c in out["cells"]}
    # Only the first cell scored the teacher and the student base (evaluate.roles); every cell scored both students.
    assert set(dvc_eval["g-oprd-lr1e-03-s0"]) == {"teacher", "student_base", "student", "student_final"}
    assert all(
        set(v) == {"student", "student_final"} for n, v in dvc_eval.items() if n != "g-oprd-lr1e-03-s0"
    )
    ref = dvc_eval["g-oprd-lr1e-03-s0"]
    assert out["reference"]["teacher"]["avg_at_k"] == ref["teacher"]["avg_at_k"]
    t, b = ref["teacher"]["avg_at_k"], ref["student_base"]["avg_at_k"]

    for method, lr in (("oprd", 1e-3), ("opd_sampled", 1e-4)):
        entry = out["methods"][method]
        assert entry["lr"] == lr
        for role in ("student", "student_final"):
            per_seed = entry["seeds"][role]
            assert set(per_seed) == {"0", "1"}
            expected = [
                dvc_eval[f"g-{method.replace('_', '')}-lr{lr:.0e}-s{s}"][role]["avg_at_k"] for s in (0, 1)
            ]
            assert [per_seed[s]["avg_at_k"] for s in ("0", "1")] == expected
            stat = entry[role]["avg_at_k"]
            assert stat["n"] == 2 and math.isclose(stat["mean"], statistics.fmean(expected))
            assert math.isclose(stat["sd"], statistics.stdev(expected), abs_tol=1e-12)
            if t != b:
                assert math.isclose(per_seed["0"]["gap_closed"], (expected[0] - b) / (t - b))
    # distill.json of each cell: best-on-validation step and the final validation score under the eval protocol
    for c in out["cells"]:
        assert c["distill"]["steps"] == 4  # distill.val.protocol is the default, evaluate
        assert c["distill"]["best_step"] in (2, 4) and c["distill"]["final_val_accuracy"] is not None

    sweep = [(r["method"], r["lr"]) for r in out["sweep"]]
    assert sweep == [("oprd", 1e-3), ("oprd", 3e-3), ("opd_sampled", 1e-4)]
    oprd_3e3 = next(r for r in out["sweep"] if r["lr"] == 3e-3)
    assert oprd_3e3["student_final"]["avg_at_k"] == dvc_eval["g-oprd-lr3e-03-s0"]["student_final"]["avg_at_k"]

    md = (tmp_path / "methods" / "results.md").read_text()
    assert "Partial grid" not in md
    oprd_row = next(line for line in md.splitlines() if line.startswith("| oprd | 0.001 |"))
    assert " / ".join(
        f"{100 * v['avg_at_k']:.1f}" for v in out["methods"]["oprd"]["seeds"]["student"].values()
    ) in (oprd_row)
    assert (tmp_path / "methods" / "results.png").stat().st_size > 10_000

    # Re-queueing a finished grid queues nothing (a stopped grid resumes where it stopped).
    assert [status for _, status in queue(spec, root)] == ["done"] * 5


# ------------------------------------------------------------------------------------------ spec (fast, no DVC)
def test_spec_errors_are_one_readable_line_each(tmp_path):
    from trainer.config import ConfigError

    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"methods": {"oprd": {"lrs": [1e-3], "best_lr": 3e-4}}}))
    with pytest.raises(ConfigError, match=r"best_lr 0.0003 is not one of lrs"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump({"seed": [0], "methods": {"oprd": {"lrs": [1e-3], "best_lr": 1e-3}}}))
    with pytest.raises(ConfigError, match=r"seed: unknown key; did you mean 'seeds'"):
        load_spec(bad)
    bad.write_text(
        yaml.safe_dump({"set": ["optim.lr=1"], "methods": {"oprd": {"lrs": [1e-3], "best_lr": 1e-3}}})
    )
    with pytest.raises(ConfigError, match=r"must not override what the grid varies"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump({"methods": {"opd": {"lrs": [1e-3], "best_lr": 1e-3}}}))
    with pytest.raises(ConfigError, match=r"methods\.opd"):
        load_spec(bad)


def test_the_committed_spec_covers_every_method_with_three_rates_and_seeds():
    from pipelines.grid import queue_command
    from trainer.methods import METHODS

    spec = load_spec(REPO / "benchmarks/methods/grid.yaml")
    # every method that distills a same-size pair directly (oprd_bridge needs its bank stage and a wider teacher)
    compared = {name for name, m in METHODS.items() if not m.bridge}
    assert set(spec.methods) == compared and len(spec.seeds) == 3
    assert all(len(s.lrs) == 3 for s in spec.methods.values())
    grid = cells(spec)
    assert len(grid) == len(spec.methods) * (3 + 2)
    assert [c.reference for c in grid] == [True] + [False] * (len(grid) - 1)
    first, second = queue_command(spec, grid[0]), queue_command(spec, grid[1])
    assert "evaluate.roles=[teacher,student_base,student,student_final]" in first
    assert "evaluate.roles=[student,student_final]" in second
    assert first[-1] == "evaluate" and "distill.steps=300" in first
    assert any(a.startswith("checkpoint.dir=/") for a in first)  # outside DVC's temporary copies


# ------------------------------------------------------------------- recorded cells (fast, no DVC: pure planning)
def _metrics(acc: float) -> dict:
    return {"avg_at_k": acc, "avg_at_k_ci95": [acc - 0.02, acc + 0.02], "pass_at_k": min(1.0, acc + 0.1),
            "mean_length": 20.0, "p95_length": 30.0, "dist_4g": 0.5, "n_problems": 100, "k": 4}  # fmt: skip


def _experiment(method: str, lr: float, seed: int, acc: float, *, reference: bool = False, steps: int = 300):
    """What :func:`read_experiments` returns for one finished cell."""
    ev = {"student": _metrics(acc), "student_final": _metrics(acc - 0.01)}
    if reference:
        ev |= {"teacher": _metrics(0.9), "student_base": _metrics(0.1)}
    params = {
        "distill": {"method": method, "seed": seed, "steps": steps, "prompts_per_step": 16, "n_responses": 4,
                    "eval_every": 25, "val": {"protocol": "evaluate", "limit": None}},
        "optim": {"lr": lr}, "rollout": {"temperature": 1.0, "max_new_tokens": 42},
        "evaluate": {"k": 4, "temperature": 0.7, "top_p": 0.95, "seed": 1234},
    }  # fmt: skip
    distill = {"best_step": 300, "best_val_accuracy": acc, "final_val_accuracy": acc, "steps": steps}
    return {"state": "success", "rev": f"rev-{method}-{lr:g}-{seed}", "baseline": "base0", "params": params,
            "metrics": {"metrics/eval.json": {"embedded": ev}, "metrics/distill.json": distill}}  # fmt: skip


def _spec(best_lr: float, **extra):
    from pipelines.grid import GridSpec

    return GridSpec.model_validate({"prefix": "g", "seeds": [0, 1], "set": ["distill.steps=300"], **extra,
                                    "methods": {"oprd": {"lrs": [1e-3, 3e-3], "best_lr": best_lr}}})  # fmt: skip


def _first_grid(tmp_path: Path) -> Path:
    """A finished grid at best_lr 1e-3 (3 cells), collected into results.json as `oprd-ci grid collect` writes it."""
    from pipelines.grid import build_results

    exps = {
        "g-oprd-lr1e-03-s0": _experiment("oprd", 1e-3, 0, 0.80, reference=True),
        "g-oprd-lr1e-03-s1": _experiment("oprd", 1e-3, 1, 0.82),
        "g-oprd-lr3e-03-s0": _experiment("oprd", 3e-3, 0, 0.86),
    }
    doc = build_results(_spec(1e-3), exps)
    assert doc["complete"] and doc["sources"] == {"experiment": 3, "recorded": 0}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_new_best_lr_runs_only_the_new_seeds_and_merges_the_recorded_cells(tmp_path):
    from pipelines.grid import build_results, load_recorded, plan, render_markdown

    results = _first_grid(tmp_path)
    spec = _spec(3e-3)  # the sweep's validation preferred 3e-3: the seeds move there
    recorded = load_recorded(results, spec)
    # the seed-1 cell of the former rate is not in the new grid; the two seed-0 cells are
    assert set(recorded.cells) == {"g-oprd-lr3e-03-s0", "g-oprd-lr1e-03-s0"}
    assert [(cell_name(spec, c), status) for c, status in plan(spec, {}, {}, recorded)] == [
        ("g-oprd-lr3e-03-s0", "recorded"), ("g-oprd-lr3e-03-s1", "run"), ("g-oprd-lr1e-03-s0", "recorded"),
    ]  # fmt: skip
    # without the recorded cells every cell needs a run; a queued cell is pending; a failed one is retried
    assert [s for _, s in plan(spec, {}, {})] == ["run"] * 3
    failed = {"g-oprd-lr3e-03-s1": {"state": "failed", "metrics": {}}}
    assert [s for _, s in plan(spec, failed, {"g-oprd-lr1e-03-s0": "queued"}, recorded)] == [
        "recorded", "retry", "pending",
    ]  # fmt: skip

    new = {"g-oprd-lr3e-03-s1": _experiment("oprd", 3e-3, 1, 0.90)}
    doc = build_results(spec, new, recorded=recorded)
    assert doc["complete"] and doc["sources"] == {"experiment": 1, "recorded": 2}
    by_name = {c["name"]: c for c in doc["cells"]}
    assert by_name["g-oprd-lr3e-03-s1"]["source"] == "experiment"
    assert by_name["g-oprd-lr3e-03-s1"]["rev"] == "rev-oprd-0.003-1"
    assert by_name["g-oprd-lr3e-03-s0"]["source"] == "recorded"
    entry = doc["methods"]["oprd"]
    assert entry["lr"] == 3e-3 and entry["lr_selected_on_val"] == 3e-3
    assert [entry["seeds"]["student"][s]["avg_at_k"] for s in ("0", "1")] == [0.86, 0.90]
    assert math.isclose(entry["student"]["avg_at_k"]["mean"], 0.88)
    # the reference (teacher, student base) comes from the recorded cell that evaluated them
    assert doc["reference"]["teacher"]["avg_at_k"] == 0.9
    assert math.isclose(entry["seeds"]["student"]["1"]["gap_closed"], (0.90 - 0.1) / (0.9 - 0.1))
    assert doc["settings"]["steps"] == 300
    assert "Cells: 1 run as DVC experiments of this collect (baseline commit base0); 2 recorded" in (
        render_markdown(doc)
    )

    # an experiment of a recorded cell's name wins over the record
    rerun = {**new, "g-oprd-lr3e-03-s0": _experiment("oprd", 3e-3, 0, 0.70)}
    doc = build_results(spec, rerun, recorded=recorded)
    assert doc["sources"] == {"experiment": 2, "recorded": 1}
    assert doc["methods"]["oprd"]["seeds"]["student"]["0"]["avg_at_k"] == 0.70
    # and the merged document is itself a valid record for the next change
    again = tmp_path / "again.json"
    again.write_text(json.dumps(doc))
    assert set(load_recorded(again, spec).cells) == set(by_name)


def test_recorded_cells_of_another_budget_are_refused(tmp_path):
    from pipelines.grid import Recorded, build_results, load_recorded
    from trainer.config import ConfigError

    results = _first_grid(tmp_path)
    with pytest.raises(ConfigError, match=r"other shared settings \(set: .*--fresh"):
        load_recorded(results, _spec(3e-3, set=["distill.steps=600"]))
    assert load_recorded(tmp_path / "absent.json", _spec(3e-3)) == Recorded()
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a grid results file"):
        load_recorded(tmp_path / "junk.json", _spec(3e-3))
    # params.yaml changed under the same -S set: the new experiments' settings disagree with the record
    recorded = load_recorded(results, _spec(3e-3))
    other = {"g-oprd-lr3e-03-s1": _experiment("oprd", 3e-3, 1, 0.9, steps=200)}
    with pytest.raises(ValueError, match=r"other settings than the recorded cells.*'steps': \(300, 200\)"):
        build_results(_spec(3e-3), other, recorded=recorded)


def test_peer_rows_at_several_rates_are_named_by_their_rate(tmp_path):
    from pipelines.grid import build_results, load_recorded, render_markdown

    spec = _spec(1e-3)
    recorded = load_recorded(_first_grid(tmp_path), spec)
    peer = {"name": "TRL DistillationTrainer (beta=1)", "seed": 0, "eval": _metrics(0.5)}
    doc = build_results(spec, {}, recorded=recorded, peers=[{**peer, "lr": 1e-4}, {**peer, "lr": 3e-4}])
    assert list(doc["peers"]) == [
        "TRL DistillationTrainer (beta=1), lr 0.0001", "TRL DistillationTrainer (beta=1), lr 0.0003",
    ]  # fmt: skip
    assert math.isclose(doc["peers"]["TRL DistillationTrainer (beta=1), lr 0.0003"]["row"]["gap_closed"], 0.5)
    md = render_markdown(doc)
    assert "| TRL DistillationTrainer (beta=1), lr 0.0003 | 0.0003 | 1 |" in md
    # a single peer keeps its own name
    assert list(build_results(spec, {}, recorded=recorded, peers=[{**peer, "lr": 1e-4}])["peers"]) == [
        peer["name"]
    ]


@pytest.mark.timeout(900)
def test_trl_peer_script_trains_exports_and_scores_a_peer_row(tmp_path):
    """scripts/trl_peer.py on the committed pair at a micro budget: TRL trains the student (its weights move), the
    export passes the manifest check and loads with stock transformers, and the row has what `collect` reads."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from trainer.export import verify_manifest

    out, student = tmp_path / "peer.json", tmp_path / "trl-student"
    sets = ["distill.steps=2", "distill.prompts_per_step=2", "distill.n_responses=2", "evaluate.k=1",
            "evaluate.suites=[{name: embedded, limit: 8}]"]  # fmt: skip
    cmd = [
        sys.executable,
        "scripts/trl_peer.py",
        "--lr",
        "1e-3",
        "--student-dir",
        str(student),
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [*cmd, *(a for s in sets for a in ("--set", s))], cwd=REPO, capture_output=True, text=True, timeout=800,
        env={**_env(), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["steps"] == 2 and row["lr"] == 1e-3 and row["batch"]["n_responses"] == 2
    assert row["eval"]["n_problems"] == 8 and row["eval"]["k"] == 1 and 0 <= row["eval"]["avg_at_k"] <= 1
    verify_manifest(student)
    base_dir = REPO / yaml.safe_load((REPO / "params.yaml").read_text())["models"]["student"]["path"]
    trained = AutoModelForCausalLM.from_pretrained(student).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert set(trained) == set(base)
    assert any(not torch.equal(trained[k], base[k]) for k in base), "TRL did not update the student"


def test_trl_peer_without_a_rate_or_a_spec_is_one_error_line(tmp_path):
    import sys

    run = subprocess.run(
        [sys.executable, "scripts/trl_peer.py", "--spec", str(tmp_path / "absent.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**_env(), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 2 and not (tmp_path / "peer_trl_lr3e-4.json").exists()
    assert (
        run.stderr.strip().splitlines()[-1].startswith(f"error: no --lr and no full_kl best_lr in {tmp_path}")
    )


def test_profile_overrides_reproduce_the_profile_through_dvcs_own_override_parser(tmp_path: Path) -> None:
    """A spec's ``profile`` reaches each cell as ``-S`` overrides that DVC's Hydra parser turns back into the
    profile's values exactly (lists of dicts, nulls, strings with quotes and backslashes), after the cell keys and
    before ``set`` (so ``set`` wins)."""
    from dvc.utils.hydra import apply_overrides

    from pipelines.grid import GridSpec, profile_overrides, queue_command

    profile = {
        "task": {"name": "toolcall", "prompts_file": "artifacts/toolcall/task/train.jsonl"},
        "evaluate": {
            "suites": [{"name": "embedded", "path": None, "grader": "tool_call", "limit": 200}],
            "prompt_suffix": " Answer it's \\boxed{} ",
            "k": 4,
        },
        "rollout": {"temperature": 1.0, "allow_unaligned": False},
    }
    (tmp_path / "toolcall.yaml").write_text(yaml.safe_dump(profile))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"task": {"name": "arithmetic", "seed": 0}, "evaluate": {"k": 2}}))
    apply_overrides(params, profile_overrides(tmp_path / "toolcall.yaml"))
    got = yaml.safe_load(params.read_text())
    assert got["evaluate"] == profile["evaluate"]
    assert got["rollout"] == profile["rollout"]
    assert got["task"] == {"seed": 0, **profile["task"]}

    spec = GridSpec.model_validate(
        {"profile": str(tmp_path / "toolcall.yaml"), "set": ["evaluate.k=8"], "methods": SPEC["methods"]}
    )
    cmd = queue_command(spec, cells(spec)[0])
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert sets.index("++task.name=toolcall") < sets.index("evaluate.k=8") and "++evaluate.k=4" in sets
    with pytest.raises(ValueError, match="must not override what the grid varies"):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.1}}))
        GridSpec.model_validate({"profile": str(tmp_path / "bad.yaml"), "methods": SPEC["methods"]})


def test_collect_writes_next_to_its_spec_not_into_another_grids_results(tmp_path: Path) -> None:
    """`oprd-ci grid collect --spec benchmarks/<grid>/grid.yaml` writes that grid's results beside its spec: the
    default once was benchmarks/methods/, so collecting the tool-call grid overwrote the arithmetic table."""
    from typer.testing import CliRunner

    from oprd_ci.cli import app

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    other = tmp_path / "benchmarks/methods-other"
    other.mkdir(parents=True)
    (other / "grid.yaml").write_text(
        yaml.safe_dump({"prefix": "o", "seeds": [0], "methods": SPEC["methods"]})
    )
    r = CliRunner().invoke(app, ["grid", "collect", "--spec", str(other / "grid.yaml"), "--repo", str(repo)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in other.iterdir()) == [
        "grid.yaml",
        "results.json",
        "results.md",
        "results.png",
    ]
    assert (
        json.loads((other / "results.json").read_text())["complete"] is False
    )  # no cell ran: a partial table
