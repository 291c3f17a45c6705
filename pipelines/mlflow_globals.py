"""MLflow's process-wide tracking / registry URIs, set for a block and restored exactly.

Some MLflow calls resolve ``models:/<id>`` or LoggedModels through the *process-wide* URIs, not the client's, so a
stage must point them at its store while it works. ``mlflow.set_tracking_uri`` also exports
``MLFLOW_TRACKING_URI`` (and ``set_registry_uri`` ``MLFLOW_REGISTRY_URI``) and neither can express "unset" on the
way back, so :func:`process_uris` saves and restores the module globals and both environment variables; a later
caller in the same process (a test, another stage) never silently talks to this store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import mlflow.tracking._model_registry.utils as _registry_state
import mlflow.tracking._tracking_service.utils as _tracking_state

__all__ = ["process_uris"]

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def process_uris(tracking_uri: str, registry_uri: str | None = None) -> Iterator[None]:
    saved = (
        _tracking_state._tracking_uri,
        _registry_state._registry_uri,
        {k: os.environ.get(k) for k in _ENV},
    )
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri or tracking_uri)
    try:
        yield
    finally:
        _tracking_state._tracking_uri, _registry_state._registry_uri, env = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
