"""uploads remember how their large object holds the file (gzip from now on)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Files stored before this revision are plain: the default says so.
    op.add_column(
        "uploads",
        sa.Column("compression", sa.String(length=16), server_default="identity", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("uploads", "compression")
