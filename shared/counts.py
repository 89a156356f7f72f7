"""Exact row counts of features and test cases by status, without scanning them.

Statement-level triggers (migration 0006) add delta rows to ``feature_counts`` and
``test_case_counts`` in the writing transaction: +n for rows a statement inserted into a
status, -n for rows it deleted, the net of an update that moved rows between statuses;
a TRUNCATE empties them. So ``sum(n)`` is the exact count for whatever snapshot reads it,
and a list's total costs a few hundred small rows instead of every row of the table
(``SELECT count(*)`` of 1,000,000 features: 93-125 ms on the development machine).

Delta rows take no locks that writers wait for. ``compact`` (run by beat) folds them to
one row per status in one statement, so a reader's snapshot sees the rows either before
or after the fold, with the same sum, and VACUUMs the table it shrank.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection, Engine, Table, func, select, text
from sqlalchemy.orm import Session

from shared.models import feature_counts, test_case_counts

COUNTS: Final = {"features": feature_counts, "test_cases": test_case_counts}


def total(session: Session, table: str, status: str | None = None) -> int:
    """How many rows ``table`` ("features" or "test_cases") holds, in ``status`` if given."""
    counts: Table = COUNTS[table]
    stmt = select(func.coalesce(func.sum(counts.c.n), 0))
    if status is not None:
        stmt = stmt.where(counts.c.status == status)
    return int(session.scalar(stmt) or 0)


def _fold(connection: Connection, counts: Table) -> int:
    """Fold ``counts`` to one row per status; returns how many rows it removed."""
    name = counts.name
    folded = connection.execute(
        text(
            f"WITH gone AS (DELETE FROM {name} RETURNING status, n),"  # noqa: S608 - constant names
            f" kept AS (INSERT INTO {name} (status, n)"
            " SELECT status, sum(n) FROM gone GROUP BY status HAVING sum(n) <> 0 RETURNING 1)"
            " SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM kept)"
        )
    ).scalar_one()
    return int(folded)


def compact(engine: Engine) -> dict[str, int]:
    """Fold every delta table and VACUUM those that shrank; rows removed per table.

    A concurrent fold is safe: its DELETE skips the rows this one deleted, so each fold
    sums only what it removed.
    """
    removed: dict[str, int] = {}
    with engine.begin() as connection:
        for table, counts in COUNTS.items():
            removed[table] = _fold(connection, counts)
    shrunk = [COUNTS[table].name for table, n in removed.items() if n > 0]
    if shrunk:
        # The deleted rows are dead tuples every sum would still read: reclaim them now
        # (autovacuum may be off, and may run late on a table this small and this busy).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for name in shrunk:
                connection.execute(text(f"VACUUM {name}"))
    return removed
