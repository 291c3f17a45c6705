"""Model-version sources checked the way an MLflow 3.17 server checks them, before anything is committed.

Mirrors ``mlflow/server/handlers.py`` (``_validate_non_local_source_contains_relative_paths``,
``_validate_source_run``, ``_validate_source_model``): a source is refused when, after repeated URL-decoding,
it holds NUL or ``..`` segments or does not equal its own normalised path; ``runs:/`` needs the run id of the URI,
``models:/m-<id>`` the logged-model id of the URI, and ``mlflow-artifacts:`` the run (or logged model) whose
artifact root contains it. What needs MLflow's stores (is that URI really under that run's artifact root?)
is left to MLflow: a write it refuses is parked by the reconciler instead of blocking the outbox.

Only MLflow-internal schemes are accepted at all (http://, file://, s3:// of an unknown bucket would let a
consumer fetch from an attacker-chosen place). Local paths are the registry's own default (the verified
artifact directory) and are only used with a local MLflow store; an MLflow server refuses them.
"""

from __future__ import annotations

import logging
import posixpath
import re
import threading
import urllib.parse
from typing import TYPE_CHECKING

from server.errors import Invalid

if TYPE_CHECKING:
    from server.mlflow_mirror import MlflowMirror

log = logging.getLogger(__name__)

_SCHEMES = ("runs", "models", "mlflow-artifacts")
_LOGGED_MODEL = re.compile(r"^m-[A-Za-z0-9]+$")


def _unquote_fully(value: str) -> str:
    while (unquoted := urllib.parse.unquote_plus(value)) != value:
        value = unquoted
    return value


def _refuse(source: str, why: str) -> Invalid:
    return Invalid(f"mlflow_source: {source!r} is refused: {why}")


def validate_source(source: str, run_id: str | None, logged_model_id: str | None) -> None:
    """Raise ``Invalid`` (422) for a source an MLflow server would refuse or that is not an MLflow URI."""
    decoded = _unquote_fully(source)
    parsed = urllib.parse.urlparse(decoded)
    if parsed.scheme not in _SCHEMES:
        raise _refuse(
            source, "only runs:/<run_id>/<path>, models:/m-<id> or mlflow-artifacts:/ URIs are accepted"
        )
    path = re.sub(r"/+", "/", parsed.path.rstrip("/"))
    if "\x00" in decoded or any(p == ".." for p in decoded.split("/")) or "\\" in decoded:
        raise _refuse(source, "relative path references ('..') or NUL are not allowed")
    if posixpath.normpath(path) != path or parsed.query or parsed.fragment or parsed.params:
        raise _refuse(source, "the path must be absolute and normalised, without query or fragment")
    if parsed.netloc:
        raise _refuse(source, "a host is not allowed in an MLflow URI here")
    parts = [p for p in path.split("/") if p]
    if parsed.scheme == "runs":
        if not parts or len(parts) < 2:
            raise _refuse(source, "runs:/ needs runs:/<run_id>/<artifact path>")
        if run_id != parts[0]:
            raise _refuse(source, f"mlflow_run_id must be the run of the URI ({parts[0]!r})")
    elif parsed.scheme == "models":
        if len(parts) != 1 or not _LOGGED_MODEL.match(parts[0]):
            raise _refuse(source, "models:/ sources must be models:/m-<logged model id>")
        if logged_model_id != parts[0]:
            raise _refuse(source, f"logged_model_id must be the logged model of the URI ({parts[0]!r})")
    else:  # mlflow-artifacts: MLflow requires the run (or logged model) whose artifact root holds the URI
        owners = [i for i in (run_id, logged_model_id) if i]
        if not owners:
            raise _refuse(source, "mlflow-artifacts: sources need mlflow_run_id (or logged_model_id)")
        if not any(i in parts for i in owners):
            raise _refuse(source, "the URI is not under the artifact root of mlflow_run_id / logged_model_id")


def check_logged_model(mirror: MlflowMirror | None, source: str, timeout_s: float) -> None:
    """Raise ``Invalid`` (422) when ``source`` is ``models:/<id>`` and MLflow answers, within ``timeout_s``, that it
    has no LoggedModel ``<id>`` (MLflow's API accepts such a version, then fails every use of it with an internal
    error). When MLflow does not answer in time (or fails) the source is accepted: the reconciler's write
    re-validates it, and a refusal parks that one row."""
    if mirror is None or not source.startswith("models:/"):
        return
    model_id = source.removeprefix("models:/").strip("/")
    answer: list[object] = []

    def ask() -> None:
        try:
            answer.append(mirror.logged_model_exists(model_id, timeout_s))
        except Exception as exc:  # not an answer about the id: accept, the applier re-validates
            answer.append(exc)

    # A daemon thread, joined with the bound: a stuck MLflow call must neither hold the request nor block exit.
    worker = threading.Thread(target=ask, name="oprd-logged-model-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if answer and answer[0] is False:
        raise _refuse(source, f"MLflow has no LoggedModel {model_id!r} (log the model first)")
    if not answer or isinstance(answer[0], Exception):
        log.info(
            "LoggedModel %s not checked (%s); the applier re-validates it", model_id, answer or "timeout"
        )
