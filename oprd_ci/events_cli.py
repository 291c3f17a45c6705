"""``oprd-ci events`` (registry events with their delivery state) and ``oprd-ci webhooks add|list|remove``.

Same conventions as ``oprd_ci.registry_cli``: ``--url`` / ``$OPRD_REGISTRY_URL`` talks to a server, none runs
the registry in-process; ``--json`` for scripts; exit codes as documented there.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from oprd_ci.registry_cli import JsonOpt, KeyOpt, RegistryCall, TokenOpt, UrlOpt, _emit, console, err

DRAIN_S = 10.0
"""How long an in-process mutating command keeps delivering its events before exiting (bounded: a dead
receiver must not hang the command; undelivered events stay in the database for the next deliverer)."""

webhooks_app = typer.Typer(help="Webhook subscriptions to registry events (admin).", no_args_is_help=True)


def drain_local_events(app: Any, timeout_s: float = DRAIN_S) -> None:
    """In-process, this command is the registry: deliver its events before exiting, within ``timeout_s``."""
    deliverer = getattr(app.state, "deliverer", None)
    if deliverer is None:
        return
    result = deliverer.drain(timeout_s)
    left = result.due + result.waiting
    if left:
        err.print(
            f"[yellow]webhooks pending: {left} delivery(ies) not done yet ({deliverer.last_error or 'backing off'});"
            " the registry database has them; the next registry process retries them (`oprd-ci events`)[/]"
        )


def _render_events(rows: list[dict]) -> None:
    t = Table("seq", "time", "type", "subject", "from", "to", "actor", "deliveries")
    for r in rows:
        ev, data = r["event"], r["event"]["data"]
        deliveries = ", ".join(
            f"{d['webhook']}: {d['state']}"
            + (
                f" ({d['attempts']} tries, {d['last_error'] or d['last_status']})"
                if d["attempts"] != 1
                else ""
            )
            for d in r["deliveries"]
        ) or ("-" if r["dispatched"] else "not dispatched yet")
        t.add_row(
            str(r["seq"]),
            ev["time"][:19],
            ev["type"].rsplit(".", 1)[-1],
            ev["subject"],
            "-" if data.get("from_version") is None else f"v{data['from_version']}",
            "-" if data.get("version") is None else f"v{data['version']}",
            data["actor"],
            deliveries,
        )
    console.print(t)


def events(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's events.")] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only events with a delivery in this state (pending, dead, ...)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="The newest N events.")] = 50,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Registry events (promote, rollback, auto_rollback, retire, policy_set) and their webhook deliveries."""
    params: dict[str, Any] = {"limit": limit}
    if model:
        params["model"] = model
    if state:
        params["state"] = state
    with RegistryCall(url, token, reconcile=False) as call:
        _emit(call("GET", "/v1/events", params=params), as_json, _render_events)


@webhooks_app.command("add")
def webhooks_add(
    name: str,
    target: Annotated[str, typer.Argument(metavar="URL", help="http(s) URL that receives the POSTs.")],
    types: Annotated[
        list[str] | None,
        typer.Option("--type", help="Only this event type (repeatable), e.g. dev.oprd.registry.promote."),
    ] = None,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Subscribe URL to registry events; prints the signing secret (shown only now: store it)."""
    body = {"name": name, "url": target, "types": types or None}
    with RegistryCall(url, token) as call:
        out = call("POST", "/v1/webhooks", body=body, key=idempotency_key)
    _emit(
        out,
        as_json,
        lambda o: console.print(
            f"webhook {o['name']} -> {o['url']}\nsecret (shown once; verify webhook-signature with it): {o['secret']}"
        ),
    )


@webhooks_app.command("list")
def webhooks_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Active subscriptions with their deliveries by state (never the secrets)."""

    def render(rows: list[dict]) -> None:
        t = Table("name", "url", "types", "deliveries", "created")
        for h in rows:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(h["deliveries"].items())) or "-"
            t.add_row(h["name"], h["url"], ", ".join(h["types"] or ["all"]), counts, h["created_at"][:19])
        console.print(t)

    with RegistryCall(url, token, reconcile=False) as call:
        _emit(call("GET", "/v1/webhooks"), as_json, render)


@webhooks_app.command("remove")
def webhooks_remove(
    name: str,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop sending events to NAME (its pending deliveries are cancelled)."""
    with RegistryCall(url, token, reconcile=False) as call:
        out = call("DELETE", f"/v1/webhooks/{name}", key=idempotency_key)
    _emit(
        out,
        as_json,
        lambda o: console.print(
            f"removed webhook {o['name']} ({o['cancelled_deliveries']} pending cancelled)"
        ),
    )


@webhooks_app.command("redeliver")
def webhooks_redeliver(
    name: str,
    event: Annotated[
        int | None, typer.Option("--event", min=1, help="Only this event (its seq in `oprd-ci events`).")
    ] = None,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send NAME's dead deliveries again (same event ids, fresh attempts), e.g. once its receiver is fixed."""
    with RegistryCall(url, token) as call:  # in-process: delivered at exit, bounded (drain_local_events)
        out = call("POST", f"/v1/webhooks/{name}/redeliver", body={"event": event}, key=idempotency_key)
    _emit(
        out,
        as_json,
        lambda o: console.print(f"webhook {o['name']}: {o['redelivered']} delivery(ies) due again"),
    )


def register(app: typer.Typer) -> None:
    """Add ``events`` and the ``webhooks`` group to ``app``."""
    app.command("events")(events)
    app.add_typer(webhooks_app, name="webhooks")


__all__ = ["drain_local_events", "register"]
