"""``oprd-ci``: the command line of oprd-ci.

Commands are thin: they parse arguments and call ``trainer``, ``pipelines`` or ``server``. Errors end with one
readable line on stderr and a distinct exit code (2 usage/config, 3 auth, 4 conflict, 5 server, 1 other).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from oprd_ci import (
    bench_cli,
    failures_cli,
    grid_cli,
    init_cli,
    outbox_cli,
    params_cli,
    registry_cli,
    signing_cli,
    watch_cli,
)

app = typer.Typer(
    name="oprd-ci",
    help="Continuous integration for distilled language models: OPRD distillation, gates, promotion and lineage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
registry_cli.register(app)
outbox_cli.register(app)
bench_cli.register(app)
grid_cli.register(app)
failures_cli.register(app)
params_cli.register(app)
init_cli.register(app)
signing_cli.register(app)
watch_cli.register(app)


@app.command()
def train(
    params: Annotated[Path, typer.Option(help="The params.yaml to train from.")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output directory (metrics.jsonl, student/, best/).")] = Path(
        "artifacts/distill"
    ),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a param: KEY=VALUE (repeatable).")
    ] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            help="Processes per node; default parallel.nproc_per_node. >1 uses torchrun (or Ray workers with "
            "parallel.launcher=ray)."
        ),
    ] = None,
) -> None:
    """Run the on-policy distillation loop (OPRD or an OPD baseline) outside the DVC pipeline."""
    from trainer.config import ConfigError, load_params

    overrides = list(set_ or [])
    try:
        p = load_params(params, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    nproc = nproc_per_node or p.parallel.nproc_per_node
    if nproc_per_node:
        overrides.append(f"parallel.nproc_per_node={nproc_per_node}")
    args = ["--params", str(params), "--out", str(out), *(a for o in overrides for a in ("--set", o))]
    if p.parallel.launcher != "ray" and (nproc > 1 or p.parallel.nnodes > 1):
        from trainer.distributed import torchrun_command

        raise typer.Exit(subprocess.call([*torchrun_command(p.parallel, "trainer.train", nproc), *args]))
    from trainer.train import main as train_main

    raise typer.Exit(train_main(args))


@app.command()
def results(
    metrics_dir: Annotated[Path, typer.Option(help="Where the pipeline wrote its metrics.")] = Path(
        "metrics"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw metrics as JSON.")] = False,
) -> None:
    """Summarize the last `dvc repro`: evaluation per suite and model, the distillation run, the gate verdict."""
    import json

    from rich.console import Console
    from rich.table import Table

    files = {name: metrics_dir / f"{name}.json" for name in ("eval", "distill")}
    files["gate"] = Path(
        "artifacts/gate/decision.json"
    )  # the full record (metrics/gate.json is numbers only)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        typer.echo(
            f"error: no pipeline results yet ({', '.join(missing)} missing); run `dvc repro` first", err=True
        )
        raise typer.Exit(2)
    data = {name: json.loads(p.read_text()) for name, p in files.items()}
    run_record = metrics_dir.parent / "artifacts/distill/run.json"
    data["distill"].update(json.loads(run_record.read_text()) if run_record.is_file() else {})
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    # Not a terminal (CI logs, `| tee`): rich would assume 80 columns and wrap every cell.
    console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(title="evaluation")
    for col in ("suite", "model", "Avg@k %", "95% CI", "pass@k %", "len mean", "len p95", "Dist-4g"):
        table.add_column(col, justify="left" if col in ("suite", "model") else "right")
    for suite, roles in data["eval"].items():
        for role in ("teacher", "student_base", "student", "student_final", "champion"):
            m = roles.get(role)
            if m is None:
                continue
            lo, hi = m["avg_at_k_ci95"]
            table.add_row(
                suite, role, f"{100 * m['avg_at_k']:.1f}", f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                f"{100 * m['pass_at_k']:.1f}", f"{m['mean_length']:.1f}", f"{m['p95_length']:.0f}", f"{m['dist_4g']:.2f}",
            )  # fmt: skip
    console.print(table)
    d = data["distill"]
    console.print(
        f"distill: method [bold]{d.get('method', '?')}[/], {d['steps']} steps in {d['wall_seconds']:.0f} s "
        f"(x{d['world_size']} processes), best val {100 * (d.get('best_val_accuracy') or 0):.1f}% at step "
        f"{d['best_step']}, final loss {d.get('final_loss', float('nan')):.4g}, update peak "
        f"{1024 * (d.get('update_peak_GiB_max') or 0):.0f} MiB"
    )
    g = data["gate"]["decision"]
    promoted = data["gate"].get("promoted")
    moved = f" -> {promoted['alias']} is v{promoted['version']}" if promoted else ""
    failing = [c["criterion"] for c in g["criteria"] if c["status"] in ("FAIL", "INCONCLUSIVE")]
    console.print(
        f"gate: {g['model']} v{g['version']} [bold]{g['verdict']}[/] (decision {g['id']}, policy v{g['policy_version']})"
        + (f", failing: {', '.join(failing)}" if failing else "")
        + moved
    )


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
