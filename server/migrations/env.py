"""Alembic environment: runs migrations on the connection handed over by ``server.migrate`` or on ``-x url=``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from server.orm import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database with: alembic -x url=<sqlalchemy url> ...")
    with create_engine(url).connect() as conn:
        _run(conn)
