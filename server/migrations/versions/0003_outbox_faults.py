"""issue 19: per-row retry state of the outbox (when a failed MLflow write is tried next)

Revision ID: 0003_outbox_faults
Revises: 0002
Create Date: 2026-12-03 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_outbox_faults"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("failing_since", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("failing_since")
        batch_op.drop_column("next_attempt_at")
