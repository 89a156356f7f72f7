"""deployments: one holder per environment, current step, status check

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deployments", sa.Column("step", sa.String(length=32), nullable=True))
    # At most one deployment holds an environment: the database enforces it.
    op.create_index(
        "uq_deployments_environment_holding",
        "deployments",
        ["environment_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('running', 'rolling_back')"),
    )
    op.create_index(
        "ix_deployments_environment_finished_at",
        "deployments",
        ["environment_id", "finished_at"],
        unique=False,
    )
    op.create_check_constraint(
        "ck_deployments_status",
        "deployments",
        "status IN ('queued', 'waiting', 'running', 'rolling_back', "
        "'succeeded', 'failed', 'rolled_back', 'cancelled')",
    )


def downgrade() -> None:
    op.drop_constraint("ck_deployments_status", "deployments", type_="check")
    op.drop_index("ix_deployments_environment_finished_at", table_name="deployments")
    op.drop_index("uq_deployments_environment_holding", table_name="deployments")
    op.drop_column("deployments", "step")
