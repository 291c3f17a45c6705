"""``oprd-ci`` registry commands: serve, promote, rollback, retire, status, history, lineage, reconcile, gate,
policy.

Thin typer commands: they gather options, call the registry API and render the answer (rich tables, or
``--json`` for scripts). With no server URL (``--url`` / ``$OPRD_REGISTRY_URL``) the same ASGI app runs
in-process against the local database (``$OPRD_DATABASE_URL``, default ``sqlite:///registry.db``) and the
caller acts as the local admin ``local:$USER``.

Exit codes: 0 ok, 1 gate verdict not PROMOTE (only with ``--fail-on-reject``), 2 usage / invalid request,
3 authentication or authorization, 4 conflict (stale revision, failed gate, retired version), 5 server or
connection error, 6 not found.
"""

from __future__ import annotations

import difflib
import getpass
import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

EXIT_REJECTED, EXIT_USAGE, EXIT_AUTH, EXIT_CONFLICT, EXIT_SERVER, EXIT_NOT_FOUND = 1, 2, 3, 4, 5, 6
_RETRIES = 3
PENDING_WAIT_S = 10.0
"""How long a mutating command waits for its MLflow writes before saying they are pending (bounded: an MLflow
outage must not hang the command; the writes are durable in the registry database either way)."""

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="OPRD_REGISTRY_URL", help="Registry URL; unset = in-process on the local database."
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="OPRD_TOKEN", help="Bearer token (prefer the env var).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]
AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
ExpectOpt = Annotated[
    int | None, typer.Option("--expect-revision", help="Alias revision you saw; default: read it now.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--idempotency-key", help="Reuse to retry safely; default: a fresh key per call."),
]

# Not a terminal (CI logs, pipes): rich would assume 80 columns and wrap every cell of the decision tables.
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)


