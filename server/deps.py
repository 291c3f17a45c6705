"""Typed dependency aliases shared by the route modules."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from server.db import Database
from server.mlflow_guard import MlflowGuard
from server.names import NAME_PATTERN
from server.reconciler import Reconciler
from server.settings import ServerSettings

ModelName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128, description="Registered model name")]
AliasName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128, description="Alias, e.g. champion")]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="Model version number")]


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_reconciler(request: Request) -> Reconciler:
    return request.app.state.reconciler


def get_guard(request: Request) -> MlflowGuard:
    return request.app.state.mlflow_guard


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
ReconcilerDep = Annotated[Reconciler, Depends(get_reconciler)]
GuardDep = Annotated[MlflowGuard, Depends(get_guard)]
AliasQuery = Annotated[str, Query(pattern=NAME_PATTERN, max_length=128, description="Alias the gate moves")]
ReasonQuery = Annotated[
    str | None,
    Query(
        min_length=3, max_length=2000, pattern=r"^[^\x00]*$", description="Why (recorded on the alias move)"
    ),
]
