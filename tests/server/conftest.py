"""Fixtures for the registry tests: real SQLite/PostgreSQL databases, real MLflow sqlite stores, real
artifact directories with sha256 manifests, and evidence builders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.artifacts import listing_sha256
from server.settings import ServerSettings

PG_ADMIN_URL = os.environ.get("OPRD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ADMIN, CI, READ = "admin-secret-token", "ci-secret-token", "read-secret-token"
TOKENS = f"ci-bot:ci:{CI},viewer:read:{READ}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_artifact(tmp_path: Path) -> Callable[..., Path]:
    """Write a model-like directory with a manifest.json (contracts.md format); returns its path."""

    def make(name: str, payload: bytes | None = None, extra: dict[str, bytes] | None = None) -> Path:
        d = tmp_path / "artifacts" / name
        d.mkdir(parents=True)
        files = {
            "config.json": b'{"hidden_size": 8}',
            "model.safetensors": payload or name.encode() * 64,
            **(extra or {}),
        }
        hashes = {}
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
            hashes[rel] = hashlib.sha256(data).hexdigest()
        (d / "manifest.json").write_text(json.dumps({"files": hashes, "sha256": listing_sha256(hashes)}))
        return d

    return make


def problems(
    scores: list[float], k: int = 4, length: float = 20.0, prefix: str = "p"
) -> list[dict[str, Any]]:
    """Per-problem rows with n_correct = round(score * k)."""
    return [
        {"problem_id": f"{prefix}{i}", "k": k, "n_correct": round(s * k), "mean_length": length}
        for i, s in enumerate(scores)
    ]


def evidence(
    model: str,
    artifact: Path,
    acc: float,
    *,
    n: int = 60,
    teacher: float = 0.95,
    length: float = 20.0,
    usd: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """A gate file whose candidate solves a fraction ``acc`` of ``n`` problems (deterministic pattern)."""
    import random

    rng = random.Random(seed)
    cand = [1.0 if rng.random() < acc else 0.0 for _ in range(n)]
    return {
        "model": model,
        "artifact_path": str(artifact),
        "suites": {
            "embedded": {"candidate": problems(cand, length=length), "teacher": problems([teacher] * n)}
        },
        "cost": {"device_hours": 0.5, "usd": usd},
        "lineage": {"teacher": "teacher@abc123", "mlflow_run_ids": {}},
    }


POLICY = {
    "suites": {
        "embedded": {"floor": 0.2, "non_inferiority_margin": 0.05, "max_teacher_gap": 0.8, "min_problems": 50}
    },
    "length_tokens": {"max": 64, "max_ratio_to_champion": 1.5},
    "cost_usd": {"max_ratio_to_champion": 1.5},
    "bootstrap": {"seed": 0, "n_resamples": 500},
    "auto_rollback": True,
}


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., ServerSettings]:
    def make(database_url: str | None = None, **overrides: Any) -> ServerSettings:
        values: dict[str, Any] = {
            "database_url": database_url or f"sqlite:///{tmp_path}/registry.db",
            "mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "artifact_roots": [tmp_path / "artifacts"],
            "admin_token": ADMIN,
            "tokens": TOKENS,
            "reconcile_interval_s": 0.2,
        }
        values.update(overrides)
        (tmp_path / "artifacts").mkdir(exist_ok=True)
        return ServerSettings(**values)

    return make


@pytest.fixture
def client(settings_factory: Callable[..., ServerSettings]) -> Iterator[TestClient]:
    """A TestClient on SQLite with the reconciler running against a sqlite MLflow store."""
    with TestClient(create_app(settings_factory()), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def client_no_mlflow(settings_factory: Callable[..., ServerSettings]) -> Iterator[TestClient]:
    """Same, with MLflow mirroring off (fast; for tests that are about the database only)."""
    with TestClient(create_app(settings_factory(mlflow_enabled=False)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"oprd_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_fresh_url(pg_url: str) -> Iterator[str]:
    """An empty schema per test inside the session database (search_path isolation)."""
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{pg_url}?options=-csearch_path%3D{schema}"
    finally:
        with eng.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        eng.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``uvicorn --factory server.app:app_from_env`` in a subprocess on loopback, configured by OPRD_* env.
    With ``workers`` > 1 (PostgreSQL) the caller migrates the database first, as ``oprd-ci serve`` does."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 1) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "server.app:app_from_env",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--limit-concurrency",
                "256",
                "--workers",
                str(workers),
            ],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("registry server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
        self.log.close()


def server_env(tmp_path: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    (tmp_path / "artifacts").mkdir(exist_ok=True)
    return {
        "OPRD_DATABASE_URL": database_url or f"sqlite:///{tmp_path}/registry.db",
        "OPRD_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "OPRD_ARTIFACT_ROOTS": str(tmp_path / "artifacts"),
        "OPRD_ADMIN_TOKEN": ADMIN,
        "OPRD_TOKENS": TOKENS,
        "OPRD_RECONCILE_INTERVAL_S": "0.2",
        **extra,
    }


@pytest.fixture
def stack():
    """An ExitStack closed at teardown (for process-wide state a test must restore)."""
    import contextlib

    with contextlib.ExitStack() as s:
        yield s


@contextlib.contextmanager
def running_mlflow_server(directory: Path) -> Iterator[str]:
    """A lean ``mlflow server`` (sqlite store and local artifacts under ``directory``) on loopback; yields its URL
    once ``/health`` answers and stops it on exit."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (directory / "mlflow.log").open("wb")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{directory}/ml.db",
           "--artifacts-destination", str(directory / "mlart"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("mlflow server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A lean ``mlflow server`` per test; yields its URL."""
    with running_mlflow_server(tmp_path) as url:
        yield url


@pytest.fixture
def cli():
    """The registry commands (``oprd_ci.registry_cli.register``) on a bare typer app, for ``CliRunner``."""
    import typer

    from oprd_ci.registry_cli import register

    app = typer.Typer()
    register(app)
    return app
