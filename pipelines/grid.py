"""A rerunnable methods comparison as a DVC experiment grid: queue, run, collect.

The grid is a list of DVC experiments, one per (method, learning rate, seed) cell, each ``dvc exp run --queue
-S distill.method=M -S optim.lr=LR -S distill.seed=S ... evaluate``: the project's own pipeline (rollout ->
distill -> evaluate, no gate), the same step budget and batch shape for every cell. The spec is a small YAML file
(``benchmarks/methods/grid.yaml``)::

    prefix: g                       # experiment names: {prefix}-{method}-lr{lr}-s{seed}
    seeds: [0, 1, 2]
    set: [distill.steps=300]        # -S overrides shared by every cell
    methods:
      oprd: {lrs: [3.0e-4, 1.0e-3, 3.0e-3], best_lr: 1.0e-3}

``best_lr`` is the rate the extra seeds run at, and :func:`collect` reports whether the sweep's seed-0 validation
score agrees with it. Changing it (say, to the rate the sweep selected) adds only the cells the grid lacks: the
cells a previous :func:`collect` recorded in ``results.json`` (``recorded``) count as done when they ran under the
same shared overrides (``set``, ``target``, ``prefix``), so ``queue`` runs only the new seeds and ``collect`` merges
them with the recorded ones (an experiment of the same name wins; every cell says where it came from). Queue order is the order of
importance, so a grid stopped early holds the most useful cells: every method at its ``best_lr`` (seed 0), then the
other seeds, then the rest of the sweep. Only the first cell evaluates the teacher and the student base (their
numbers do not depend on the cell); every cell evaluates its best-on-validation student (``student``) and its
last-step student (``student_final``).

:func:`collect` reads ``dvc exp show --json`` (params + ``metrics/eval.json`` + ``metrics/distill.json`` of every
experiment) and writes ``results.json``, ``results.md`` and ``results.png``: the per-method table at each method's
selected rate (mean ± sd over seeds and each seed's number, best-on-validation and final-step, Avg@k with its 95%
bootstrap CI over problems, response length, Dist-4g, gap closed), the learning-rate sweep, and any peer rows
(``peer_*.json`` next to the spec, e.g. TRL's ``DistillationTrainer`` from ``scripts/trl_peer.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
import subprocess
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.config import ConfigError, Method, format_validation_error

__all__ = [
    "Cell",
    "GridSpec",
    "cells",
    "collect",
    "load_recorded",
    "load_spec",
    "queue",
    "read_experiments",
    "render_markdown",
]

DEFAULT_SPEC = Path("benchmarks/methods/grid.yaml")
SUITE = "embedded"
REFERENCE_ROLES = ("teacher", "student_base")
STUDENT_ROLES = ("student", "student_final")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student-t quantiles by degrees of freedom (n_seeds - 1), for the CI of a mean over seeds."""


class MethodSweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lrs: list[float] = Field(min_length=1)
    """The learning-rate sweep (seed ``seeds[0]``)."""
    best_lr: float
    """The rate the other seeds run at; one of ``lrs``."""

    @model_validator(mode="after")
    def _best_in_sweep(self) -> MethodSweep:
        if not any(math.isclose(self.best_lr, lr) for lr in self.lrs):
            raise ValueError(f"best_lr {self.best_lr:g} is not one of lrs {[f'{x:g}' for x in self.lrs]}")
        if len(set(self.lrs)) != len(self.lrs) or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be distinct and positive, got {self.lrs}")
        return self


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(default="g", pattern=r"^[a-z][a-z0-9]*$")
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    set: list[str] = []
    """``-S KEY=VALUE`` overrides shared by every cell (DVC/Hydra syntax)."""
    target: str = "evaluate"
    """The DVC stage each experiment reproduces (with its upstream stages)."""
    profile: str | None = None
    """A params profile (a partial params tree, e.g. ``profiles/toolcall.yaml``) applied to every cell as ``-S``
    overrides before ``set``: the grid of another task or pair without editing ``params.yaml``."""
    suite: str = SUITE
    """The eval suite whose Avg@k the table reports (``metrics/eval.json`` key)."""
    methods: dict[Method, MethodSweep] = Field(min_length=1)

    @model_validator(mode="after")
    def _checks(self) -> GridSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        bad = [s for s in self.set if "=" not in s]
        if bad:
            raise ValueError(f"set entries must be KEY=VALUE, got {bad}")
        owned = [s for s in self.set if s.split("=", 1)[0].strip() in _CELL_KEYS]
        if self.profile is not None:
            owned += [
                s for s in profile_overrides(self.profile) if s.split("=", 1)[0].lstrip("+") in _CELL_KEYS
            ]
        if owned:
            raise ValueError(f"set must not override what the grid varies ({', '.join(_CELL_KEYS)}): {owned}")
        return self


