"""The database: one engine per process, sessions, and the pool settings.

The engine is created lazily from settings. Prefork children must not share the
parent's pooled sockets: ``worker.celery_app`` calls ``dispose_engine_in_child()``
from ``worker_process_init`` (SQLAlchemy docs, "Using Connection Pools with
Multiprocessing or os.fork()").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extras import Json
from sqlalchemy import JSON, Connection, Engine, create_engine, event, exc, text
from sqlalchemy.dialects.postgresql import psycopg2 as psycopg2_dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import UpdateBase

from shared import metrics
from shared.settings import Settings


def normalize_url(url: str) -> str:
    """Accept plain ``postgres://``/``postgresql://`` URLs; use the psycopg2 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(settings: Settings, **overrides: object) -> Engine:
    """An engine with the pool tuned from settings (pre-ping, recycle, bounded waits)."""
    if not settings.database_url:
        raise RuntimeError("database_url is not set (the launcher fills it in for embedded use)")
    options: dict[str, object] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout_s,
        "pool_recycle": settings.db_pool_recycle_s,
        # With an idle window, ping_when_idle tests connections instead.
        "pool_pre_ping": settings.db_pool_pre_ping and settings.db_pool_ping_after_idle_s <= 0,
        "connect_args": {
            # Bounded connect and statement time: a dead database answers 503, never hangs.
            "connect_timeout": 5,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            "application_name": "conveyor",
        },
    }
    options.update(overrides)
    engine = create_engine(normalize_url(settings.database_url), **options)
    if settings.db_pool_pre_ping and not options["pool_pre_ping"]:
        ping_when_idle(engine, settings.db_pool_ping_after_idle_s)
    return engine


def ping_when_idle(engine: Engine, idle_s: float) -> None:
    """``pool_pre_ping`` for connections idle longer than ``idle_s`` only.

    SQLAlchemy's pre-ping tests every checkout: a round trip per web request and per job
    for connections that were in use milliseconds ago. HikariCP skips its alive test for a
    connection used within the last 500 ms (``aliveBypassWindowMs``); this does the same
    with SQLAlchemy's pieces: the test is the dialect's ``do_ping``, and a disconnect
    raises ``InvalidatePoolError`` from the ``checkout`` event, which makes the pool
    reconnect and drop every connection older than the failure, as a failed pre-ping does.
    A connection broken within the window fails the statement that uses it, and that
    disconnect invalidates the pool the same way.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop(_CHECKED_IN_AT, None)
        if since is None or time.monotonic() - since <= idle_s:
            return  # new (just connected) or in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as err:
            if dialect.is_disconnect(err, dbapi_connection, None):
                raise exc.InvalidatePoolError() from err
            raise


_CHECKED_IN_AT = "conveyor_checked_in_at"


class Database:
    """An engine and its session factory, owned by one process."""

    def __init__(self, settings: Settings, **engine_overrides: object) -> None:
        self.settings = settings
        self.engine = make_engine(settings, **engine_overrides)
        if settings.metrics_enabled:
            metrics.instrument_pool(self.engine)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that rolls back on error and always closes; callers commit.

        It keeps one pooled connection until it closes (``pinned_session``).
        """
        with self.engine.connect() as connection:
            session = self.pinned_session(connection)
            try:
                yield session
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    def pinned_session(self, connection: Connection) -> Session:
        """A session on ``connection``, which its commits and close leave checked out.

        An engine-bound session gives its connection back to the pool at every commit and
        checks one out again, with ``pool_pre_ping``'s round trip, at its next statement:
        a canary job (lease, then work and finish) or a job submission (insert, then
        publish and mark published) paid two checkouts and two pings for one unit of
        work. The caller closes ``connection`` after the session.
        """
        return self.sessionmaker(bind=connection)

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose_in_child(self) -> None:
        """Forget the parent's pooled connections without closing them (fork safety)."""
        self.engine.dispose(close=False)


