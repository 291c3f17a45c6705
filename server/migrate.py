"""Bring a registry database to the newest schema with the Alembic scripts in ``server/migrations``."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

if TYPE_CHECKING:  # alembic is imported only when a database is behind (read-only CLI commands skip ~0.3 s)
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*['\"]?([\w]+)['\"]?", re.M)


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@cache
def script_heads() -> frozenset[str]:
    """The head revision(s) of ``server/migrations/versions``, read from the scripts' ``revision`` /
    ``down_revision`` lines (what ``alembic heads`` reports; tests/server/test_server_migrations.py checks)."""
    revisions, parents = set(), set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        for key, value in _REVISION.findall(script.read_text()):
            (revisions if key == "revision" else parents).add(value)
    return frozenset(revisions - parents)


def is_current(engine: Engine) -> bool:
    """True when the database's ``alembic_version`` rows are exactly the scripts' heads."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        stamped = {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
    return stamped == script_heads()


def upgrade(engine: Engine) -> None:
    """Run ``alembic upgrade head`` on ``engine`` (idempotent; a current database costs one query, no alembic)."""
    if is_current(engine):
        return
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
