"""exact row counts of features and test cases by status, kept as delta rows by triggers

A list's total was ``SELECT count(*)``: a scan of every row on each cache miss, and every
write makes one (93-125 ms at 1,000,000 features on the development machine, against
0.06 ms for the page itself). Statement-level triggers now add, in the writing
transaction, one row per status a statement changed (+n inserted, -n deleted, the net of
an update that moved rows between statuses), so ``sum(n)`` is the exact count for
whatever snapshot reads it. Delta rows take no row locks (concurrent writers and parallel
import chunks never wait for each other), and ``shared.counts.compact`` folds them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTED = {"features": "feature_counts", "test_cases": "test_case_counts"}

# Each body writes to {counts}, the counted table's delta table. Transition tables need
# one trigger (and here one function) per event.
_FUNCTIONS = {
    "insert": """
        INSERT INTO {counts} (status, n) SELECT status, count(*) FROM new_rows GROUP BY status;
    """,
    "delete": """
        INSERT INTO {counts} (status, n) SELECT status, -count(*) FROM old_rows GROUP BY status;
    """,
    "update": """
        INSERT INTO {counts} (status, n)
        SELECT status, sum(d) FROM (
            SELECT status, -1 AS d FROM old_rows UNION ALL SELECT status, 1 FROM new_rows
        ) AS moved GROUP BY status HAVING sum(d) <> 0;
    """,
    "truncate": """
        DELETE FROM {counts};
    """,
}
_TRANSITION = {
    "insert": "REFERENCING NEW TABLE AS new_rows",
    "delete": "REFERENCING OLD TABLE AS old_rows",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "truncate": "",
}


def upgrade() -> None:
    for table, counts in COUNTED.items():
        op.create_table(
            counts,
            sa.Column("status", sa.String(length=32), nullable=False),
            sa.Column("n", sa.BigInteger(), nullable=False),
        )
        for event, body in _FUNCTIONS.items():
            function = f"{counts}_{event}"
            op.execute(
                f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN {body.format(counts=counts).strip()} RETURN NULL; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {function} AFTER {event.upper()} ON {table}"
                f" {_TRANSITION[event]} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )
        # After the triggers, in the same transaction: CREATE TRIGGER's lock holds writers
        # off until the commit, so no row is counted twice or missed.
        op.execute(
            f"INSERT INTO {counts} (status, n)"  # noqa: S608 - constant names
            f" SELECT status, count(*) FROM {table} GROUP BY status"
        )


def downgrade() -> None:
    for table, counts in COUNTED.items():
        for event in _FUNCTIONS:
            function = f"{counts}_{event}"
            op.execute(f"DROP TRIGGER {function} ON {table}")
            op.execute(f"DROP FUNCTION {function}()")
        op.drop_table(counts)