class RegistryCall:
    """One connection to the registry: HTTP when ``url`` is set, else the app in-process."""

    def __init__(self, url: str | None, token: str | None, *, reconcile: bool = True) -> None:
        # reconcile=False (read-only commands in-process): no exit-time MLflow writes, so `status` reports drift
        # as it is instead of racing a repair.
        self.url, self.token, self.reconcile = url, token, reconcile
        self._client: Any = None
        self._pending_models: set[str] = set()
        """Models whose MLflow writes the server answered as still pending (``OPRD-MLflow: pending``)."""

    def __enter__(self) -> RegistryCall:
        if self.url:
            self._client = httpx.Client(base_url=self.url.rstrip("/"), timeout=60.0)
        else:
            from fastapi.testclient import TestClient

            from server.app import create_app

            # No background reconciler in-process: its pass may sit in an MLflow call the client retries for
            # minutes, and stopping it joins that thread. This command's writes are applied once, at exit, by
            # the bounded drain below (``_drain_mlflow_writes``).
            self._client = TestClient(
                create_app(local_actor=getpass.getuser(), run_reconciler=False),
                raise_server_exceptions=False,
            )
            self._client.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.url:
            try:
                if self._pending_models and not exc[0]:
                    self._wait_remote_mirror()
            finally:
                self._client.close()
            return
        try:
            if self.reconcile:
                from oprd_ci.events_cli import drain_local_events

                self._drain_mlflow_writes()
                drain_local_events(self._client.app)  # this command's events to the webhooks (bounded)
        finally:
            self._client.__exit__(*exc)

    def _wait_remote_mirror(self, timeout_s: float = PENDING_WAIT_S) -> None:
        """Over HTTP: the server answered before its reconciler applied this command's MLflow writes. Poll the
        models' backlog (database only, no MLflow read) for up to ``timeout_s`` and say "pending" only when
        writes are still waiting then."""
        import time

        deadline = time.monotonic() + timeout_s
        left: dict[str, int] = {}
        while True:
            left = {}
            for name in sorted(self._pending_models):
                s = self._get_quiet(f"/v1/models/{name}/status?mlflow=false")
                n = s.get("pending_mlflow_writes", 0) if isinstance(s, dict) else 1
                if n:
                    left[name] = n
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        for name, n in left.items():
            err.print(
                f"[yellow]MLflow pending: {n} write(s) of {name} not applied after {timeout_s:.0f} s; the registry "
                "database has them and the service keeps retrying (`oprd-ci status`)[/]"
            )

    def _drain_mlflow_writes(self) -> None:
        """In-process, this command *is* the registry: its pending MLflow writes (outbox rows) are applied before it
        exits, or nobody would apply them until the next registry process. Bounded, never waiting on MLflow past
        its settings: when rows are pending, one read first checks that MLflow answers within
        ``OPRD_MLFLOW_REQUEST_TIMEOUT_S`` (remote stores only); then the reconciler's passes run on a daemon thread joined for at most
        ``OPRD_MLFLOW_EXIT_DRAIN_S`` (an abandoned pass cannot hold up the exit; every write is idempotent and the
        rows it did not mark stay pending). Whatever is left is said on one line; nothing is lost: the rows stay in
        the registry database for the next registry process (``oprd-ci status`` / ``oprd-ci reconcile``)."""
        import threading
        import time
        from urllib.parse import urlsplit

        from server.mlflow_guard import MlflowSkipped, MlflowUnavailable

        state = self._client.app.state
        reconciler, settings, guard = state.reconciler, state.settings, state.mlflow_guard
        if reconciler.mirror is None:
            if self._pending_models:
                err.print(
                    "[yellow]MLflow pending: mirroring is off (OPRD_MLFLOW_ENABLED=false); the registry database "
                    "has the change (`oprd-ci status`)[/]"
                )
            return
        if not reconciler.pending_count():
            return  # nothing to write: no MLflow call at all
        if urlsplit(settings.mlflow_tracking_uri).scheme not in ("", "file", "sqlite"):
            # A remote store may accept and never answer: ask one bounded read first. (A local store is skipped:
            # a fresh SQLite store runs its migrations on first use, seconds, and it cannot be a black hole.)
            probe = guard.deadline(settings.mlflow_request_timeout_s)
            try:
                guard.call(
                    reconciler.mirror.aliases, next(iter(self._pending_models), "oprd-probe"), deadline=probe
                )
            except Exception as exc:  # an MLflow answer (an error code) is fine: it is up
                if isinstance(exc, MlflowUnavailable):
                    t = settings.mlflow_request_timeout_s
                    why = (
                        f"MLflow did not answer within {t:g} s"
                        if isinstance(exc, MlflowSkipped)
                        else str(exc)
                    )
                    self._say_pending(reconciler.pending_count(), why)
                    return
        reconciler.mirror.client  # noqa: B018 - imports mlflow here (local CPU), not on the clock of the join below
        outcome: list[Any] = []

        def drain() -> None:
            try:
                while True:
                    result = reconciler.run_once()
                    if (
                        result.pending == 0 or result.outage or result.skipped
                    ):  # skipped: another process applies
                        break
                    time.sleep(0.2)
                outcome.append(result)
            except Exception as e:  # reported below as the reason the rows stay pending
                outcome.append(e)

        worker = threading.Thread(target=drain, name="oprd-cli-drain", daemon=True)
        worker.start()
        worker.join(settings.mlflow_exit_drain_s)
        left = reconciler.pending_count()
        if worker.is_alive():
            why = (
                f"MLflow did not answer within {settings.mlflow_exit_drain_s:g} s (OPRD_MLFLOW_EXIT_DRAIN_S)"
            )
        elif outcome and isinstance(outcome[0], Exception):
            why = f"{type(outcome[0]).__name__}: {outcome[0]}"
        else:
            why = reconciler.last_error or "busy"
        if left:
            self._say_pending(left, why)

    @staticmethod
    def _say_pending(n: int, why: str) -> None:
        err.print(
            f"[yellow]MLflow pending: {n} write(s) not applied ({why[:300]}); nothing is lost: the registry "
            "database keeps them and the next registry process applies them (`oprd-ci status`, `oprd-ci "
            "reconcile`)[/]",
            highlight=False,
            soft_wrap=True,
        )

    def __call__(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict | None = None,
        key: str | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """Send one request (mutations retried on transport errors with the same Idempotency-Key);
        exits with the code for the error class on any non-2xx answer (``missing_ok``: 404 -> None)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if method != "GET":
            headers["Idempotency-Key"] = key or f"cli-{uuid.uuid4().hex}"
        for attempt in range(1, _RETRIES + 1):
            try:
                r = self._client.request(method, path, json=body, params=params, headers=headers)
                break
            except httpx.TransportError as exc:
                if attempt == _RETRIES:
                    _fail(EXIT_SERVER, f"registry unreachable at {self.url}: {exc}")
        if r.status_code == 404 and missing_ok:
            return None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            message = _detail_text(detail)
            if r.status_code == 404:
                message += self._not_found_hint(path)
            code = {
                401: EXIT_AUTH,
                403: EXIT_AUTH,
                404: EXIT_NOT_FOUND,
                409: EXIT_CONFLICT,
                412: EXIT_CONFLICT,
            }.get(r.status_code, EXIT_SERVER if r.status_code >= 500 else EXIT_USAGE)
            # The status code picks the exit code; the message is the server's reason, not "HTTP 404".
            _fail(code, message)
        mirrored = r.headers.get("OPRD-MLflow")
        if mirrored == "pending":  # committed; said only if still pending after this command's bounded wait
            data = r.json()
            name = _model_of(path, body, data)
            if name:
                self._pending_models.add(name)
            return data
        if mirrored:  # committed, and MLflow refused a write (parked): waiting cannot change that
            err.print(
                f"[yellow]MLflow {mirrored}: the registry database has the change; see `oprd-ci status`[/]"
            )
        return r.json()

    def _not_found_hint(self, path: str) -> str:
        """For ``/v1/models/<name>/...`` answered 404: the closest known model names, or the known versions."""
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "models"]:
            return ""
        name = parts[2]
        try:
            names = self._get_quiet("/v1/models") or []
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                known = ", ".join(names[:20]) or "none yet (run the gate stage or `oprd-ci gate`)"
                return f"{hint} (known models: {known})"
            versions = self._get_quiet(f"/v1/models/{name}/versions") or []
            listed = ", ".join(f"v{v['version']}" for v in versions[-20:]) or "none"
            return f" (known versions of {name}: {listed})"
        except Exception:  # a hint must never hide the original error
            return ""

    def _get_quiet(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        r = self._client.request("GET", path, headers=headers)
        return r.json() if r.status_code == 200 else None


def _model_of(path: str, body: Any, answer: Any) -> str | None:
    """The model a mutation touched: ``/v1/models/<name>/...``, else the body's or the answer's ``model``."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v1", "models"]:
        return parts[2]
    for doc in (body, answer, (answer or {}).get("decision") if isinstance(answer, dict) else None):
        if isinstance(doc, dict) and isinstance(doc.get("model"), str):
            return doc["model"]
    return None


