"""shared.db against real PostgreSQL: one-statement commits, the idle-window pre-ping and
statements on the driver's cursor."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from shared.db import Database, DriverStatement, autocommit
from shared.settings import Settings


@pytest.fixture
def scratch(committed_db: Database) -> Iterator[str]:
    """A table of its own, dropped after the test."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with committed_db.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id int PRIMARY KEY, doc jsonb)"))
    yield name
    with committed_db.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {name}"))


def _seen_elsewhere(db: Database, table: str) -> list[int]:
    """The ids another connection sees: only what was committed."""
    with db.engine.connect() as other:
        return list(other.execute(text(f"SELECT id FROM {table} ORDER BY id")).scalars())


def _insert(session: Session, table: str, row: int) -> None:
    session.execute(text(f"INSERT INTO {table} VALUES (:id)"), {"id": row})


def _backend(session: Session) -> Any:
    return session.connection().connection.dbapi_connection


def test_each_statement_commits_on_its_own_then_transactions_are_back(
    committed_db: Database, scratch: str
) -> None:
    with committed_db.session() as session:
        with autocommit(session):
            _insert(session, scratch, 1)
            # Committed before the block ends: no transaction holds it.
            assert _seen_elsewhere(committed_db, scratch) == [1]
            _insert(session, scratch, 2)
        assert not session.in_transaction()
        assert _backend(session).autocommit is False
        # The same pinned connection is transactional again: a rollback undoes an insert.
        _insert(session, scratch, 3)
        assert _seen_elsewhere(committed_db, scratch) == [1, 2]
        session.rollback()
    assert _seen_elsewhere(committed_db, scratch) == [1, 2]


def test_inside_an_open_transaction_the_block_joins_it(
    committed_db: Database, scratch: str
) -> None:
    with committed_db.session() as session:
        _insert(session, scratch, 1)
        with autocommit(session):
            _insert(session, scratch, 2)
            assert _seen_elsewhere(committed_db, scratch) == []  # one transaction, not yet
        assert _seen_elsewhere(committed_db, scratch) == [1, 2]  # committed at the block's end
        assert not session.in_transaction()


def test_pending_orm_changes_are_not_split_into_separate_commits(
    committed_db: Database, scratch: str
) -> None:
    from shared.models import Feature

    with committed_db.session() as session:
        feature = Feature(name=f"pending-{uuid.uuid4().hex[:6]}", complexity_points=1)
        session.add(feature)
        with autocommit(session):
            assert _backend(session).autocommit is False  # joined: flush and insert together
            _insert(session, scratch, 1)
        assert _seen_elsewhere(committed_db, scratch) == [1]
        session.delete(feature)
        session.commit()


def test_an_error_keeps_what_committed_and_restores_the_connection(
    committed_db: Database, scratch: str
) -> None:
    with committed_db.session() as session:

        def twice() -> None:
            with autocommit(session):
                _insert(session, scratch, 1)
                _insert(session, scratch, 1)

        with pytest.raises(IntegrityError, match="duplicate key"):
            twice()
        assert _seen_elsewhere(committed_db, scratch) == [1]
        assert _backend(session).autocommit is False
        _insert(session, scratch, 2)
        session.rollback()
    assert _seen_elsewhere(committed_db, scratch) == [1]


def test_an_engine_bound_session_gives_its_connection_back_transactional(
    committed_db: Database, scratch: str
) -> None:
    with committed_db.sessionmaker() as session:
        driver = _backend(session)
        with autocommit(session):
            _insert(session, scratch, 1)
        assert driver.autocommit is False  # restored before the pool took it back
    assert _seen_elsewhere(committed_db, scratch) == [1]


# --- pre-ping after an idle window ------------------------------------------------------


def _terminate(admin: Engine, pid: int) -> None:
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    deadline = time.monotonic() + 5
    with admin.connect() as conn:
        while conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar():
            assert time.monotonic() < deadline, "backend did not go away"
            time.sleep(0.02)
            conn.rollback()


def _backend_pid(db: Database) -> int:
    with db.session() as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.fixture
def admin(settings: Settings) -> Iterator[Engine]:
    engine = create_engine(
        (settings.database_url or "").replace("postgresql://", "postgresql+psycopg2://"),
        isolation_level="AUTOCOMMIT",
    )
    yield engine
    engine.dispose()


def _counting_pings(db: Database) -> list[int]:
    """Count the dialect's pings on ``db``'s engine (the real ping still runs)."""
    calls: list[int] = []
    dialect: Any = db.engine.dialect
    real = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        calls.append(1)
        return bool(real(dbapi_connection))

    dialect.do_ping = counted
    return calls


def test_a_connection_idle_past_the_window_is_tested_and_replaced_when_dead(
    settings: Settings, admin: Engine
) -> None:
    db = Database(settings.model_copy(update={"db_pool_ping_after_idle_s": 0.2}))
    try:
        assert not db.engine.pool._pre_ping  # type: ignore[attr-defined]
        pings = _counting_pings(db)
        first = _backend_pid(db)
        assert _backend_pid(db) == first  # reused at once: no ping
        assert pings == []
        _terminate(admin, first)
        time.sleep(0.3)
        # Idle past the window: pinged, found dead, replaced; the caller sees no error.
        assert _backend_pid(db) != first
        assert pings == [1]
    finally:
        db.engine.dispose()