@contextmanager
def autocommit(session: Session) -> Iterator[None]:
    """The block's statements are committed when it exits: each on its own when the
    session has no transaction open, else with the open transaction at the block's end.

    For a transaction of one statement (a job's lease, its finish, a submission without
    attachments): psycopg2 sends BEGIN and COMMIT as round trips of their own, so such a
    transaction costs three round trips where the statement alone costs one: six more
    than needed for a canary job (submit, lease, finish). On this project's 2-core
    machine a round trip to PostgreSQL is about 0.2 ms of wall time. Only for blocks
    whose statements need no transaction together: an error in the second leaves the
    first committed.

    The switch is psycopg2's ``autocommit`` flag, set and cleared on the driver's
    connection without a round trip. SQLAlchemy's ``isolation_level="AUTOCOMMIT"``
    execution option does the same but restores the default through psycopg2's
    ``set_isolation_level(READ COMMITTED)``, which costs a round trip of its own.
    The flag is cleared before the session lets go of the connection (an engine-bound
    session gives it back to the pool at commit).
    """
    pending = session.new or session.dirty or session.deleted
    # On a pinned connection this sends nothing: psycopg2 sends BEGIN with the first statement.
    driver: Any = session.connection().connection.dbapi_connection
    if pending or driver.get_transaction_status() != TRANSACTION_STATUS_IDLE:
        # A transaction is open (the caller's statements, a test's outer transaction) or
        # the session holds changes to flush: they commit together, as before.
        yield
        session.commit()
        return
    driver.autocommit = True
    try:
        yield
    except BaseException:
        _restore(driver)
        session.rollback()
        raise
    _restore(driver)
    session.commit()  # nothing left to commit: this ends the session's transaction


def _restore(driver: Any) -> None:
    if not driver.closed:
        driver.autocommit = False


class DriverStatement:
    """A Core DML statement run on the session's psycopg2 cursor, for the hottest ones.

    The statement is rendered once, here: its SQL and its own constant parameters. Each
    run sends that SQL with the caller's parameters through the cursor and returns the
    first row, skipping SQLAlchemy's execution (compiled-cache lookup, parameter and
    result processing, the execution context): for a canary's lease and finish in the
    worker that was 2.76 → 2.43 million instructions per job (callgrind, in process).
    The caller's values must be what psycopg2 adapts itself (UUIDs: SQLAlchemy's
    psycopg2 dialect registers them); JSON-typed parameters are wrapped here.

    What the session's ``execute`` would do around the statement still happens: pending
    ORM changes are flushed first (autoflush), the driver's error is raised as
    SQLAlchemy's (``DBAPIError.instance``), and a lost connection is invalidated. When
    something listens to statements on the connection (tracing instruments SQLAlchemy
    through these events), the statement runs through the session instead, so it is seen.
    """

    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=psycopg2_dialect.dialect())  # type: ignore[no-untyped-call]
        self.sql = str(compiled)
        binds = compiled.binds
        self.required = frozenset(name for name, bind in binds.items() if bind.required)
        self.constants = {k: v for k, v in compiled.params.items() if k not in self.required}
        self.json = frozenset(name for name, bind in binds.items() if isinstance(bind.type, JSON))

    def first(self, session: Session, params: dict[str, Any]) -> Any:
        """The statement's first row (a tuple), or None."""
        connection = session.connection()
        dispatch: Any = connection.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            return session.execute(self.statement, params).first()
        if missing := self.required - params.keys():
            raise exc.ArgumentError(f"no value for {', '.join(sorted(missing))}")
        if session.autoflush:
            session.flush()  # the session's pending rows first, as its own execute does
        values = self.constants | params
        for name in self.json & values.keys():
            if values[name] is not None:
                values[name] = Json(values[name])
        driver: Any = connection.connection.dbapi_connection
        cursor = driver.cursor()
        try:
            cursor.execute(self.sql, values)
            return cursor.fetchone()
        except connection.dialect.loaded_dbapi.Error as error:
            lost = connection.dialect.is_disconnect(error, driver, cursor)
            if lost:
                connection.invalidate(error)
            raise exc.DBAPIError.instance(
                self.sql,
                values,
                error,
                connection.dialect.loaded_dbapi.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=connection.dialect,
            ) from error
        finally:
            cursor.close()
