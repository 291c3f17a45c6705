"""``oprd-ci watch``: turn events into distill-and-gate cycles (:mod:`pipelines.watch`, docs/triggers.md).

``--once`` makes one pass (cron, tests); without it the command loops every ``watch.interval_s`` seconds and
prints one status line per pass. ``oprd-ci serve`` runs the same loop on a thread when ``OPRD_WATCH_INTERVAL_S``
is set (:func:`start_watch_thread`). Exit codes: 0 ok, 1 the cycle waited for (``--wait``) failed, 2 usage /
config, and the registry client's codes (3 auth, 5 server, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from oprd_ci.registry_cli import JsonOpt, RegistryCall, TokenOpt, UrlOpt, console, err


def _pass(repo: Path, params: str, url: str | None, token: str | None, worker: bool | None):
    from pipelines.watch import Watcher

    with RegistryCall(url, token) as call:
        watcher = Watcher(repo, call, params_file=params, registry_url=url, start_worker=worker)
        return watcher, watcher.run_once()


def _trigger(repo: Path, url: str | None, token: str | None, model: str, trigger_id: int) -> dict[str, Any]:
    with RegistryCall(url, token, reconcile=False) as call:
        rows = call("GET", f"/v1/models/{model}/triggers", params={"limit": 1000})
    return next(t for t in rows if t["id"] == trigger_id)


def watch(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit (cron, tests).")] = False,
    repo: Annotated[Path, typer.Option("--repo", help="The DVC project to queue cycles in.")] = Path("."),
    params: Annotated[
        str, typer.Option("--params", help="Its params file (the `watch:` section).")
    ] = "params.yaml",
    interval: Annotated[
        float | None,
        typer.Option("--interval", min=0.1, help="Seconds between passes (default watch.interval_s)."),
    ] = None,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            help="Start `dvc queue start -j 1` after queueing (default watch.start_worker).",
        ),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option("--wait", min=1, help="With --once: wait up to this many seconds for the cycle to end."),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn events (a new MLflow teacher version, a changed teacher manifest, a grown failure bank, a policy
    change) into triggers and queue one distill-and-gate cycle per model at a time as a DVC experiment."""
    from trainer.config import ConfigError

    try:
        if once:
            raise typer.Exit(_once(repo, params, url, token, worker, wait, as_json))
        from trainer.config import load_params

        period = interval or load_params(repo / params).watch.interval_s
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    try:
        watch_loop(repo, params, url, token, worker, period, stop, as_json=as_json)
    except KeyboardInterrupt:
        stop.set()


def _once(
    repo: Path, params: str, url: str | None, token: str | None, worker: bool | None, wait: float | None,
    as_json: bool,
) -> int:  # fmt: skip
    watcher, report = _pass(repo, params, url, token, worker)
    out: dict[str, Any] = {"pass": report.__dict__}
    code = 0
    if wait is not None and report.active is not None:
        if worker is not False and not report.worker_started:
            watcher.start_worker()  # a cycle queued by an earlier pass: this command waits for it, so run it
        state = watcher.wait(report.active["exp_name"], wait)
        _, after = _pass(repo, params, url, token, False)
        model = watcher.params().gate.model_name
        final = _trigger(repo, url, token, model, report.active["id"])
        out.update({"experiment_state": state, "after": after.__dict__, "trigger": final})
        code = 0 if final["status"] == "done" else 1
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        console.print(f"watch: {report.line()}", highlight=False, soft_wrap=True)
        if "trigger" in out:
            t = out["trigger"]
            console.print(
                f"watch: trigger {t['id']} ({t['kind']}) {t['status']}: experiment {t['exp_name']}"
                + (
                    f" -> decision {t['decision_id']} {t['verdict']} v{t['version']}"
                    if t["decision_id"]
                    else ""
                )
                + (f" ({t['error']})" if t.get("error") else ""),
                highlight=False,
                soft_wrap=True,
            )
    return code


def watch_loop(
    repo: Path, params: str, url: str | None, token: str | None, worker: bool | None, period: float,
    stop: threading.Event, *, as_json: bool = False,
) -> None:  # fmt: skip
    """Passes every ``period`` seconds until ``stop`` is set; a failed pass is reported and the next one runs."""
    from mlflow.exceptions import MlflowException

    from trainer.config import ConfigError

    while not stop.is_set():
        started = time.strftime("%H:%M:%S")
        try:
            _, report = _pass(repo, params, url, token, worker)
            line = (
                json.dumps(report.__dict__, default=str) if as_json else f"{started} watch: {report.line()}"
            )
            print(line, flush=True)
        except (typer.Exit, SystemExit) as exc:  # the registry client already printed its one-line reason
            print(f"{started} watch: pass failed (exit {getattr(exc, 'exit_code', exc)})", file=sys.stderr)
        except (ConfigError, RuntimeError, OSError, subprocess.SubprocessError, MlflowException) as exc:
            print(f"{started} watch: pass failed: {exc}", file=sys.stderr, flush=True)
        stop.wait(period)


def start_watch_thread(interval_s: float, repo: Path) -> threading.Event:
    """``oprd-ci serve`` with ``OPRD_WATCH_INTERVAL_S``: the watch loop on a daemon thread against this
    registry's database (in-process calls, as the local admin); returns the event that stops it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=watch_loop, args=(repo, "params.yaml", None, None, None, interval_s, stop), name="oprd-watch",
        daemon=True,
    )  # fmt: skip
    thread.start()
    err.print(f"watch: every {interval_s:g} s on {repo.resolve()}", highlight=False)
    return stop


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)
