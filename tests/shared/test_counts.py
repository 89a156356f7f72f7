"""Row counts kept by triggers (migration 0006): every kind of write, the fold, TRUNCATE."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from shared import counts
from shared.db import Database
from shared.models import Feature, TestCase, feature_counts, test_case_counts

FEATURE_STATUSES = ("planned", "in_progress", "testing", "done")
TEST_CASE_STATUSES = ("pending", "passed", "failed")


def _assert_exact(session: Session) -> None:
    """Every total the lists can ask for equals a real count."""
    for model, table, statuses in (
        (Feature, "features", FEATURE_STATUSES),
        (TestCase, "test_cases", TEST_CASE_STATUSES),
    ):
        real = session.scalar(select(func.count()).select_from(model)) or 0
        assert counts.total(session, table) == real, table
        for status in statuses:
            real = (
                session.scalar(
                    select(func.count()).select_from(model).where(model.status == status)
                )
                or 0
            )
            assert counts.total(session, table, status) == real, (table, status)


@pytest.fixture
def engine(committed_db: Database) -> Engine:
    """Commits for real (committed_db truncates after); starts from empty counts."""
    with committed_db.engine.begin() as conn:
        conn.execute(text("TRUNCATE features CASCADE"))
    return committed_db.engine


def test_totals_follow_every_kind_of_write(session: Session) -> None:
    _assert_exact(session)
    one = Feature(name="one", complexity_points=1)  # the default status
    session.add_all([one, Feature(name="two", complexity_points=2, status="done")])
    session.flush()
    _assert_exact(session)
    # A multi-row statement across statuses.
    session.execute(
        text(
            "INSERT INTO features (name, status, complexity_points)"
            " SELECT 'bulk ' || i, (ARRAY['planned','in_progress','testing','done'])[1 + i % 4], 1"
            " FROM generate_series(1, 37) AS i"
        )
    )
    _assert_exact(session)
    # Updates that move rows between statuses, and one that moves none.
    session.execute(update(Feature).where(Feature.status == "planned").values(status="testing"))
    session.execute(update(Feature).where(Feature.status == "done").values(complexity_points=9))
    one.status = "done"
    session.flush()
    _assert_exact(session)
    # Test cases, then a feature's delete cascading to its test cases.
    session.execute(
        insert(TestCase),
        [
            {"feature_id": one.id, "name": f"case {i}", "status": s}
            for i, s in enumerate(TEST_CASE_STATUSES * 3)
        ],
    )
    session.execute(update(TestCase).where(TestCase.status == "failed").values(status="passed"))
    _assert_exact(session)
    session.execute(delete(Feature).where(Feature.id == one.id))
    assert session.scalar(select(func.count()).select_from(TestCase)) == 0
    _assert_exact(session)
    session.execute(delete(Feature).where(Feature.status == "testing"))
    _assert_exact(session)


def test_an_upsert_counts_what_it_inserted_and_what_it_moved(session: Session) -> None:
    """The import's upsert path: INSERT … ON CONFLICT DO UPDATE fires both triggers."""
    session.add(Feature(name="kept", complexity_points=1, external_id="F-1", status="done"))
    session.flush()
    session.execute(
        text(
            "INSERT INTO features (external_id, name, status, complexity_points)"
            " VALUES ('F-1', 'kept', 'planned', 1), ('F-2', 'new', 'testing', 1)"
            " ON CONFLICT (external_id) DO UPDATE SET status = EXCLUDED.status"
        )
    )
    assert counts.total(session, "features", "done") == 0
    assert counts.total(session, "features", "planned") == 1
    _assert_exact(session)


def test_truncate_empties_the_counts_of_every_table_it_reaches(engine: Engine) -> None:
    with Session(engine) as session:
        feature = Feature(name="gone", complexity_points=1)
        session.add(feature)
        session.flush()
        session.add(TestCase(feature_id=feature.id, name="gone too"))
        session.commit()
        assert counts.total(session, "test_cases") == 1
        session.execute(text("TRUNCATE features CASCADE"))
        session.commit()
        assert counts.total(session, "features") == counts.total(session, "test_cases") == 0
        assert session.scalar(select(func.count()).select_from(feature_counts)) == 0
        assert session.scalar(select(func.count()).select_from(test_case_counts)) == 0


def test_compact_folds_to_one_row_per_status_and_keeps_every_total(engine: Engine) -> None:
    with Session(engine) as session:
        for i in range(12):
            session.add(Feature(name=f"f{i}", complexity_points=1, status=FEATURE_STATUSES[i % 3]))
            session.commit()  # one statement, one delta row each
        session.execute(delete(Feature).where(Feature.status == "testing"))  # nets to zero
        session.commit()
        assert session.scalar(select(func.count()).select_from(feature_counts)) == 13
        removed = counts.compact(engine)
        # planned and in_progress keep one row each; testing's +4 and -4 leave none.
        assert removed == {"features": 11, "test_cases": 0}
        rows = session.execute(select(feature_counts.c.status, feature_counts.c.n)).all()
        assert sorted(rows) == [("in_progress", 4), ("planned", 4)]
        _assert_exact(session)
        assert counts.compact(engine) == {"features": 0, "test_cases": 0}


def test_a_write_still_open_during_a_fold_is_counted_once_it_commits(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Feature(name="before", complexity_points=1))
        session.commit()
    with Session(engine) as writer:
        writer.add(Feature(name="in flight", complexity_points=1))
        writer.flush()  # its delta row exists, uncommitted
        counts.compact(engine)
        with Session(engine) as reader:
            assert counts.total(reader, "features") == 1
        writer.commit()
    with Session(engine) as session:
        assert counts.total(session, "features") == 2
        _assert_exact(session)
