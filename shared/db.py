"""The database: one engine per process, sessions, and the pool settings.

The engine is created lazily from settings. Prefork children must not share the
parent's pooled sockets: ``worker.celery_app`` calls ``dispose_engine_in_child()``
from ``worker_process_init`` (SQLAlchemy docs, "Using Connection Pools with
Multiprocessing or os.fork()").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

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
        "pool_pre_ping": settings.db_pool_pre_ping,
        "connect_args": {
            # Bounded connect and statement time: a dead database answers 503, never hangs.
            "connect_timeout": 5,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            "application_name": "conveyor",
        },
    }
    options.update(overrides)
    return create_engine(normalize_url(settings.database_url), **options)


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
