"""The only code that writes to MLflow: idempotent application of outbox rows to the model registry.

Every operation can be replayed safely: registered-model creation tolerates "already exists", a model
version that already exists with the expected number is left alone, and ``set_registered_model_alias`` is
an upsert. A version number MLflow assigns that differs from ours is a divergence and raises.

Against a tracking **server** (http/https, see :func:`server.mlflow_aliases.rest_modelled`) the writes are MLflow's
public REST calls made here with one bounded attempt each (``timeout_s``): ``MlflowClient`` retries 408/429/5xx
and connection errors itself for minutes (7 retries, exponential backoff, 120 s timeouts), which would hold the
reconciler's pass on one poisoned row. Retrying is the outbox's job (per-row backoff, ``server.reconciler``).
A refused call raises :class:`MlflowHttpError` with MLflow's ``error_code`` and the HTTP status.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from server.mlflow_aliases import read_aliases, rest_credentials, rest_modelled

if TYPE_CHECKING:  # `mlflow` is imported on first use: read-only commands (`oprd-ci status`) never need it
    from mlflow import MlflowClient


def mlflow_error_code(exc: BaseException) -> str | None:
    """``exc.error_code`` when ``exc`` is an ``MlflowException``, else ``None`` (without importing ``mlflow``: an
    exception cannot be an ``MlflowException`` unless the package was imported to raise it)."""
    if isinstance(exc, MlflowHttpError):
        return exc.error_code
    module = sys.modules.get("mlflow.exceptions")
    if module is not None and isinstance(exc, module.MlflowException):
        return exc.error_code
    return None


class MlflowHttpError(RuntimeError):
    """A tracking server answered a REST call with an error: ``status`` (HTTP) and MLflow's ``error_code``
    (``None`` when the body was not MLflow's error JSON, e.g. a proxy's page)."""

    def __init__(self, status: int, error_code: str | None, message: str) -> None:
        super().__init__(f"{error_code or 'HTTP'} ({status}): {message}"[:1000])
        self.status, self.error_code = status, error_code


class MirrorDivergence(RuntimeError):
    """MLflow holds state that contradicts the registry database and cannot be fixed by a replay."""


class SourceMissing(MirrorDivergence):
    """A ``models:/<id>`` source names a LoggedModel MLflow does not have (MLflow would accept the version and
    then fail every use of it with an internal error): refused before the write, the row is parked."""


class _Rest:
    """MLflow's REST API, one attempt per call, bounded by ``timeout_s`` (connect, read and write each)."""

    def __init__(self, uri: str) -> None:
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"

    def call(self, method: str, path: str, timeout_s: float, **kwargs: Any) -> dict[str, Any]:
        headers, auth = rest_credentials()
        r = httpx.request(method, self.base + path, headers=headers, auth=auth, timeout=timeout_s, **kwargs)
        if r.status_code == 200:
            return r.json() if r.content else {}
        try:
            body = r.json()
            code, message = body.get("error_code"), body.get("message", r.text)
        except ValueError:
            code, message = None, r.text
        raise MlflowHttpError(r.status_code, code, str(message)[:800])

    def get_or_none(self, path: str, timeout_s: float, **params: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", path, timeout_s, params=params)
        except MlflowHttpError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise


def _tag_list(tags: dict[str, str] | None) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in (tags or {}).items()]


