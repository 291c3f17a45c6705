"""``oprd-ci params``: validate params.yaml (and print it resolved), or ``params apply`` a profile into it.

``oprd-ci params`` is unchanged: it validates ``params.yaml`` (with ``--set`` overrides) and prints the resolved
config. ``oprd-ci params apply profiles/<name>.yaml`` deep-merges a partial params tree into ``params.yaml``
(``pipelines.profiles``): validated first, nothing written on error, comments kept, the changed keys printed.
``git checkout params.yaml`` goes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

params_app = typer.Typer(
    help="Validate params.yaml and print the resolved config; `params apply FILE` merges a profile into it.",
    invoke_without_command=True,
    no_args_is_help=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="The params.yaml to validate.")]


@params_app.callback()
def show_params(
    ctx: typer.Context,
    params: ParamsOpt = Path("params.yaml"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a param: KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Validate params.yaml (unknown keys and bad values are errors) and print the resolved config as YAML."""
    if ctx.invoked_subcommand is not None:
        return
    import yaml

    from trainer.config import ConfigError, load_params

    try:
        p = load_params(params, list(set_ or []))
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))


@params_app.command("apply")
def apply(
    profile: Annotated[
        Path, typer.Argument(help="A profile: a partial params tree, e.g. profiles/<name>.yaml.")
    ],
    params: Annotated[Path, typer.Option("--params", help="The params file to merge into.")] = Path(
        "params.yaml"
    ),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the changes; write nothing.")
    ] = False,
) -> None:
    """Deep-merge PROFILE into params.yaml (mappings merge, lists and scalars replace), validated first.

    Nothing is written when the merged params do not validate. params.yaml keeps its comments. To go back:
    `git checkout params.yaml`.
    """
    from pipelines.profiles import ProfileError, apply_profile

    try:
        changes, _ = apply_profile(params, profile, dry_run=dry_run)
    except ProfileError as exc:
        first, *rest = str(exc).splitlines()
        typer.echo(
            f"error: {first}" + (f" (+{len(rest)} more problems)" if rest else "") + f"; {params} unchanged",
            err=True,
        )
        raise typer.Exit(2) from None
    if not changes:
        typer.echo(f"{params}: already has every value of {profile} (nothing to change)")
        return
    verb = "would change" if dry_run else "changed"
    typer.echo(f"{params}: {verb} {len(changes)} key(s) from {profile}:")
    for c in changes:
        typer.echo(f"  {c}")
    if not dry_run:
        typer.echo(f"To go back: git checkout {params}")


def register(app: typer.Typer) -> None:
    """Add the ``params`` group (validate/print, ``apply``) to ``app``."""
    app.add_typer(params_app, name="params")