def _detail_text(detail: Any) -> str:
    """The API's ``detail`` as one line: FastAPI's request-validation list (``[{"loc", "msg", "input"}]``) becomes
    ``name 'bad name!': String should match pattern ...``; anything else unknown is shown as JSON."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        parts = []
        for d in detail:
            loc = [str(x) for x in d.get("loc", []) if x not in ("body", "path", "query")]
            where = ".".join(loc)
            shown = f" {d['input']!r}" if "input" in d and not isinstance(d["input"], (dict, list)) else ""
            parts.append(f"{where}{shown}: {d['msg']}" if where else d["msg"])
        return "; ".join(parts)
    return json.dumps(detail)


def _fail(code: int, message: str) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _emit(data: Any, as_json: bool, render) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        render(data)


def _revision(call: RegistryCall, name: str, alias: str) -> int:
    status = call(
        "GET", f"/v1/models/{name}/status", params={"mlflow": "false"}
    )  # the database's revision only
    return next((a["revision"] for a in status["aliases"] if a["alias"] == alias), 0)


# ------------------------------------------------------------------------------------------------ renderers
def _render_alias(a: dict) -> None:
    console.print(f"{a['model']}@{a['alias']} -> v{a['version']} (revision {a['revision']})")


def _render_decision(d: dict) -> None:
    color = {"PROMOTE": "green", "REJECT": "red", "INCONCLUSIVE": "yellow"}[d["verdict"]]
    before = f"champion then v{d['champion_version']}" if d.get("champion_version") else "no champion before"
    console.print(
        f"decision {d['id']}: {d['model']} v{d['version']} [bold {color}]{d['verdict']}[/] (policy v{d['policy_version']}, {before})"
    )
    t = Table("criterion", "suite", "status", "observed", "threshold", "detail")
    for c in d["criteria"]:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        t.add_row(
            c["criterion"],
            c["suite"] or "",
            "n/a" if c["status"] == "NOT_APPLICABLE" else c["status"],
            fmt(c["observed"]),
            fmt(c["threshold"]),
            c["detail"],
        )
    console.print(t)


def _render_status(s: dict) -> None:
    t = Table(
        "alias", "version", "revision", "since", "mlflow", title=f"{s['model']} ({s['versions']} versions)"
    )
    ml = s["mlflow_aliases"]
    for a in s["aliases"]:
        t.add_row(
            a["alias"],
            str(a["version"]),
            str(a["revision"]),
            str(a["updated_at"]),
            "?" if ml is None else str(ml.get(a["alias"], "-")),
        )
    console.print(t)
    if s["champion_decision"]:
        _render_decision(s["champion_decision"])
    parked = s.get("parked_mlflow_writes", 0)
    if s["pending_mlflow_writes"] or parked or s["last_mlflow_error"]:
        age = s.get("oldest_pending_age_s")
        console.print(
            f"[yellow]MLflow {s.get('mlflow_state', 'ok')}: {s['pending_mlflow_writes']} pending writes, {parked} "
            "parked (refused by MLflow or failing past their budget: `oprd-ci outbox list`)"
            f"{f'; oldest pending {age:.0f} s' if age is not None else ''}; last error: {s['last_mlflow_error']}[/]"
        )


def alias_disagreements(s: dict) -> list[str]:
    """Where MLflow's aliases differ from the registry's (the registry is authoritative), one line each;
    empty when they agree or MLflow was not read."""
    ml = s.get("mlflow_aliases")
    if ml is None:
        return []
    ours = {a["alias"]: a["version"] for a in s["aliases"]}
    out = []
    for alias in sorted(set(ours) | set(ml)):
        mine, theirs = ours.get(alias), ml.get(alias)
        if mine != theirs:
            out.append(
                f"{s['model']}@{alias}: registry says "
                + (f"v{mine}" if mine is not None else "no such alias")
                + ", MLflow says "
                + (f"v{theirs}" if theirs is not None else "no such alias")
            )
    return out


def _render_history(events: list) -> None:
    t = Table(
        "seq", "when", "action", "alias", "from", "to", "actor", "reason", "decision", "policy", "override"
    )
    for e in events:
        t.add_row(
            *(
                str(e[k]) if e[k] is not None else ""
                for k in (
                    "seq",
                    "created_at",
                    "action",
                    "alias",
                    "from_version",
                    "to_version",
                    "actor",
                    "reason",
                    "decision_id",
                    "policy_version",
                )
            ),
            "yes" if e["override"] else "",
        )
    console.print(t)


def _short(digest: str | None, n: int = 12) -> str:
    """``teacher@<sha>`` / ``sha256:<hex>`` / ``<hex>`` -> the first ``n`` hex chars (``-`` when missing)."""
    if not digest:
        return "-"
    tail = digest.rsplit("@", 1)[-1].split(":", 1)[-1]
    return (digest.rsplit("@", 1)[0] + "@" if "@" in digest else "") + tail[:n]


UI_ENV = "OPRD_MLFLOW_UI_URL"


def ui_base(explicit: str | None = None) -> str:
    """The MLflow UI address links point at: ``--mlflow-ui``, else ``$OPRD_MLFLOW_UI_URL``, else the tracking
    server when it is http(s) (``$OPRD_MLFLOW_TRACKING_URI``, the registry's, then ``$MLFLOW_TRACKING_URI``: an
    MLflow server is its own UI). ``""`` when none is configured: a file or database store has no UI address, and
    guessing one (``mlflow ui``'s default port) prints links that break on any other port."""
    import os

    tracking = os.environ.get("OPRD_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    base = (
        explicit
        or os.environ.get(UI_ENV)
        or (tracking if tracking.startswith(("http://", "https://")) else "")
    )
    return base.rstrip("/")


def lineage_chain(out: dict, base: str) -> list[tuple[str, str, str]]:
    """``(what, identity, MLflow link)`` rows for the version: the concepts of
    :data:`pipelines.lineage.LINK_LABELS`, linked by :func:`pipelines.lineage.lineage_links` (the version page's
    link plan, so both point at the same pages), then the evaluation datasets. ``base=""`` gives ``#/...`` links
    relative to the MLflow UI."""
    from pipelines.lineage import LINK_LABELS, lineage_links

    ml = out.get("mlflow") or {}
    runs, models = ml.get("runs", {}), ml.get("logged_models", {})
    v = out["version"]
    lin = (out.get("evidence") or {}).get("lineage", {})
    run_ids = {
        **(lin.get("mlflow_run_ids") or {}),
        **{s: r["run_id"] for s, r in runs.items() if r.get("run_id")},
    }
    model_ids = {
        **(lin.get("logged_model_ids") or {}),
        **{role: m["model_id"] for role, m in models.items() if m.get("model_id")},
    }
    exp = next((r.get("experiment_id") for r in runs.values() if r.get("experiment_id")), None)
    links = lineage_links(
        base, model_name=out["model"], version=v["version"], experiment_id=exp, run_ids=run_ids,
        model_ids=model_ids,
    )  # fmt: skip
    digests = lin.get("dataset_digests") or {}
    identity = {
        "version": f"sha256 {_short(v['manifest_sha256'])} [{v['status']}]",
        "teacher": _short(lin.get("teacher")),
        "student_base": f"sha256 {_short(lin.get('student_base'))}",
        "student": f"sha256 {_short(v['manifest_sha256'])}",
        "training_data": ", ".join(f"{k} {_short(d)}" for k, d in digests.items() if k.startswith("train"))
        or "-",
        "picture": "lineage/lineage.png",
    }
    if "@" not in identity["teacher"]:
        identity["teacher"] = f"sha256 {identity['teacher']}"
    for stage in ("rollout", "distill", "evaluate", "gate"):
        r = runs.get(stage) or {}
        rid = run_ids.get(stage)
        identity[stage] = f"{rid[:8]} {r.get('status', r.get('error', ''))}".strip() if rid else "-"
    rows = []
    for concept, label in LINK_LABELS.items():
        if concept == "picture" and concept not in links:
            continue
        what = f"{out['model']} v{v['version']}" if concept == "version" else label
        rows.append((what, identity[concept], links.get(concept, "")))
    for name, digest in digests.items():
        if not name.startswith("train"):
            rows.append((f"dataset {name}", f"sha256 {_short(digest)}", links.get("evaluate", "")))
    return rows


def _render_lineage(out: dict, base: str) -> None:
    ev = out["evidence"] or {}
    t = Table("what", "identity", "MLflow", title=f"lineage of {out['model']} v{out['version']['version']}")
    for row in lineage_chain(out, base):
        t.add_row(*row)
    console.print(t)
    if not base:
        err.print(
            f"[yellow]links are relative to the MLflow UI: set {UI_ENV} (or --mlflow-ui) to its address, "
            "e.g. http://127.0.0.1:5000, for full links[/]"
        )
    cost = ev.get("cost") or {}
    if cost:
        console.print(f"cost: {cost.get('device_hours', 0):.4g} device-hours, ${cost.get('usd', 0):.4g}")
    for d in out["decisions"]:
        _render_decision(d)
    _render_history(out["audit"])


# ------------------------------------------------------------------------------------------------ commands
def serve(
    host: Annotated[str, typer.Option(help="Bind address (keep it loopback or private).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes (PostgreSQL only; SQLite has one writer).")
    ] = 1,
) -> None:
    """Run the registry service (settings from OPRD_* environment variables)."""
    import uvicorn

    from server.settings import ServerSettings

    if workers > 1 and ServerSettings().database_url.startswith("sqlite"):
        _fail(
            EXIT_USAGE, "--workers > 1 needs PostgreSQL (OPRD_DATABASE_URL); SQLite serves from one process"
        )
    if workers > 1:
        from server.app import prepare_for_workers

        prepare_for_workers()  # schemas and tokens once, before the workers race to create them
    settings = ServerSettings()
    if settings.watch_interval_s:  # OPRD_WATCH_INTERVAL_S: triggers -> cycles (docs/triggers.md)
        from oprd_ci.watch_cli import start_watch_thread

        start_watch_thread(settings.watch_interval_s, settings.watch_repo)
    uvicorn.run("server.app:app_from_env", factory=True, host=host, port=port, workers=workers)


def promote(
    name: str,
    version: Annotated[int, typer.Argument(min=1)],
    reason: ReasonOpt,
    alias: AliasOpt = "champion",
    expect_revision: ExpectOpt = None,
    override: Annotated[bool, typer.Option(help="Admin: promote despite the policy.")] = False,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point ALIAS of NAME at VERSION (the policy decision must be PROMOTE unless --override)."""
    with RegistryCall(url, token) as call:
        rev = expect_revision if expect_revision is not None else _revision(call, name, alias)
        body = {"version": version, "expected_revision": rev, "reason": reason, "override": override}
        _emit(
            call("POST", f"/v1/models/{name}/aliases/{alias}/promote", body=body, key=idempotency_key),
            as_json,
            _render_alias,
        )


def rollback(
    name: str,
    reason: ReasonOpt,
    to: Annotated[int | None, typer.Option("--to", min=1, help="A version from the alias history.")] = None,
    alias: AliasOpt = "champion",
    expect_revision: ExpectOpt = None,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move ALIAS of NAME back to the previously promoted version (or --to VERSION)."""
    with RegistryCall(url, token) as call:
        rev = expect_revision if expect_revision is not None else _revision(call, name, alias)
        body = {"expected_revision": rev, "reason": reason, "to_version": to}
        _emit(
            call("POST", f"/v1/models/{name}/aliases/{alias}/rollback", body=body, key=idempotency_key),
            as_json,
            _render_alias,
        )


def retire(
    reason: ReasonOpt,
    name: Annotated[str | None, typer.Argument()] = None,
    version: Annotated[int | None, typer.Argument(min=1)] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="Retire every student of this teacher instead.")
    ] = None,
    apply_policy: Annotated[
        bool,
        typer.Option(
            "--apply-policy",
            help="Retire what the retirement rules of NAME's policy (every model's without NAME) select.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --apply-policy: only show the plan.")
    ] = False,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire NAME VERSION, every version distilled from --teacher, or what --apply-policy selects."""
    if apply_policy:
        if teacher is not None or version is not None:
            raise typer.BadParameter("--apply-policy takes at most NAME (no VERSION, no --teacher)")
        from oprd_ci.retire_policy_cli import retire_by_policy

        retire_by_policy(name, reason=reason, dry_run=dry_run, url=url, token=token, as_json=as_json)
        return
    if (teacher is None) == (name is None or version is None):
        raise typer.BadParameter("give either NAME VERSION or --teacher")
    with RegistryCall(url, token) as call:
        if teacher is not None:
            out = call(
                "POST",
                "/v1/teachers/retire",
                body={"teacher": teacher, "reason": reason},
                key=idempotency_key,
            )
        else:
            out = call(
                "POST",
                f"/v1/models/{name}/versions/{version}/retire",
                body={"reason": reason},
                key=idempotency_key,
            )

        def render(o: dict) -> None:
            for v in o["retired"]:
                console.print(f"retired {v['model']} v{v['version']}")
            for a in o["aliases_on_retired"]:
                console.print(f"[yellow]{a} still points at a retired version: roll it back[/]")

        _emit(out, as_json, render)


def status(name: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Aliases of NAME, the champion's decision, and MLflow agreement (exit 4 when MLflow disagrees)."""
    s = _local_status(name) if not url else None
    if s is None:  # over HTTP, or an error to report with the API's wording and hints
        with RegistryCall(url, token, reconcile=False) as call:
            s = call("GET", f"/v1/models/{name}/status")
    _emit(s, as_json, _render_status)
    _say_mlflow_behind(s)
    if problems := alias_disagreements(s):
        _fail(
            EXIT_CONFLICT,
            "MLflow's aliases disagree with the registry (the registry is authoritative; pending writes: "
            f"{s['pending_mlflow_writes']}): "
            + "; ".join(problems)
            + f". Run `oprd-ci reconcile {name}` to make MLflow match the registry (a running `oprd-ci serve` also "
            "repairs it within a few passes).",
        )


def _local_status(name: str) -> dict | None:
    """In-process ``status`` without the web app (the daily command: ~1 s instead of ~3 s, README "CLI start-up"):
    the same query the API runs (``server.status``); ``None`` on any registry error, which the caller then gets
    from the in-process app with the API's message, exit code and did-you-mean hint."""
    from server.errors import RegistryError
    from server.settings import ServerSettings
    from server.status import local_status

    try:
        return local_status(ServerSettings(), name).model_dump(mode="json")
    except RegistryError:
        return None


def reconcile(
    name: Annotated[
        str | None, typer.Argument(help="Repair this model's aliases (default: every model's).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Give up after this many seconds (MLflow down).")
    ] = 60.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make MLflow match the registry: apply pending MLflow writes, then re-point MLflow aliases that differ
    from the registry's (the registry is authoritative). Needs no running server (with --url it asks the
    server to do it). Exit 0 in sync, 4 MLflow still disagrees (refused writes: see history), 5 MLflow
    unreachable or too slow."""
    if url:
        with RegistryCall(url, token, reconcile=False) as call:
            out = call("POST", "/v1/reconcile")
            out |= {"model": name, "timed_out": False, "disagreements": []}
            if name:
                out["disagreements"] = alias_disagreements(call("GET", f"/v1/models/{name}/status"))
    else:
        out = _reconcile_local(name, timeout)
    _emit(out, as_json, _render_reconcile)
    if out["timed_out"] or (out["pending"] and out["errors"]):
        _fail(
            EXIT_SERVER,
            f"MLflow unreachable or too slow ({(out['errors'] or ['no answer within the timeout'])[-1]}); nothing is "
            f"lost: the registry database keeps {out['pending']} pending write(s); run `oprd-ci reconcile` again",
        )
    if out["disagreements"]:
        _fail(
            EXIT_CONFLICT,
            "MLflow still disagrees: "
            + "; ".join(out["disagreements"])
            + (
                f" ({out['parked']} write(s) MLflow refused are parked: `oprd-ci history {name or 'NAME'}` "
                "says why)"
                if out["parked"]
                else ""
            ),
        )


def _reconcile_local(name: str | None, timeout_s: float) -> dict:
    """One reconciler pass (``server.reconciler.Reconciler.run_once`` with drift repair) in this process, on the
    registry database and MLflow store of ``ServerSettings()``, run in a worker thread joined with ``timeout_s``
    (an unreachable MLflow server retries for minutes; every write is idempotent, so abandoning the pass loses
    nothing). Then MLflow's aliases of ``name`` are read back (bounded by the request-path guard)."""
    import threading

    from sqlalchemy import select

    from server.db import Database
    from server.migrate import upgrade
    from server.mlflow_guard import MlflowGuard
    from server.orm import RegisteredModel
    from server.reconciler import Reconciler, ReconcileResult
    from server.settings import ServerSettings
    from server.status import model_status

    settings = ServerSettings()
    if not settings.mlflow_enabled:
        _fail(
            EXIT_USAGE, "MLflow mirroring is off (OPRD_MLFLOW_ENABLED=false): there is nothing to reconcile"
        )
    db = Database(settings)
    upgrade(db.engine)
    with db.read() as s:
        names = list(s.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)))
    if name is not None and name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        _fail(
            EXIT_NOT_FOUND, f"name: no model {name!r}{hint} (known models: {', '.join(names[:20]) or 'none'})"
        )
    reconciler = Reconciler.from_settings(db, settings)
    mirror = reconciler.mirror
    total = ReconcileResult()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            r = reconciler.run_once(check_drift=True, models=[name] if name else None, now=True)
            total.applied, total.pending, total.parked = r.applied, r.pending, r.parked
            total.errors, total.drift_fixed = r.errors, r.drift_fixed
            if r.skipped:
                total.errors.append(
                    "another registry process holds the applier lock (it reconciles on its own)"
                )
        except Exception as exc:  # reported as one line, like an outage
            failure.append(exc)

    worker = threading.Thread(target=work, name="oprd-reconcile", daemon=True)
    worker.start()
    worker.join(timeout_s)
    timed_out = worker.is_alive()
    if failure:
        total.errors.append(f"{type(failure[0]).__name__}: {failure[0]}"[:500])
    disagreements: list[str] = []
    if not timed_out:
        if failure:
            total.pending = reconciler.pending_count()
        guard = MlflowGuard.from_settings(settings)
        try:
            for n in [name] if name else names:
                st = model_status(db, n, mirror=mirror, guard=guard).model_dump(mode="json")
                disagreements += alias_disagreements(st)
        finally:
            guard.shutdown()
            db.dispose()
    return {
        "model": name,
        "applied": total.applied,
        "drift_fixed": total.drift_fixed,
        "pending": total.pending if not timed_out else reconciler.stats.pending,
        "parked": total.parked,
        "errors": total.errors,
        "timed_out": timed_out,
        "disagreements": disagreements,
    }