class MlflowMirror:
    def __init__(self, tracking_uri: str, *, timeout_s: float = 10.0) -> None:
        """``timeout_s``: default bound of one REST call to a tracking server (:meth:`apply` takes its own)."""
        self.tracking_uri, self.timeout_s = tracking_uri, timeout_s
        self._client: MlflowClient | None = None
        self._client_lock = threading.Lock()
        self._rest = _Rest(tracking_uri) if rest_modelled(tracking_uri) else None
        self._opened = False

    @property
    def client(self) -> MlflowClient:
        # Created lazily: a sqlite tracking store runs its migrations on first use (seconds). Under a lock: the
        # reconciler and the request-path readers must not create (and migrate) it twice at once.
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    from mlflow import MlflowClient

                    self._client = MlflowClient(
                        tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
                    )
        return self._client

    def apply(self, kind: str, model: str, payload: dict[str, Any], timeout_s: float | None = None) -> None:
        """Apply one outbox row. Raises ``MlflowHttpError`` (answered), ``httpx.TransportError`` (no answer within
        ``timeout_s`` per REST call), or, with a non-REST store, what ``MlflowClient`` raises."""
        if self._rest is not None:
            self._apply_rest(kind, model, payload, timeout_s or self.timeout_s)
        elif kind == "create_version":
            self._create_version(model, payload)
        elif kind == "set_alias":
            self.client.set_registered_model_alias(model, payload["alias"], str(payload["version"]))
        elif kind == "set_version_tag":
            self.client.set_model_version_tag(
                model, str(payload["version"]), payload["key"], payload["value"]
            )
        else:
            raise ValueError(f"unknown outbox kind {kind!r}")

    def _apply_rest(self, kind: str, model: str, p: dict[str, Any], timeout_s: float) -> None:
        assert self._rest is not None
        rest = self._rest
        if kind == "set_alias":
            body = {"name": model, "alias": p["alias"], "version": str(p["version"])}
            rest.call("POST", "registered-models/alias", timeout_s, json=body)
        elif kind == "set_version_tag":
            body = {"name": model, "version": str(p["version"]), "key": p["key"], "value": p["value"]}
            rest.call("POST", "model-versions/set-tag", timeout_s, json=body)
        elif kind == "create_version":
            try:
                rest.call(
                    "POST",
                    "registered-models/create",
                    timeout_s,
                    json={"name": model, "tags": _tag_list({"oprd.managed_by": "oprd-ci registry"})},
                )
            except MlflowHttpError as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = int(p["version"])

            def get(v: int) -> dict[str, Any] | None:
                found = rest.get_or_none("model-versions/get", timeout_s, name=model, version=str(v))
                return None if found is None else found.get("model_version") or {}

            existing = get(version)
            if existing is None and version > 1 and get(version - 1) is None:
                raise MirrorDivergence(
                    f"MLflow {model} has no v{version - 1} (parked?); v{version} cannot be created"
                )
            if existing is not None:
                if existing.get("source") != p["source"]:
                    raise MirrorDivergence(
                        f"MLflow {model} v{version} has source {existing.get('source')!r}, registry has "
                        f"{p['source']!r}"
                    )
                return
            self._check_source(p["source"], timeout_s)
            body = {"name": model, "source": p["source"], "tags": _tag_list(p.get("tags"))}
            if p.get("run_id"):
                body["run_id"] = p["run_id"]
            if model_id := _model_id(p):
                body["model_id"] = model_id
            mv = rest.call("POST", "model-versions/create", timeout_s, json=body).get("model_version") or {}
            if int(mv.get("version", -1)) != version:
                raise MirrorDivergence(
                    f"MLflow assigned {model} v{mv.get('version')}, registry expected v{version}"
                )
        else:
            raise ValueError(f"unknown outbox kind {kind!r}")

    def _check_source(self, source: str, timeout_s: float) -> None:
        if source.startswith("models:/"):
            model_id = source.removeprefix("models:/").strip("/")
            if not self.logged_model_exists(model_id, timeout_s):
                raise SourceMissing(f"MLflow has no LoggedModel {model_id!r} (source {source!r})")

    def logged_model_exists(self, model_id: str, timeout_s: float) -> bool:
        """Whether MLflow holds the LoggedModel ``model_id`` (a ``models:/<id>`` source names it). Raises
        ``MlflowHttpError`` / ``httpx.TransportError`` / ``MlflowException`` when MLflow cannot answer."""
        if self._rest is not None:
            return self._rest.get_or_none(f"logged-models/{quote(model_id, safe='')}", timeout_s) is not None
        try:
            self.client.get_logged_model(model_id)
        except Exception as exc:
            if mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def open_local_store(self) -> None:
        """With a local store (no tracking server): import ``mlflow`` and open (migrate) the store now, once. It
        takes seconds on a small machine and is not an MLflow fault, so the reconciler does it before its pass
        deadline starts counting. A no-op against a tracking server."""
        if self._rest is None and not self._opened:
            self.client.search_registered_models(max_results=1)
            self._opened = True

    def aliases_bounded(self, model: str, timeout_s: float) -> dict[str, int]:
        """Like :meth:`aliases`, but against a tracking server one REST attempt bounded by ``timeout_s`` that raises
        ``MlflowHttpError`` on any error answer (the reconciler's drift check must not fall back to the client's
        minutes of retries)."""
        if self._rest is None:
            return self.aliases(model, timeout_s)
        found = self._rest.get_or_none("registered-models/get", timeout_s, name=model)
        rows = ((found or {}).get("registered_model") or {}).get("aliases") or []
        return {row["alias"]: int(row["version"]) for row in rows}

    def aliases(self, model: str, timeout_s: float | None = None) -> dict[str, int]:
        """alias -> version as MLflow reports it (values are str over HTTP, int on sqlite; normalised).

        Read without the ``mlflow`` package where :func:`server.mlflow_aliases.read_aliases` can (a tracking server,
        a SQL store); ``MlflowClient`` otherwise."""
        bound = timeout_s or self.timeout_s
        if (
            self._client is None
            and (fast := read_aliases(self.tracking_uri, model, timeout_s=bound)) is not None
        ):
            return fast
        try:
            rm = self.client.get_registered_model(model)
        except Exception as exc:
            if mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: int(v) for alias, v in rm.aliases.items()}

    def _version_or_none(self, model: str, version: int):  # type: ignore[no-untyped-def]
        try:
            return self.client.get_model_version(model, str(version))
        except Exception as exc:
            if mlflow_error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _create_version(self, model: str, p: dict[str, Any]) -> None:
        try:
            self.client.create_registered_model(model, tags={"oprd.managed_by": "oprd-ci registry"})
        except Exception as exc:
            if mlflow_error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        version = int(p["version"])
        existing = self._version_or_none(model, version)
        if existing is None and version > 1 and self._version_or_none(model, version - 1) is None:
            # MLflow numbers versions itself: creating this one now would give it the number of the missing
            # (parked) one. Refuse, so the reconciler parks this row too instead of diverging.
            raise MirrorDivergence(
                f"MLflow {model} has no v{version - 1} (parked?); v{version} cannot be created"
            )
        if existing is not None:
            if existing.source != p["source"]:
                raise MirrorDivergence(
                    f"MLflow {model} v{version} has source {existing.source!r}, registry has {p['source']!r}"
                )
            return
        # model_id links the version and its LoggedModel both ways in the UI (the version page shows the model,
        # the LoggedModel page lists the version); older outbox payloads carry it only as a tag.
        self._check_source(p["source"], self.timeout_s)
        mv = self.client.create_model_version(
            model, p["source"], run_id=p.get("run_id"), tags=p.get("tags") or None, model_id=_model_id(p)
        )
        if int(mv.version) != version:
            raise MirrorDivergence(f"MLflow assigned {model} v{mv.version}, registry expected v{version}")


def _model_id(p: dict[str, Any]) -> str | None:
    """The LoggedModel of a ``create_version`` payload (older payloads carry it only as a tag)."""
    return p.get("logged_model_id") or p.get("model_id") or (p.get("tags") or {}).get("oprd.logged_model_id")
