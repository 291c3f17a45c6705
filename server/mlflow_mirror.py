"""The only code that writes to MLflow: idempotent application of outbox rows to the model registry.

Every operation can be replayed safely: registered-model creation tolerates "already exists", a model
version that already exists with the expected number is left alone, and ``set_registered_model_alias`` is
an upsert. A version number MLflow assigns that differs from ours is a divergence and raises.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

from server.mlflow_aliases import read_aliases

if TYPE_CHECKING:  # `mlflow` is imported on first use: read-only commands (`oprd-ci status`) never need it
    from mlflow import MlflowClient


def mlflow_error_code(exc: BaseException) -> str | None:
    """``exc.error_code`` when ``exc`` is an ``MlflowException``, else ``None`` (without importing ``mlflow``: an
    exception cannot be an ``MlflowException`` unless the package was imported to raise it)."""
    module = sys.modules.get("mlflow.exceptions")
    if module is not None and isinstance(exc, module.MlflowException):
        return exc.error_code
    return None


class MirrorDivergence(RuntimeError):
    """MLflow holds state that contradicts the registry database and cannot be fixed by a replay."""


class MlflowMirror:
    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None
        self._client_lock = threading.Lock()

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

    def apply(self, kind: str, model: str, payload: dict[str, Any]) -> None:
        """Apply one outbox row. Raises ``MlflowException``/``OSError`` when MLflow is unreachable."""
        if kind == "create_version":
            self._create_version(model, payload)
        elif kind == "set_alias":
            self.client.set_registered_model_alias(model, payload["alias"], str(payload["version"]))
        elif kind == "set_version_tag":
            self.client.set_model_version_tag(
                model, str(payload["version"]), payload["key"], payload["value"]
            )
        else:
            raise ValueError(f"unknown outbox kind {kind!r}")

    def aliases(self, model: str) -> dict[str, int]:
        """alias -> version as MLflow reports it (values are str over HTTP, int on sqlite; normalised).

        Read without the ``mlflow`` package where :func:`server.mlflow_aliases.read_aliases` can (a tracking server,
        a SQL store); ``MlflowClient`` otherwise."""
        if self._client is None and (fast := read_aliases(self.tracking_uri, model)) is not None:
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
        model_id = (
            p.get("logged_model_id") or p.get("model_id") or (p.get("tags") or {}).get("oprd.logged_model_id")
        )
        mv = self.client.create_model_version(
            model, p["source"], run_id=p.get("run_id"), tags=p.get("tags") or None, model_id=model_id
        )
        if int(mv.version) != version:
            raise MirrorDivergence(f"MLflow assigned {model} v{mv.version}, registry expected v{version}")