_CELL_KEYS = ("distill.method", "optim.lr", "distill.seed", "evaluate.roles")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_RESERVED = {"true", "false", "null", "none", "nan", "inf"}


def _hydra_value(v: Any) -> str:
    """``v`` in DVC's ``-S`` (Hydra override) grammar: lists and dicts in flow form, odd strings single-quoted."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_hydra_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _RESERVED:
        return s
    return "'" + s.replace("'", "\\'") + "'"  # Hydra keeps other backslashes as written (checked, dvc 3.67.1)


def profile_overrides(path: str | Path) -> list[str]:
    """A params profile as ``++KEY=VALUE`` overrides, one per leaf (a list is one value, replaced whole)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"profile {p} does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"profile {p} must be a mapping of params keys")
    out: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out.append(
                    f"++{prefix}{k}={_hydra_value(v)}"
                )  # ++: set whether or not params.yaml has the key

    walk(tree, "")
    return out


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid."""

    method: str
    lr: float
    seed: int
    role: str
    """``best`` (the method's ``best_lr``, any seed) or ``sweep`` (another rate, seed ``seeds[0]``)."""
    reference: bool = False
    """This cell also evaluates the teacher and the student base."""


def experiment_name(method: str, lr: float, seed: int, prefix: str = "g") -> str:
    return f"{prefix}-{method.replace('_', '')}-lr{lr:.0e}-s{seed}".replace("+", "")


def load_spec(path: str | Path = DEFAULT_SPEC) -> GridSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such grid spec")
    try:
        return GridSpec.model_validate(yaml.safe_load(p.read_text()) or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(p), GridSpec)) from None


def cells(spec: GridSpec) -> list[Cell]:
    """The grid in queue order: each method at ``best_lr`` (first seed), the other seeds, then the sweep."""
    first, rest = spec.seeds[0], spec.seeds[1:]
    out = [Cell(m, s.best_lr, first, "best") for m, s in spec.methods.items()]
    out += [Cell(m, s.best_lr, seed, "best") for seed in rest for m, s in spec.methods.items()]
    out += [
        Cell(m, lr, first, "sweep")
        for m, s in spec.methods.items()
        for lr in s.lrs
        if not math.isclose(lr, s.best_lr)
    ]
    return [Cell(c.method, c.lr, c.seed, c.role, reference=(i == 0)) for i, c in enumerate(out)]


def cell_name(spec: GridSpec, cell: Cell) -> str:
    return experiment_name(cell.method, cell.lr, cell.seed, spec.prefix)


CHECKPOINTS = Path(".dvc/tmp/grid-checkpoints")
"""Where the grid's cells keep their checkpoints: outside DVC's temporary experiment copies (deleted when a cell
stops), so a cell that was stopped resumes from its last checkpoint when it is queued again (the distill stage
keys checkpoints by a digest of the training config, and removes them when the run finishes)."""


def queue_command(spec: GridSpec, cell: Cell, repo: Path = Path(".")) -> list[str]:
    """The ``dvc exp run --queue`` command of one cell."""
    roles = "[teacher,student_base,student,student_final]" if cell.reference else "[student,student_final]"
    sets = [
        f"distill.method={cell.method}",
        f"optim.lr={cell.lr!r}",
        f"distill.seed={cell.seed}",
        f"evaluate.roles={roles}",
        *(profile_overrides(spec.profile) if spec.profile else ()),
        *spec.set,
    ]
    if not any(s.split("=", 1)[0].strip() == "checkpoint.dir" for s in spec.set):
        sets.append(f"checkpoint.dir={(repo / CHECKPOINTS).resolve()}")
    return ["dvc", "exp", "run", "--queue", "-n", cell_name(spec, cell), *(a for s in sets for a in ("-S", s)),
            spec.target]  # fmt: skip


