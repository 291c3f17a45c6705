"""issue 9: MLflow id columns hold what the API accepts (256), outbox rows MLflow refuses can be parked

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.alter_column("run_id", existing_type=sa.String(length=64), type_=sa.String(length=256))
        batch_op.alter_column(
            "logged_model_id", existing_type=sa.String(length=64), type_=sa.String(length=256)
        )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parked_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("parked_at")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.alter_column(
            "logged_model_id", existing_type=sa.String(length=256), type_=sa.String(length=64)
        )
        batch_op.alter_column("run_id", existing_type=sa.String(length=256), type_=sa.String(length=64))
