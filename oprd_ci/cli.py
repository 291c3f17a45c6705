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

from oprd_ci import bench_cli, registry_cli

app = typer.Typer(
    name="oprd-ci",
    help="Continuous integration for distilled language models: OPRD distillation, gates, promotion and lineage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
registry_cli.register(app)
bench_cli.register(app)


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
        typer.Option(help="Processes per node; default parallel.nproc_per_node. >1 uses torchrun."),
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
    args = ["--params", str(params), "--out", str(out), *(a for o in overrides for a in ("--set", o))]
    if nproc > 1 or p.parallel.nnodes > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--nnodes={p.parallel.nnodes}",
        ]
        cmd += (
            [f"--rdzv_endpoint={p.parallel.rdzv_endpoint}", "--rdzv_backend=c10d"]
            if p.parallel.rdzv_endpoint
            else ["--standalone"]
        )
        raise typer.Exit(subprocess.call([*cmd, "-m", "trainer.train", *args]))
    from trainer.train import main as train_main

    raise typer.Exit(train_main(args))


@app.command("params")
def show_params(
    params: Annotated[Path, typer.Option(help="The params.yaml to validate.")] = Path("params.yaml"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a param: KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Validate params.yaml (unknown keys and bad values are errors) and print the resolved config as YAML."""
    import yaml

    from trainer.config import ConfigError, load_params

    try:
        p = load_params(params, list(set_ or []))
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
