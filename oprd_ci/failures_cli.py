"""``oprd-ci failures add|show|collect``: the failure bank (:mod:`pipelines.failures`, docs/tasks.md "The failure bank").

``add FILE --suite NAME`` validates every row of FILE with its grader, de-duplicates by normalized prompt and
merges the rows into the bank (``failures.bank`` in params.yaml), each new problem assigned by hash to training
prompts or to the regression suite NAME. Nothing is written when any row is bad. ``show`` lists the bank per suite
(rich table, or ``--json``). ``collect`` writes the problems one role failed in an evaluate stage's results as
an ``add`` input file (:mod:`pipelines.failures_collect`). Errors end with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["failures_app", "register"]

failures_app = typer.Typer(
    help="The failure bank: failures that become training prompts and regression suites the gate enforces.",
    no_args_is_help=True,
    add_completion=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", help="params.yaml (failures.bank, failures.regression_fraction).")
]


def register(app: typer.Typer) -> None:
    """Add the ``failures`` group (``add``, ``show``, ``collect``) to ``app``."""
    app.add_typer(failures_app, name="failures")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _params(path: Path):
    from trainer.config import ConfigError, load_params

    try:
        return load_params(path, [])
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))


@failures_app.command()
def add(
    file: Annotated[
        Path,
        typer.Argument(
            help="Failures to ingest (.jsonl or .json rows: prompt, reference, "
            "grader; optional model, version, response, source, time, id)."
        ),
    ],
    suite: Annotated[
        str, typer.Option("--suite", help="Regression suite (and policy key) of these failures.")
    ],
    source: Annotated[
        str | None, typer.Option("--source", help="Recorded as each row's source where the row has none.")
    ] = None,
    grader: Annotated[str, typer.Option("--grader", help="Grader of rows that name none.")] = "math",
    params: ParamsOpt = Path("params.yaml"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and report; write nothing.")] = False,
) -> None:
    """Validate FILE's failures and merge them into the bank (all rows or none)."""
    from pipelines.failures import FailureBankError, add_failures

    p = _params(params)
    try:
        report = add_failures(
            file, suite, bank_path=p.failures.bank, regression_fraction=p.failures.regression_fraction,
            source_label=source, default_grader=grader,
            reserved_suites=[s.name for s in p.evaluate.suites], dry_run=dry_run,
        )  # fmt: skip
    except FailureBankError as exc:
        _fail(str(exc))
    merged = report.merged_in_file + report.merged_with_bank
    typer.echo(
        f"{'would add' if dry_run else 'added'} to {p.failures.bank} suite {suite!r}: "
        f"{report.added['train']} training, {report.added['regression']} regression"
        + (f"; {merged} duplicate(s) merged into existing problems" if merged else "")
        + f"; bank sha256 {report.digest[:12]}"
        + ("" if dry_run else f". Next: git add {p.failures.bank} && dvc repro")
    )


@failures_app.command()
def show(
    suite: Annotated[str | None, typer.Option("--suite", help="Only this suite.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The bank per suite: problems per split, failure reports, versions that failed, the bank's digest."""
    from pipelines.failures import FailureBankError, load_bank

    p = _params(params)
    try:
        bank = load_bank(p.failures.bank)
    except FailureBankError as exc:
        _fail(str(exc))
    names = [suite] if suite else bank.suites()
    if suite and suite not in bank.suites():
        _fail(f"no suite {suite!r} in {p.failures.bank} (suites: {', '.join(bank.suites()) or 'none'})")
    summary = []
    for name in names:
        rows = [r for r in bank.rows if r.suite == name]
        versions = sorted({v for r in rows for v in r.versions()})
        summary.append({
            "suite": name,
            "train": sum(r.split == "train" for r in rows),
            "regression": sum(r.split == "regression" for r in rows),
            "reports": sum(len(r.failures) for r in rows),
            "graders": sorted({r.grader for r in rows}),
            "versions": versions,
            "regression_failures_by_version": {str(v): len(ids) for v, ids in bank.recorded_failures(name).items()},
        })  # fmt: skip
    if as_json:
        typer.echo(
            json.dumps({"bank": str(p.failures.bank), "sha256": bank.digest, "suites": summary}, indent=2)
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"failure bank {p.failures.bank} (sha256 {bank.digest[:12] or 'empty'})")
    for col in (
        "suite",
        "train",
        "regression",
        "reports",
        "graders",
        "failed versions",
        "regression by version",
    ):
        table.add_column(col, justify="right" if col in ("train", "regression", "reports") else "left")
    for s in summary:
        table.add_row(
            s["suite"], str(s["train"]), str(s["regression"]), str(s["reports"]), ", ".join(s["graders"]),
            ", ".join(f"v{v}" for v in s["versions"]) or "-",
            ", ".join(f"v{v}: {n}" for v, n in s["regression_failures_by_version"].items()) or "-",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    if not summary:
        typer.echo("the bank is empty: add failures with `oprd-ci failures add FILE --suite NAME`")


@failures_app.command()
def collect(
    suite: Annotated[str, typer.Option("--suite", help="The evaluated suite whose failures to collect.")],
    suite_file: Annotated[
        Path, typer.Option("--suite-file", help="That suite's file, as evaluated (its sha256 is checked).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the `failures add` input (JSONL).")],
    role: Annotated[
        str, typer.Option("--role", help="The evaluate role whose failures these are.")
    ] = "student",
    from_dir: Annotated[
        Path,
        typer.Option("--from", help="The evaluate stage's output folder (responses.jsonl, suites.json)."),
    ] = Path("artifacts/eval"),
    below: Annotated[
        float,
        typer.Option("--below", help="A problem is a failure when its Avg@k (n_correct / k) is below this."),
    ] = 0.5,
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="Registry version the evaluated model is (recorded)."),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Registered model name (recorded).")] = None,
) -> None:
    """Write the problems ROLE failed on SUITE in an evaluate stage's results as `failures add` input rows."""
    from pipelines.failures import FailureBankError
    from pipelines.failures_collect import collect_failures

    try:
        report = collect_failures(
            from_dir, suite, suite_file, role, out, below=below, version=version, model=model
        )
    except FailureBankError as exc:
        _fail(str(exc))
    typer.echo(
        f"{report.failed} of {report.scored} problems of {suite}/{role} failed (Avg@k < {below:g})"
        + (f" by v{version}" if version is not None else "")
        + f"; wrote {report.out}. Next: oprd-ci failures add {report.out} --suite NAME"
    )