def _dvc(args: Sequence[str], cwd: Path) -> str:
    out = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(
            f"dvc {' '.join(args)} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}"
        )
    return out.stdout


METRIC_FILES = ("metrics/eval.json", "metrics/distill.json")


def _git_json(repo: Path, rev: str, path: str) -> Any | None:
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return yaml.safe_load(out.stdout) if path.endswith(".yaml") else json.loads(out.stdout)


def read_experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """``{experiment name: {"state", "rev", "baseline", "params", "metrics"}}`` of every experiment in ``repo``.

    Names, revisions and executor states come from ``dvc exp show --json`` (the experiments of the current
    HEAD: do not commit in the grid's repository while it runs); params and metrics are read from the
    experiment's commit (``git show REV:params.yaml`` / ``REV:metrics/*.json``), whole: ``dvc exp show`` keeps only
    numeric leaves, which drops the confidence intervals.
    """
    raw = json.loads(_dvc(["exp", "show", "--json", "--no-pager"], repo) or "[]")
    found: dict[str, dict[str, Any]] = {}
    for base in raw:
        for exp in base.get("experiments") or []:
            name = exp.get("name")
            revs = exp.get("revs") or []
            if not name or not revs:
                continue
            rev = revs[0].get("rev")
            state = (exp.get("executor") or {}).get("state") or "success"
            baseline = base.get("rev") if base.get("rev") != "workspace" else None
            entry: dict[str, Any] = {
                "state": state,
                "rev": rev,
                "baseline": baseline,
                "params": {},
                "metrics": {},
            }
            if state == "success" and rev and rev != "workspace":
                entry["params"] = _git_json(repo, rev, "params.yaml") or {}
                entry["metrics"] = {f: m for f in METRIC_FILES if (m := _git_json(repo, rev, f)) is not None}
            found[name] = entry
    return found


def queue_states(repo: Path) -> dict[str, str]:
    """``{experiment name: "queued" | "running" | ...}`` from ``dvc queue status`` (``dvc exp show`` does not name
    queued experiments, so a re-run of :func:`queue` would queue them twice)."""
    states = {}
    for line in _dvc(["queue", "status"], repo).splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[0] != "Worker":
            states[parts[1]] = parts[-1].lower()
    return states


