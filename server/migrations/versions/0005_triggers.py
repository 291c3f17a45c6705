"""issue 21: triggers (events that queue a distill-and-gate cycle, linked to the decision it ended in)

Revision ID: 0005_triggers
Revises: 0004_events
Create Date: 2026-12-03 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_triggers"
down_revision = "0004_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "triggers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("dedup_key", sa.String(length=512), nullable=False),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("exp_name", sa.String(length=128), nullable=True),
        sa.Column("coalesced_into", sa.Integer(), nullable=True),
        sa.Column("decision_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("queued_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["registered_models.id"]),
        sa.ForeignKeyConstraint(["coalesced_into"], ["triggers.id"]),
        sa.ForeignKeyConstraint(["decision_id"], ["decisions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "dedup_key"),
    )
    op.create_index("ix_triggers_model_status", "triggers", ["model_id", "status"])
    op.create_index("ix_triggers_decision_id", "triggers", ["decision_id"])


def downgrade() -> None:
    op.drop_index("ix_triggers_decision_id", table_name="triggers")
    op.drop_index("ix_triggers_model_status", table_name="triggers")
    op.drop_table("triggers")
