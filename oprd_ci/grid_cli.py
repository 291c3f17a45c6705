"""``oprd-ci grid plan|queue|collect``: the methods comparison as a DVC experiment grid (:mod:`pipelines.grid`).

``register(app)`` mounts a ``grid`` sub-command group on the main typer app. ``queue`` adds every cell without a
finished experiment to DVC's queue (``dvc exp run --queue``) and, with ``--start``, starts ``dvc queue`` workers;
``collect`` reads the finished experiments (``dvc exp show --json``) and writes the results table, JSON and plot.
Both reuse the cells recorded in a previous ``results.json`` (``--results``, by default the one next to the spec)
when they ran under the spec's shared settings, so changing a ``best_lr`` runs only the new seeds; ``--fresh``
ignores it. Errors end with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["grid_app", "register"]

grid_app = typer.Typer(
    help="The methods comparison: a DVC experiment grid over methods, learning rates and seeds.",
    no_args_is_help=True,
    add_completion=False,
)

SpecOpt = Annotated[Path, typer.Option("--spec", help="The grid spec (YAML).")]
RepoOpt = Annotated[Path, typer.Option("--repo", help="The DVC project whose experiments make the grid.")]
ResultsOpt = Annotated[
    Path | None,
    typer.Option(
        "--results",
        help="A previous results.json whose cells count as done (default: results.json next to the spec).",
    ),
]
FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="Ignore recorded cells: every cell needs an experiment.")
]


def register(app: typer.Typer) -> None:
    """Add the ``grid`` group (``plan``, ``queue``, ``collect``) to ``app``."""
    app.add_typer(grid_app, name="grid")


def _spec(path: Path):
    from pipelines.grid import load_spec
    from trainer.config import ConfigError

    try:
        return load_spec(path)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _recorded(spec, spec_path: Path, results: Path | None, fresh: bool):
    from pipelines.grid import Recorded, load_recorded
    from trainer.config import ConfigError

    if fresh:
        return Recorded()
    path = results if results is not None else spec_path.parent / "results.json"
    if results is not None and not path.is_file():
        typer.echo(f"error: {path}: no such results file (omit --results, or --fresh)", err=True)
        raise typer.Exit(2)
    try:
        return load_recorded(path, spec)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@grid_app.command()
def plan(spec: SpecOpt = Path("benchmarks/methods/grid.yaml")) -> None:
    """Print the grid's cells in queue order with their `dvc exp run --queue` commands (runs nothing)."""
    from pipelines.grid import cells, queue_command

    s = _spec(spec)
    for c in cells(s):
        typer.echo(" ".join(queue_command(s, c)))


@grid_app.command("queue")
def queue_cmd(
    spec: SpecOpt = Path("benchmarks/methods/grid.yaml"),
    repo: RepoOpt = Path("."),
    start: Annotated[bool, typer.Option(help="Start `dvc queue` workers after queueing.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel queue workers (--start).")] = 1,
    results: ResultsOpt = None,
    fresh: FreshOpt = False,
) -> None:
    """Queue every cell that has no finished, running or queued experiment and is not recorded in the results
    (re-running resumes a grid)."""
    from pipelines.grid import cell_name, queue

    s = _spec(spec)
    recorded = _recorded(s, spec, results, fresh)

    def start_workers(_cell=None) -> int:
        return subprocess.call(
            ["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, stdout=subprocess.DEVNULL
        )

    started: list[bool] = []

    def first_queued(cell) -> None:
        typer.echo(f"  queued  {cell_name(s, cell)}")
        if start and not started:
            started.append(start_workers() == 0)

    try:
        report = queue(s, repo, recorded=recorded, on_queued=first_queued)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        msg = getattr(exc, "stderr", None) or str(exc)
        typer.echo(f"error: {str(msg).strip().splitlines()[-1]}", err=True)
        raise typer.Exit(2) from None
    for cell, status in report:
        if status != "queued":
            typer.echo(f"{status:>8}  {cell_name(s, cell)}")
    if start:  # again at the end: a worker that found the queue empty while it was being filled has exited
        raise typer.Exit(start_workers())


@grid_app.command()
def collect(
    spec: SpecOpt = Path("benchmarks/methods/grid.yaml"),
    repo: RepoOpt = Path("."),
    out: Annotated[
        Path | None, typer.Option(help="Where results.{json,md,png} go (default: the spec's directory).")
    ] = None,
    peer: Annotated[
        list[Path] | None,
        typer.Option(help="A peer row JSON (e.g. scripts/trl_peer.py's output); repeatable."),
    ] = None,
    results: ResultsOpt = None,
    fresh: FreshOpt = False,
) -> None:
    """Collect the finished experiments, and the recorded cells they lack, into the methods table (marked partial
    while cells are missing)."""
    from pipelines.grid import collect as collect_grid

    s = _spec(spec)
    out = (
        out if out is not None else spec.parent
    )  # a grid's results live next to its spec, never another grid's
    recorded = _recorded(s, spec, results, fresh)
    missing = [str(p) for p in peer or [] if not p.is_file()]
    if missing:
        typer.echo(f"error: peer file(s) not found: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    try:
        res = collect_grid(s, repo, out, peers=peer or [], recorded=recorded)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo((out / "results.md").read_text())
    src = res["sources"]
    typer.echo(f"{src['experiment']} cell(s) from experiments, {src['recorded']} recorded", err=True)
    if not res["complete"]:
        typer.echo(f"partial: {len(res['missing'])} cell(s) missing", err=True)