def test_within_the_window_a_dead_connection_fails_once_then_the_pool_recovers(
    settings: Settings, admin: Engine
) -> None:
    db = Database(settings.model_copy(update={"db_pool_ping_after_idle_s": 60.0}))
    try:
        pings = _counting_pings(db)
        first = _backend_pid(db)
        _terminate(admin, first)
        with pytest.raises(OperationalError):
            _backend_pid(db)
        assert _backend_pid(db) != first  # the disconnect invalidated the pool
        assert pings == []
    finally:
        db.engine.dispose()


def test_a_zero_window_is_sqlalchemys_own_pre_ping(settings: Settings) -> None:
    db = Database(settings.model_copy(update={"db_pool_ping_after_idle_s": 0.0}))
    try:
        assert db.engine.pool._pre_ping  # type: ignore[attr-defined]
        pings = _counting_pings(db)
        _backend_pid(db)
        _backend_pid(db)
        assert len(pings) == 1  # every checkout but the new connection's first
    finally:
        db.engine.dispose()


# --- statements on the driver's cursor ---------------------------------------------------


def _scratch_statements(table: str) -> tuple[DriverStatement, DriverStatement]:
    """An insert returning its row, with a constant and a JSON parameter, and an update."""
    scratch = Table(
        table, MetaData(), Column("id", Integer, primary_key=True), Column("doc", JSONB)
    )
    insert_row = (
        insert(scratch)
        .values(id=bindparam("id"), doc=bindparam("doc", type_=JSONB))
        .returning(
            scratch.c.id, scratch.c.doc, func.clock_timestamp(), func.gen_random_uuid(type_=UUID)
        )
    )
    move = update(scratch).where(scratch.c.id == bindparam("old")).values(id=bindparam("new"))
    return DriverStatement(insert_row), DriverStatement(move.returning(scratch.c.id))


def test_a_driver_statement_answers_what_sqlalchemy_answers(
    committed_db: Database, scratch: str
) -> None:
    insert_row, _ = _scratch_statements(scratch)
    with committed_db.session() as session:
        on_driver = insert_row.first(session, {"id": 1, "doc": {"a": [1, "b"]}})
        through_sqlalchemy = session.execute(
            insert_row.statement, {"id": 2, "doc": {"a": [1, "b"]}}
        ).one()
        session.commit()
    assert on_driver[:2] == (1, {"a": [1, "b"]})  # the JSON parameter went in as JSON
    assert through_sqlalchemy[:2] == (2, {"a": [1, "b"]})
    assert on_driver[2].tzinfo is not None
    assert through_sqlalchemy[2].tzinfo is not None
    assert isinstance(on_driver[3], uuid.UUID)  # as JobRecord's id needs it
    assert [type(v) for v in on_driver] == [type(v) for v in through_sqlalchemy]


def test_a_driver_statement_raises_sqlalchemys_errors_and_wants_every_parameter(
    committed_db: Database, scratch: str
) -> None:
    insert_row, move = _scratch_statements(scratch)
    with committed_db.session() as session:
        with autocommit(session):
            insert_row.first(session, {"id": 1, "doc": None})
            insert_row.first(session, {"id": 2, "doc": None})
        with pytest.raises(IntegrityError, match="duplicate key"):
            move.first(session, {"old": 2, "new": 1})
        session.rollback()
        with pytest.raises(ArgumentError, match="no value for new"):
            move.first(session, {"old": 2})
        assert move.first(session, {"old": 2, "new": 3}) == (3,)
        assert move.first(session, {"old": 2, "new": 4}) is None
        session.commit()


def test_a_lost_connection_is_invalidated_as_sqlalchemy_would(
    committed_db: Database, scratch: str, admin: Engine
) -> None:
    insert_row, _ = _scratch_statements(scratch)
    with committed_db.session() as session:
        pid = int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
        session.commit()
        _terminate(admin, pid)
        with pytest.raises(OperationalError) as lost:
            insert_row.first(session, {"id": 1, "doc": None})
        assert lost.value.connection_invalidated
        session.rollback()
    with committed_db.session() as session:  # the pool hands out a live connection again
        assert insert_row.first(session, {"id": 1, "doc": None})[0] == 1
        session.commit()


def test_statement_listeners_see_a_driver_statement(committed_db: Database, scratch: str) -> None:
    """Tracing instruments SQLAlchemy through these events: with a listener the statement
    runs through SQLAlchemy, so the listener sees it."""
    insert_row, _ = _scratch_statements(scratch)
    seen: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    with committed_db.session() as session:
        insert_row.first(session, {"id": 1, "doc": {"x": 1}})
        event.listen(committed_db.engine, "before_cursor_execute", listener)
        try:
            row = insert_row.first(session, {"id": 2, "doc": {"x": 2}})
        finally:
            event.remove(committed_db.engine, "before_cursor_execute", listener)
        session.commit()
    assert row[:2] == (2, {"x": 2})
    assert [s.split()[0] for s in seen] == ["INSERT"]


def test_a_driver_statement_flushes_pending_rows_first_as_execute_does(
    committed_db: Database, scratch: str
) -> None:
    """A job's insert may follow rows it refers to that the session holds unflushed (an
    import's upload); the session's own execute flushes them first, and so does this."""
    from shared.models import Feature

    insert_row, _ = _scratch_statements(scratch)
    with committed_db.session() as session:
        feature = Feature(name=f"pending-{uuid.uuid4().hex[:6]}", complexity_points=1)
        session.add(feature)
        insert_row.first(session, {"id": 1, "doc": None})
        assert not session.new
        with session.no_autoflush:
            session.add(Feature(name=f"held-{uuid.uuid4().hex[:6]}", complexity_points=1))
            insert_row.first(session, {"id": 2, "doc": None})
            assert len(session.new) == 1  # no_autoflush holds it, as for execute
        session.rollback()
