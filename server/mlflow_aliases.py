"""Read a registered model's aliases from MLflow without importing the ``mlflow`` package.

``oprd-ci status`` compares the registry's aliases with MLflow's on every call. Importing ``mlflow`` and opening
its store costs 1.5-3 s of CPU on a small machine (the package imports pandas, the GenAI modules, and a SQL store
checks its migrations), which alone breaks the 2 s budget of a daily command. Both ways MLflow keeps aliases can be
read directly, with what the registry already imports:

* a tracking **server** (``http://``, ``https://``): the public REST call
  ``GET /api/2.0/mlflow/registered-models/get?name=NAME`` (``registered_model.aliases``), with the standard
  ``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` credentials;
* a **SQL** store (``sqlite://``, ``postgresql://``, ``mysql://``, ``mssql://``): MLflow's
  ``registered_model_aliases`` table (``name``, ``alias``, ``version``; ``workspace`` since MLflow 3.x, where the
  default workspace is read).

:func:`read_aliases` returns ``None`` whenever it cannot answer exactly as ``MlflowClient.get_registered_model``
would (another scheme, TLS or workspace settings it does not model, a store MLflow has not created or migrated yet,
a table layout it does not know); the caller then uses ``MlflowClient``. ``tests/server/test_mlflow_aliases.py``
checks that both answers agree on a real store and a real tracking server.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import httpx

__all__ = ["read_aliases"]

_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Client settings this reader does not reproduce: with any of them set, MlflowClient answers instead.
_UNMODELLED_ENV = (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_ENABLE_WORKSPACES",
    "MLFLOW_WORKSPACE",
)
_DEFAULT_WORKSPACE = "default"


def read_aliases(tracking_uri: str, model: str, *, timeout_s: float = 10.0) -> dict[str, int] | None:
    """``{alias: version}`` of ``model`` as MLflow holds it (``{}`` when the model does not exist), or ``None``
    when this reader cannot answer for ``tracking_uri`` (use ``MlflowClient``).

    Raises ``httpx.HTTPError`` / ``sqlalchemy.exc.SQLAlchemyError`` when the store is unreachable, like the
    client would raise (the caller's guard counts it as an outage).
    """
    if any(os.environ.get(k) for k in _UNMODELLED_ENV):
        return None
    scheme = urlsplit(tracking_uri).scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        return _read_rest(tracking_uri, model, timeout_s)
    if scheme in _SQL_SCHEMES:
        return _read_sql(tracking_uri, model)
    return None


def rest_modelled(tracking_uri: str) -> bool:
    """True when ``tracking_uri`` is an MLflow tracking server this module's REST calls talk to exactly as
    ``MlflowClient`` would (http(s), none of the client settings in ``_UNMODELLED_ENV``)."""
    if any(os.environ.get(k) for k in _UNMODELLED_ENV):
        return False
    return urlsplit(tracking_uri).scheme in ("http", "https")


def rest_credentials() -> tuple[dict[str, str], tuple[str, str] | None]:
    """(headers, basic auth) from the standard ``MLFLOW_TRACKING_*`` credentials, as the client sends them."""
    headers: dict[str, str] = {}
    auth = None
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif (user := os.environ.get("MLFLOW_TRACKING_USERNAME")) is not None:
        auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    return headers, auth


def _read_rest(uri: str, model: str, timeout_s: float) -> dict[str, int] | None:
    headers, auth = rest_credentials()
    r = httpx.get(
        uri.rstrip("/") + "/api/2.0/mlflow/registered-models/get",
        params={"name": model},
        headers=headers,
        auth=auth,
        timeout=timeout_s,
    )
    if r.status_code == 404 and _error_code(r) == "RESOURCE_DOES_NOT_EXIST":
        return {}
    if r.status_code != 200:
        return None  # the client's own error (auth, a proxy's page, an old server) says it better
    rows = (r.json().get("registered_model") or {}).get("aliases") or []
    return {row["alias"]: int(row["version"]) for row in rows}


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json().get("error_code")
    except ValueError:
        return None


def _read_sql(uri: str, model: str) -> dict[str, int] | None:
    import sqlalchemy as sa

    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///").split("?", 1)[0]):
        return None  # no store yet: MlflowClient creates (and migrates) it, as it would have
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            if not insp.has_table("registered_model_aliases") or not insp.has_table("registered_models"):
                return None  # not migrated to a version with aliases: let MLflow migrate it
            alias_cols = {c["name"] for c in insp.get_columns("registered_model_aliases")}
            model_cols = {c["name"] for c in insp.get_columns("registered_models")}
            if not {"name", "alias", "version"} <= alias_cols:
                return None
            args = {"name": model, "ws": _DEFAULT_WORKSPACE}

            def where(cols: set[str]) -> str:
                return "name = :name" + (" AND workspace = :ws" if "workspace" in cols else "")

            exists = conn.execute(
                sa.text(f"SELECT 1 FROM registered_models WHERE {where(model_cols)}"), args
            ).first()
            if exists is None:
                return {}
            rows = conn.execute(
                sa.text(f"SELECT alias, version FROM registered_model_aliases WHERE {where(alias_cols)}"),
                args,
            )
            return {alias: int(version) for alias, version in rows}
    finally:
        engine.dispose()