def _render_reconcile(o: dict) -> None:
    console.print(f"applied {o['applied']} pending MLflow write(s)")
    for line in o["drift_fixed"]:
        console.print(f"repaired drift: {line}")
    if not o["drift_fixed"] and not o["disagreements"] and not o["timed_out"] and not o["errors"]:
        console.print(f"MLflow agrees with the registry{' for ' + o['model'] if o['model'] else ''}")


def history(
    name: str,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    cost: Annotated[
        bool,
        typer.Option(
            "--cost",
            help="Per version: accuracy, tokens/response, device-hours, cost, $/point and what the gate flagged.",
        ),
    ] = False,
    alias: Annotated[
        str, typer.Option("--alias", help="With --cost: the alias whose promotions count.")
    ] = "champion",
    triggers: Annotated[
        bool, typer.Option("--triggers", help="Only the triggers: trigger -> experiment -> decision.")
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log of NAME (every alias move, retirement and policy change), then its triggers (trigger ->
    experiment -> decision, `oprd-ci watch`); with --cost, cost over time (the ``limit`` most recent versions, at
    most 10,000)."""
    if cost:
        with RegistryCall(url, token, reconcile=False) as call:
            rows = call(
                "GET", f"/v1/models/{name}/cost-history", params={"alias": alias, "limit": min(limit, 10_000)}
            )
        _emit(rows, as_json, render_cost_history)
        return
    with RegistryCall(url, token) as call:
        events = call("GET", f"/v1/models/{name}/history", params={"limit": limit})
        cycles = call("GET", f"/v1/models/{name}/triggers", params={"limit": min(limit, 10_000)})
    if triggers:
        _emit(cycles, as_json, render_triggers)
        return
    _emit(events, as_json, _render_history)
    if cycles and not as_json:
        render_triggers(cycles)


def _short_key(key: str) -> str:
    """``failure-bank:<64 hex>`` -> ``failure-bank:<12 hex>`` (``--json`` keeps the whole key)."""
    head, _, tail = key.rpartition(":")
    return f"{head}:{tail[:12]}" if head and len(tail) == 64 else key


def render_triggers(rows: list) -> None:
    """The ``history`` triggers table: trigger -> DVC experiment -> decision (docs/triggers.md)."""
    t = Table("trigger", "when", "kind", "key", "status", "experiment", "decision", "verdict", "version",
              title="triggers (oprd-ci watch)")  # fmt: skip
    for col in t.columns:  # keys are identifiers: wrap them whole, never cut them
        col.overflow = "fold"
    t.columns[5].min_width = max((len(r["exp_name"] or "") for r in rows), default=10)  # `dvc exp` names it
    for r in rows:
        status = r["status"] + (f" into {r['coalesced_into']}" if r["coalesced_into"] else "")
        if r.get("error"):
            status += f": {r['error'][:120]}"
        t.add_row(
            str(r["id"]), str(r["created_at"])[:16].replace("T", " "), r["kind"], _short_key(r["key"]), status, r["exp_name"] or "",
            str(r["decision_id"] or ""), r["verdict"] or "", f"v{r['version']}" if r["version"] else "",
        )  # fmt: skip
    console.print(t)


def render_cost_history(rows: list) -> None:
    """The ``history --cost`` table: one row per version, suites as columns (Avg@k in %)."""
    suites = sorted({s for r in rows for s in r["accuracy"]})
    t = Table("version", "status", *(f"{s} %" for s in suites), "tokens/resp", "device-h", "cost $", "$/point",
              "flagged")  # fmt: skip
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    colors = {"champion": "bold green", "promoted": "green", "rejected": "red", "retired": "dim"}
    for r in rows:
        style = colors.get(r["status"], "")
        t.add_row(
            f"v{r['version']}",
            f"[{style}]{r['status']}[/]" if style else r["status"],
            *(fmt(100 * r["accuracy"][s] if s in r["accuracy"] else None, ".1f") for s in suites),
            fmt(r["tokens_per_response"], ".1f"),
            fmt(r["device_hours"], ".4g"),
            fmt(r["usd"], ".4g"),
            fmt(r["usd_per_point"], ".4g"),
            ", ".join(r["flagged"]) if r["flagged"] else "",
        )
    console.print(t)


def parse_target(target: str) -> tuple[str, dict[str, Any]]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, query params)."""
    if "@" in target:
        name, alias = target.split("@", 1)
        return name, {"alias": alias}
    if "/" in target:
        name, version = target.split("/", 1)
        if not version.isdigit():
            raise typer.BadParameter(f"{target!r}: the part after '/' must be a version number")
        return name, {"version": int(version)}
    return target, {}


def lineage(
    target: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME/VERSION (default alias: champion)")],
    evidence: Annotated[
        bool, typer.Option("--evidence", help="With --json: keep the per-problem evidence (large).")
    ] = False,
    mlflow_ui: Annotated[
        str | None,
        typer.Option(
            "--mlflow-ui",
            help=f"MLflow UI address for the links (default: ${UI_ENV}, else an http(s) tracking URI).",
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Teacher -> student chain with short hashes and MLflow links, decisions and alias moves."""
    name, params = parse_target(target)
    with RegistryCall(url, token) as call:
        out = call("GET", f"/v1/models/{name}/lineage", params=params)
    if not evidence and out.get("evidence"):
        suites = out["evidence"].pop("suites", None) or {}
        out["evidence"]["suites_summary"] = {
            s: {role: len(rows) for role, rows in roles.items() if isinstance(rows, list)}
            for s, roles in suites.items()
        }
    base = ui_base(mlflow_ui)
    out["links"] = [{"what": w, "identity": i, "url": u} for w, i, u in lineage_chain(out, base)]
    _emit(out, as_json, lambda o: _render_lineage(o, base))
    _say_mlflow_behind(out)


def _say_mlflow_behind(answer: dict) -> None:
    """One line on stderr when the answer's MLflow part is incomplete (``mlflow_read``: the request's MLflow reads
    ran past their bounds); the registry part of the answer is complete either way, and the exit code is
    unchanged."""
    read = answer.get("mlflow_read") or {}
    if read.get("state") not in ("partial", "unavailable"):
        return
    missing = f"{read['missing']} of {read['answered'] + read['missing']} MLflow reads missing"
    err.print(
        f"[yellow]MLflow did not answer in time (budget {read['budget_s']:g} s, {missing}); showing the registry's view[/]",
        highlight=False,
        soft_wrap=True,
    )


def gate(
    evidence: Annotated[
        Path,
        typer.Option(
            "--evidence", exists=True, dir_okay=False, help="Gate file (server.schemas.EvidenceIn JSON)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the result here (e.g. metrics/gate.json).")
    ] = None,
    alias: AliasOpt = "champion",
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="Move the alias on PROMOTE.")
    ] = True,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            exists=True,
            dir_okay=False,
            help="The policy this gate must run under: installed if the model has none (admin); refused if "
            "it differs from the installed one unless --install-policy.",
        ),
    ] = None,
    install_policy: Annotated[
        bool, typer.Option(help="Install --policy as the next policy version when it differs (admin).")
    ] = False,
    policy_reason: Annotated[
        str | None, typer.Option(help="Audit reason for --install-policy (required with it).")
    ] = None,
    fail_on_reject: Annotated[bool, typer.Option(help="Exit 1 unless the verdict is PROMOTE.")] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why; recorded on the alias move with the decision id.")
    ] = None,
    idempotency_key: KeyOpt = None,
    trigger_id: Annotated[
        int | None,
        typer.Option("--trigger-id", min=1, help="The trigger whose cycle this gate ends (`oprd-ci watch`)."),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register the candidate, submit its evidence, print the decision (and move ALIAS on PROMOTE)."""
    try:
        body = json.loads(evidence.read_text())
    except ValueError as exc:
        raise typer.BadParameter(f"{evidence}: not JSON ({exc})") from exc
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise typer.BadParameter(f"{evidence}: needs a string 'model' field")
    with RegistryCall(url, token) as call:
        if policy is not None:
            _ensure_policy(call, name, policy, install=install_policy, reason=policy_reason)
        result = call(
            "POST",
            "/v1/gate",
            body=body,
            params={
                "promote": promote,
                "alias": alias,
                **({"reason": reason} if reason else {}),
                **({"trigger_id": trigger_id} if trigger_id else {}),
            },
            key=idempotency_key,
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    def render(r: dict) -> None:
        _render_decision(r["decision"])
        if r["promoted"]:
            _render_alias(r["promoted"])

    _emit(result, as_json, render)
    if fail_on_reject and result["decision"]["verdict"] != "PROMOTE":
        raise typer.Exit(EXIT_REJECTED)


def _ensure_policy(
    call: RegistryCall, name: str, policy: Path, *, install: bool = False, reason: str | None = None
) -> None:
    """Make ``policy`` the one the gate runs under (``server.policy_sync.plan_policy``): proceed when it equals
    the installed policy, install it when there is none or when ``install`` (with ``reason``; needs admin, the
    in-process local user is admin), else exit 4 with the command that installs it."""
    from server.policy import PolicySpec, load_policy_file
    from server.policy_sync import PolicyMismatch, plan_policy

    try:
        spec = load_policy_file(policy)
    except ValueError as exc:
        raise typer.BadParameter(f"{policy}: {exc}") from exc
    current = call("GET", f"/v1/models/{name}/policy", missing_ok=True)
    installed = PolicySpec.model_validate(current["spec"]) if current else None
    try:
        plan = plan_policy(
            name, policy, spec, installed, current and current["version"], install=install, reason=reason
        )
    except PolicyMismatch as exc:
        _fail(EXIT_CONFLICT, str(exc))
    if plan.action != "same":
        body = {"spec": spec.model_dump(mode="json"), "reason": plan.reason}
        call("PUT", f"/v1/models/{name}/policy", body=body)


policy_app = typer.Typer(help="Show or set the promotion policy of a model.", no_args_is_help=True)


@policy_app.command("show")
def policy_show(name: str, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """The current policy of NAME."""
    import yaml

    with RegistryCall(url, token) as call:
        p = call("GET", f"/v1/models/{name}/policy")
    _emit(
        p,
        as_json,
        lambda d: console.print(
            f"# {d['model']} policy v{d['version']} by {d['created_by']}: {d['reason']}\n"
            + yaml.safe_dump(d["spec"], sort_keys=False)
        ),
    )


@policy_app.command("set")
def policy_set(
    name: str,
    file: Annotated[Path, typer.Option("--file", exists=True, dir_okay=False, help="Policy YAML.")],
    reason: ReasonOpt,
    idempotency_key: KeyOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store FILE as the next policy version of NAME (admin)."""
    from server.policy import load_policy_file

    try:
        spec = load_policy_file(file).model_dump(mode="json")
    except ValueError as exc:
        raise typer.BadParameter(f"{file}: {exc}") from exc
    with RegistryCall(url, token) as call:
        p = call(
            "PUT", f"/v1/models/{name}/policy", body={"spec": spec, "reason": reason}, key=idempotency_key
        )
    _emit(p, as_json, lambda d: console.print(f"{d['model']} policy is now v{d['version']}"))


def register(app: typer.Typer) -> None:
    """Add the registry commands (and the ``policy`` group) to ``app``."""
    from oprd_ci import events_cli

    for fn in (serve, promote, rollback, retire, status, history, lineage, reconcile, gate):
        app.command(fn.__name__)(fn)
    app.add_typer(policy_app, name="policy")
    events_cli.register(app)  # events, webhooks


__all__ = ["register"]
