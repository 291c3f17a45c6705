"""``oprd-ci outbox list|retry|drop``: the MLflow writes the registry has not applied (admin).

A write MLflow refused, or kept failing past its budget, is *parked* (docs/registry.md "MLflow writes that fail:
retry, park, admin commands"): it no longer blocks anything, and stays visible until an admin retries it (after
fixing the cause in MLflow) or drops it (MLflow will never get it). Both are audited on the model's history.
Exit codes as the other registry commands (3 not admin, 4 already applied, 6 no such row).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from oprd_ci.registry_cli import JsonOpt, ReasonOpt, RegistryCall, TokenOpt, UrlOpt, _emit, console

app = typer.Typer(
    help="MLflow writes not applied yet: list, retry or drop parked ones (admin).", no_args_is_help=True
)
RowId = Annotated[int, typer.Argument(min=1, help="Outbox row id (`oprd-ci outbox list`).")]


def _render_rows(rows: list[dict]) -> None:
    if not rows:
        console.print("no MLflow writes waiting")
        return
    t = Table("id", "state", "kind", "model", "what", "attempts", "next attempt", "last error")
    for r in rows:
        p = r["payload"]
        what = f"@{p['alias']} -> v{p['version']}" if "alias" in p else f"v{p.get('version', '?')}"
        t.add_row(
            str(r["id"]),
            r["state"],
            r["kind"],
            r["model"],
            what,
            str(r["attempts"]),
            str(r["next_attempt_at"] or ""),
            (r["last_error"] or "")[:160],
        )
    console.print(t)


def _render_row(r: dict) -> None:
    console.print(f"outbox {r['id']} ({r['kind']} {r['model']}): {r['state']}")


@app.command("list")
def list_rows(
    parked: Annotated[bool, typer.Option("--parked", help="Only parked rows.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Writes not applied to MLflow yet: parked first, then pending, with attempts and the last error."""
    with RegistryCall(url, token, reconcile=False) as call:
        _emit(call("GET", "/v1/outbox", params={"parked": parked}), as_json, _render_rows)


@app.command("retry")
def retry(
    row_id: RowId, reason: ReasonOpt, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Try row ROW_ID again now with a fresh retry budget (after fixing the cause in MLflow)."""
    with RegistryCall(url, token) as call:
        _emit(call("POST", f"/v1/outbox/{row_id}/retry", body={"reason": reason}), as_json, _render_row)


@app.command("drop")
def drop(
    row_id: RowId, reason: ReasonOpt, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Give up on row ROW_ID: MLflow never gets this write (the registry database keeps the change)."""
    with RegistryCall(url, token, reconcile=False) as call:
        _emit(call("POST", f"/v1/outbox/{row_id}/drop", body={"reason": reason}), as_json, _render_row)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="outbox")
