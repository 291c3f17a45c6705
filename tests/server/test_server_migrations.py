"""Alembic: a database created by the first schema (0001) upgrades to head keeping its rows, on SQLite and on
PostgreSQL, and then holds what the API accepts (256-character MLflow ids, parked outbox rows)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command

from server.migrate import alembic_config, upgrade


def _upgrade_from_0001(url: str) -> None:
    engine = sa.create_engine(url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO registered_models (id, name, created_at, next_version, audit_seq) "
                "VALUES (1, 'm', CURRENT_TIMESTAMP, 2, 0)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_versions (model_id, version, artifact_path, manifest_sha256, files, "
                "mlflow_source, run_id, status, created_by, created_at) VALUES (1, 1, '/a', :sha, '{}', '/a', "
                ":rid, 'READY', 'x', CURRENT_TIMESTAMP)"
            ),
            {"sha": "0" * 64, "rid": "r" * 64},
        )
        conn.execute(
            sa.text(
                "INSERT INTO outbox (kind, model_name, payload, created_at, attempts) "
                "VALUES ('set_alias', 'm', '{}', CURRENT_TIMESTAMP, 0)"
            )
        )
    upgrade(engine)
    upgrade(engine)  # idempotent
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT run_id FROM model_versions")).scalar_one() == "r" * 64
        assert conn.execute(sa.text("SELECT parked_at FROM outbox")).scalar_one() is None
        conn.execute(
            sa.text("UPDATE model_versions SET run_id = :rid, logged_model_id = :rid"), {"rid": "x" * 256}
        )
        conn.execute(sa.text("UPDATE outbox SET parked_at = CURRENT_TIMESTAMP"))
        assert conn.execute(sa.text("SELECT run_id FROM model_versions")).scalar_one() == "x" * 256
        heads = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    assert heads == ["0005_triggers"]
    assert "triggers" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_upgrade_from_0001_sqlite(tmp_path):
    _upgrade_from_0001(f"sqlite:///{tmp_path}/old.db")


@pytest.mark.postgres
def test_upgrade_from_0001_postgres(pg_fresh_url):
    _upgrade_from_0001(pg_fresh_url)


def test_script_heads_match_alembic():
    """The cheap head check (no alembic import) reads the scripts as alembic does."""
    from alembic.script import ScriptDirectory

    from server.migrate import script_heads

    assert script_heads() == frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def test_upgrade_skips_alembic_only_when_current(tmp_path):
    """A database one revision behind is upgraded (the fast path must not mistake it for current); a current one
    is recognised without alembic."""
    from server.migrate import is_current

    engine = sa.create_engine(f"sqlite:///{tmp_path}/r.db")
    assert not is_current(engine)  # empty database
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    assert not is_current(engine)
    upgrade(engine)
    assert is_current(engine)
    with engine.connect() as conn:
        assert sa.inspect(conn).has_table("outbox")
        assert "parked_at" in {c["name"] for c in sa.inspect(conn).get_columns("outbox")}  # 0002 ran
    engine.dispose()