@dataclass(frozen=True)
class Recorded:
    """The cells of a previous :func:`collect` (its ``results.json``) that a grid may reuse instead of re-running."""

    path: Path | None = None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``{experiment name: results.json cell}`` (``name``, ``method``, ``lr``, ``seed``, ``distill``, ``eval``...)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The budget and protocols those cells ran under (``results.json`` ``settings``)."""


RECORDED_MUST_MATCH = ("prefix", "set", "target")
"""Spec fields a recorded cell must share with the grid: the same name and the same shared overrides mean the same
experiment (the cell's own method, rate and seed are in its name and are checked against its record)."""


def load_recorded(path: str | Path, spec: GridSpec) -> Recorded:
    """The cells recorded in ``path`` (a previous ``results.json``) that belong to ``spec``'s grid.

    A missing file records nothing. A file recorded under other shared overrides is a :class:`ConfigError` naming
    the difference (re-run everything with ``--fresh``, or point ``--results`` elsewhere): mixing cells of two
    budgets in one table would be silently wrong. Cells that are no longer in the grid (e.g. seeds of a former
    ``best_lr``) are dropped.
    """
    p = Path(path)
    if not p.is_file():
        return Recorded()
    try:
        data = json.loads(p.read_text())
        old = data["spec"]
        recorded_cells = {c["name"]: c for c in data["cells"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{p}: not a grid results file ({exc.__class__.__name__}: {exc})") from None
    now = spec.model_dump(mode="json")
    diff = [
        f"{k}: {old.get(k)!r} there, {now[k]!r} in the spec"
        for k in RECORDED_MUST_MATCH
        if old.get(k) != now[k]
    ]
    if diff:
        raise ConfigError(
            f"{p} was recorded under other shared settings ({'; '.join(diff)}); "
            "pass --fresh to run every cell again, or --results to use other recorded cells"
        )
    wanted = {cell_name(spec, c): c for c in cells(spec)}
    kept = {}
    for name, rec in recorded_cells.items():
        cell = wanted.get(name)
        if cell is None:
            continue
        if (rec["method"], rec["seed"]) != (cell.method, cell.seed) or not math.isclose(rec["lr"], cell.lr):
            raise ConfigError(
                f"{p}: cell {name} records {(rec['method'], rec['lr'], rec['seed'])}, not its name's"
            )
        kept[name] = rec
    return Recorded(p, kept, data.get("settings") or {})


def plan(
    spec: GridSpec,
    existing: dict[str, dict[str, Any]],
    in_queue: dict[str, str],
    recorded: Recorded = Recorded(),
) -> list[tuple[Cell, str]]:
    """What each cell needs, in queue order: ``done`` (a finished experiment), ``recorded`` (a recorded cell and no
    experiment), ``pending`` (queued or running), ``retry`` (a failed experiment of its name) or ``run``.

    ``existing`` is :func:`read_experiments`'s answer, ``in_queue`` :func:`queue_states`'s.
    """
    report = []
    for cell in cells(spec):
        name = cell_name(spec, cell)
        state = existing.get(name, {}).get("state")
        if in_queue.get(name) in ("queued", "running") or (state is None and name in in_queue):
            state = in_queue[name]
        if state == "success" and existing.get(name, {}).get("metrics"):
            report.append((cell, "done"))
        elif state in ("queued", "running"):
            report.append((cell, "pending"))
        elif name in recorded.cells:
            report.append((cell, "recorded"))
        else:
            report.append((cell, "run" if state is None else "retry"))
    return report


def queue(
    spec: GridSpec,
    repo: Path,
    *,
    recorded: Recorded = Recorded(),
    dry_run: bool = False,
    on_queued: Callable[[Cell], None] | None = None,
) -> list[tuple[Cell, str]]:
    """Queue every cell that has no finished, running or queued experiment of its name and is not ``recorded``.

    Returns ``[(cell, "queued" | "done" | "recorded" | "pending" | <command> when dry_run)]``. Finished cells are
    never re-run, so ``queue`` after a stopped grid resumes it. ``on_queued(cell)`` runs after each cell is queued
    (the CLI starts the queue workers after the first, so the grid runs while the rest is queued).
    """
    report = []
    for cell, status in plan(spec, read_experiments(repo), queue_states(repo), recorded):
        name = cell_name(spec, cell)
        if status not in ("run", "retry"):
            report.append((cell, status))
        elif dry_run:
            report.append((cell, " ".join(queue_command(spec, cell, repo))))
        else:
            if status == "retry":  # a failed run of the same name: drop it so the name can be reused
                with contextlib.suppress(RuntimeError):
                    _dvc(["exp", "remove", name], repo)
                with contextlib.suppress(RuntimeError):
                    _dvc(["queue", "remove", name], repo)
            subprocess.run(
                queue_command(spec, cell, repo), cwd=repo, check=True, capture_output=True, text=True
            )
            report.append((cell, "queued"))
            if on_queued is not None:
                on_queued(cell)
    return report


# --------------------------------------------------------------------------------------------------- collect
@dataclass
class CellResult:
    name: str
    method: str
    lr: float
    seed: int
    state: str
    distill: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``{role: metrics}`` for ``student`` / ``student_final`` (and the reference roles when present)."""
    source: str = "experiment"
    """``experiment`` (read from the grid repository's DVC experiment) or ``recorded`` (a previous results.json)."""
    rev: str | None = None
    """The experiment's commit (DVC keeps it under ``refs/exps``)."""
    baseline: str | None = None
    """The commit the experiment ran on (its code and params before the cell's ``-S`` overrides)."""


def _gap(acc: float, ref: dict[str, dict[str, Any]]) -> float | None:
    if "teacher" not in ref or "student_base" not in ref:
        return None
    t, b = ref["teacher"]["avg_at_k"], ref["student_base"]["avg_at_k"]
    return (acc - b) / (t - b) if t != b else None


def _mean_sd(xs: list[float]) -> dict[str, Any]:
    n = len(xs)
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if n > 1 else None
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if sd is not None else None
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half] if half is not None else None,
            "values": xs}  # fmt: skip


def _row(cell: CellResult, role: str, ref: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    m = cell.eval.get(role)
    if m is None:
        return None
    return {
        "avg_at_k": m["avg_at_k"], "ci95": m["avg_at_k_ci95"], "pass_at_k": m["pass_at_k"],
        "mean_length": m["mean_length"], "p95_length": m["p95_length"], "dist_4g": m["dist_4g"],
        "gap_closed": _gap(m["avg_at_k"], ref), "n_problems": m["n_problems"], "k": m["k"],
    }  # fmt: skip


def collect(
    spec: GridSpec,
    repo: Path,
    out_dir: Path,
    peers: Sequence[Path] = (),
    recorded: Recorded = Recorded(),
) -> dict[str, Any]:
    """Read the grid's experiments (and peer rows), merge the ``recorded`` cells they lack, and write
    ``results.{json,md,png}`` under ``out_dir``."""
    peer_data = [json.loads(Path(p).read_text()) for p in peers]
    out = build_results(spec, read_experiments(repo), recorded=recorded, peers=peer_data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    (out_dir / "results.md").write_text(render_markdown(out))
    plot(out, out_dir / "results.png")
    return out


def _experiment_cell(spec: GridSpec, cell: Cell, exp: dict[str, Any]) -> CellResult | None:
    """The finished experiment of ``cell`` as a result (``None`` when it has no student evaluation)."""
    name = cell_name(spec, cell)
    ev = (exp.get("metrics", {}).get("metrics/eval.json") or {}).get(spec.suite, {})
    if not ev.get("student"):
        return None
    params = exp["params"]
    got = (params["distill"]["method"], float(params["optim"]["lr"]), int(params["distill"]["seed"]))
    if got[0] != cell.method or not math.isclose(got[1], cell.lr) or got[2] != cell.seed:
        raise ValueError(f"experiment {name} ran {got}, not the cell's {(cell.method, cell.lr, cell.seed)}")
    return CellResult(name, cell.method, cell.lr, cell.seed, exp["state"],
                      exp["metrics"].get("metrics/distill.json") or {},
                      {r: ev[r] for r in (*STUDENT_ROLES, *REFERENCE_ROLES) if r in ev},
                      source="experiment", rev=exp.get("rev"), baseline=exp.get("baseline"))  # fmt: skip


def _recorded_cell(rec: dict[str, Any]) -> CellResult:
    known = {f.name for f in fields(CellResult)}
    return CellResult(**{**{k: v for k, v in rec.items() if k in known}, "source": "recorded"})


def build_results(
    spec: GridSpec,
    exps: dict[str, dict[str, Any]],
    *,
    recorded: Recorded = Recorded(),
    peers: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The results document (what ``results.json`` holds) from :func:`read_experiments`'s ``exps``, the
    ``recorded`` cells (used where no experiment finished; an experiment of the same name wins) and peer rows.

    Raises ``ValueError`` when an experiment ran other parameters than its name says, or when the experiments and
    the recorded cells ran under different budgets or protocols (``settings``).
    """
    results: list[CellResult] = []
    missing: list[str] = []
    ref: dict[str, dict[str, Any]] = {}
    for cell in cells(spec):
        name = cell_name(spec, cell)
        exp = exps.get(name)
        result = _experiment_cell(spec, cell, exp) if exp is not None else None
        if result is None and name in recorded.cells:
            result = _recorded_cell(recorded.cells[name])
        if result is None:
            missing.append(name + ("" if exp is None else f" ({exp['state']})"))
            continue
        for role in REFERENCE_ROLES:
            if role in result.eval:
                ref.setdefault(role, result.eval[role])
        results.append(result)
    settings = _settings(exps, results, recorded)
    methods: dict[str, Any] = {}
    sweep: list[dict[str, Any]] = []
    for method, sw in spec.methods.items():
        mine = [r for r in results if r.method == method]
        for r in sorted((r for r in mine if r.seed == spec.seeds[0]), key=lambda r: r.lr):
            sweep.append({"method": method, "lr": r.lr, "seed": r.seed, "name": r.name,
                          "best_step": r.distill.get("best_step"), "val_best": r.distill.get("best_val_accuracy"),
                          "val_final": r.distill.get("final_val_accuracy"),
                          **{role: _row(r, role, ref) for role in STUDENT_ROLES}})  # fmt: skip
        seeds_at_best = [r for r in mine if math.isclose(r.lr, sw.best_lr)]
        by_val = [s for s in sweep if s["method"] == method and s["val_best"] is not None]
        selected = max(by_val, key=lambda s: s["val_best"])["lr"] if by_val else None
        entry: dict[str, Any] = {"lr": sw.best_lr, "lr_selected_on_val": selected,
                                 "sweep_complete": len(by_val) == len(sw.lrs), "seeds": {}}  # fmt: skip
        for role in STUDENT_ROLES:
            rows = [(r.seed, _row(r, role, ref)) for r in sorted(seeds_at_best, key=lambda r: r.seed)]
            rows = [(s, x) for s, x in rows if x is not None]
            if rows:
                entry[role] = {
                    key: _mean_sd([x[key] for _, x in rows if x[key] is not None])
                    for key in ("avg_at_k", "gap_closed", "mean_length", "dist_4g", "pass_at_k")
                    if any(x[key] is not None for _, x in rows)
                }
                entry["seeds"][role] = {str(s): x for s, x in rows}
        entry["best_step"] = {str(r.seed): r.distill.get("best_step") for r in seeds_at_best}
        entry["step_seconds_median"] = {
            str(r.seed): r.distill.get("step_seconds_median") for r in seeds_at_best
        }
        methods[method] = entry
    names = [data["name"] for data in peers]  # one peer at several rates: its rows are named by their rate
    peer_rows = {
        (d["name"] if names.count(d["name"]) == 1 else f"{d['name']}, lr {d['lr']:g}"): {
            **d,
            "row": _peer_row(d, ref),
        }
        for d in peers
    }
    return {
        "spec": spec.model_dump(mode="json"),
        "settings": settings,
        "reference": {role: _ref_row(m) for role, m in ref.items()},
        "methods": methods,
        "sweep": sweep,
        "peers": peer_rows,
        "cells": [asdict(r) for r in results],
        "sources": {src: sum(r.source == src for r in results) for src in ("experiment", "recorded")},
        "missing": missing,
        "complete": not missing,
    }


def _ref_row(m: dict[str, Any]) -> dict[str, Any]:
    return {"avg_at_k": m["avg_at_k"], "ci95": m["avg_at_k_ci95"], "pass_at_k": m["pass_at_k"],
            "mean_length": m["mean_length"], "p95_length": m["p95_length"], "dist_4g": m["dist_4g"],
            "n_problems": m["n_problems"], "k": m["k"]}  # fmt: skip


def _peer_row(data: dict[str, Any], ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    m = data["eval"]
    return {**_ref_row(m), "gap_closed": _gap(m["avg_at_k"], ref)}


def _settings(
    exps: dict[str, dict[str, Any]], results: list[CellResult], recorded: Recorded = Recorded()
) -> dict[str, Any]:
    """The shared budget and protocols (the same in every cell): read from a finished experiment's params, checked
    against the recorded cells' when both are in the table, else the recorded cells' own."""
    ran = [r for r in results if r.source == "experiment"]
    mixed = any(r.source == "recorded" for r in results)
    if not ran:
        return dict(recorded.settings) if mixed else {}
    p = exps[ran[0].name]["params"]
    d, e = p["distill"], p["evaluate"]
    now = {
        "steps": d["steps"], "prompts_per_step": d["prompts_per_step"], "n_responses": d["n_responses"],
        "eval_every": d["eval_every"], "val": d.get("val"), "rollout_temperature": p["rollout"]["temperature"],
        "max_new_tokens": p["rollout"]["max_new_tokens"], "eval_k": e["k"], "eval_temperature": e["temperature"],
        "eval_top_p": e["top_p"], "eval_seed": e["seed"],
    }  # fmt: skip
    if mixed and recorded.settings:
        diff = {k: (recorded.settings.get(k), v) for k, v in now.items() if recorded.settings.get(k) != v}
        if diff:
            raise ValueError(
                f"the experiments ran under other settings than the recorded cells of {recorded.path} "
                f"(recorded, now): {diff}; re-run every cell (--fresh) or align params.yaml"
            )
    return now


# ----------------------------------------------------------------------------------------------------- render
def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}"


def _ms(stat: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not stat:
        return ""
    if stat["sd"] is None:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['sd']:.{digits}f}"


def _seeds(entry: dict[str, Any], role: str) -> str:
    rows = entry.get("seeds", {}).get(role, {})
    return " / ".join(
        f"{100 * x['avg_at_k']:.1f}" for _, x in sorted(rows.items(), key=lambda kv: int(kv[0]))
    )


def _provenance(cells_: list[dict[str, Any]]) -> str:
    """Where the table's cells come from: this collect's experiments (with their baseline commits) and the cells
    recorded by an earlier one."""
    ran = [c for c in cells_ if c.get("source", "experiment") == "experiment"]
    rec = [c for c in cells_ if c.get("source") == "recorded"]
    parts = []
    if ran:
        bases = sorted({(c.get("baseline") or "?")[:7] for c in ran})
        parts.append(
            f"{len(ran)} run as DVC experiments of this collect (baseline commit {', '.join(bases)})"
        )
    if rec:
        parts.append(
            f"{len(rec)} recorded by an earlier collect (`results.json` `cells`, `source: recorded`)"
        )
    return "Cells: " + "; ".join(parts) + "."


def render_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = []
    if not res["complete"]:
        lines += [
            f"**Partial grid**: {len(res['missing'])} cell(s) missing: {', '.join(res['missing'])}.",
            "",
        ]
    if s:
        lines += [
            f"Budget: {s['steps']} steps x {s['prompts_per_step']} prompts x {s['n_responses']} responses "
            f"(T={s['rollout_temperature']}, max {s['max_new_tokens']} new tokens). Selection: validation every "
            f"{s['eval_every']} steps, protocol `{(s['val'] or {}).get('protocol', 'greedy')}`. Evaluation: "
            f"Avg@{s['eval_k']} at T={s['eval_temperature']}, top-p {s['eval_top_p']}, 95% bootstrap CI over problems.",
            "",
        ]
    lines += [_provenance(res["cells"]), ""] if res["cells"] else []
    lines += [
        "| model | lr | seeds | best-on-val Avg@k % (mean ± sd) | per seed | final-step Avg@k % (mean ± sd) | per seed "
        "| gap closed best / final % | length (final) | Dist-4g (final) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for role, label in (("teacher", "teacher"), ("student_base", "student base")):
        m = res["reference"].get(role)
        if m:
            ci = f"[{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}]"
            lines.append(f"| {label} | | | {_pct(m['avg_at_k'])} {ci} | | | | | {m['mean_length']:.1f} | "
                         f"{m['dist_4g']:.2f} |")  # fmt: skip
    for method, e in res["methods"].items():
        b, f = e.get("student", {}), e.get("student_final", {})
        n = (b.get("avg_at_k") or {}).get("n", 0)
        gap = f"{_ms(b.get('gap_closed'), digits=0)} / {_ms(f.get('gap_closed'), digits=0)}" if b else ""
        length = _ms(f.get("mean_length"), 1.0) if f else ""
        dist = _ms(f.get("dist_4g"), 1.0, 2) if f else ""
        lines.append(f"| {method} | {e['lr']:g} | {n} | {_ms(b.get('avg_at_k'))} | {_seeds(e, 'student')} | "
                     f"{_ms(f.get('avg_at_k'))} | {_seeds(e, 'student_final')} | {gap} | {length} | {dist} |")  # fmt: skip
    for name, p in res["peers"].items():
        r = p["row"]
        ci = f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]"
        lines.append(f"| {name} | {p.get('lr', ''):g} | {len(p.get('seeds', [p.get('seed', 0)]))} | | | "
                     f"{_pct(r['avg_at_k'])} {ci} | | – / {_pct(r['gap_closed'], 0)} | {r['mean_length']:.1f} | "
                     f"{r['dist_4g']:.2f} |")  # fmt: skip
    lines += [
        "",
        "Learning-rate sweep (seed 0; `*` = the rate the seeds ran at, `v` = highest validation score):",
        "",
        "| method | lr | val best (step) / final % | best-on-val Avg@k % [95% CI] | final-step Avg@k % [95% CI] "
        "| length (final) | Dist-4g (final) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["sweep"]:
        e = res["methods"][row["method"]]
        mark = ("*" if math.isclose(row["lr"], e["lr"]) else "") + (
            "v"
            if e["lr_selected_on_val"] is not None and math.isclose(row["lr"], e["lr_selected_on_val"])
            else ""
        )
        cells_ = []
        for role in STUDENT_ROLES:
            x = row[role]
            cells_.append(f"{_pct(x['avg_at_k'])} [{_pct(x['ci95'][0])}, {_pct(x['ci95'][1])}]" if x else "")
        fin = row["student_final"] or {}
        lines.append(
            f"| {row['method']} | {row['lr']:g}{mark} | {_pct(row['val_best'])} ({row['best_step']}) / "
            f"{_pct(row['val_final'])} | {cells_[0]} | {cells_[1]} | {fin.get('mean_length', 0):.1f} | "
            f"{fin.get('dist_4g', 0):.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Left: each method at its seeds' rate (best-on-val and final, mean ± sd, seeds as dots; teacher and base as
    lines; peers as diamonds). Right: the seed-0 lr sweep (best-on-val solid, final dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    names = list(res["methods"])
    for j, role in enumerate(STUDENT_ROLES):
        for i, m in enumerate(names):
            st = res["methods"][m].get(role, {}).get("avg_at_k")
            if not st:
                continue
            x = i + (j - 0.5) * 0.35
            ax.bar(x, 100 * st["mean"], 0.33, yerr=100 * (st["sd"] or 0), capsize=3,
                   color=f"C{j}", label=("best-on-val" if role == "student" else "final step") if i == 0 else None)  # fmt: skip
            ax.scatter([x] * len(st["values"]), [100 * v for v in st["values"]], color="k", s=8, zorder=3)
    for k, (name, p) in enumerate(res["peers"].items()):
        ax.scatter([len(names) + k], [100 * p["row"]["avg_at_k"]], marker="D", color="C3", label=name)
    labels = names + [textwrap.fill(p, 18) for p in res["peers"]]  # peer names are sentences
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    for role, style in (("teacher", "--"), ("student_base", ":")):
        if role in res["reference"]:
            ax.axhline(100 * res["reference"][role]["avg_at_k"], ls=style, color="gray", label=role)
    ax.set_ylabel("Avg@k % (held-out)")
    ax.set_title("methods at their seeds' learning rate")
    ax.legend(fontsize=8)
    for i, m in enumerate(names):
        pts = [r for r in res["sweep"] if r["method"] == m]
        for role, style in (("student", "-"), ("student_final", "--")):
            xy = [(r["lr"], 100 * r[role]["avg_at_k"]) for r in pts if r[role]]
            if xy:
                bx.plot(*zip(*xy, strict=True), style, marker="o", color=f"C{i}",
                        label=m if role == "student" else None)  # fmt: skip
    bx.set_xscale("log")
    bx.set_xlabel("learning rate")
    bx.set_ylabel("Avg@k % (held-out)")
    bx.set_title("lr sweep, seed 0 (solid best-on-val, dashed final)")
    bx.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
