"""The app's process-wide resources, kept on ``app.extensions["conveyor"]``.

One database engine, one publisher and one Redis client per process, created by the app
factory from the settings it was given; views reach them through ``conveyor()`` and get a
request-scoped session from ``db_session()``, closed when the request ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import redis
from flask import Flask, current_app, g
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from shared.cache import Cache
from shared.db import Database, autocommit, make_engine
from shared.queue import Publisher
from shared.settings import Settings

T = TypeVar("T")

EXTENSION = "conveyor"
# Health probes must answer quickly even when a dependency hangs.
PROBE_TIMEOUT_S = 2


@dataclass
class Conveyor:
    """What the web process holds for its lifetime."""

    settings: Settings
    db: Database
    publisher: Publisher
    token_pepper: str
    # Separate small pool and client for /readyz: a probe must not queue behind requests.
    probe_engine: Engine
    probe_redis: redis.Redis
    # The read caches and their invalidation listener (shared/cache.py).
    cache: Cache

    def close(self) -> None:
        """Release pooled connections (tests, and a clean shutdown)."""
        self.cache.close()
        self.db.engine.dispose()
        self.probe_engine.dispose()
        self.probe_redis.close()
        self.publisher.close()


def init_conveyor(app: Flask, settings: Settings) -> Conveyor:
    """Create the resources and attach them to ``app``."""
    if not settings.redis_url:
        raise RuntimeError("redis_url is not set (the launcher fills it in for embedded use)")
    ext = Conveyor(
        settings=settings,
        db=Database(settings),
        publisher=Publisher(settings),
        # Resolved now so a missing secret fails at startup, not on the first request.
        token_pepper=settings.secret("token_pepper"),
        probe_engine=make_engine(
            settings,
            pool_size=1,
            max_overflow=1,
            pool_timeout=PROBE_TIMEOUT_S,
            connect_args={
                "connect_timeout": PROBE_TIMEOUT_S,
                "options": f"-c statement_timeout={PROBE_TIMEOUT_S * 1000}",
                "application_name": "conveyor-probe",
            },
        ),
        probe_redis=redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
        ),
        cache=Cache(settings),
    )
    app.extensions[EXTENSION] = ext
    app.teardown_request(_close_session)
    return ext


def conveyor() -> Conveyor:
    """The current app's resources."""
    return cast(Conveyor, current_app.extensions[EXTENSION])


def db_session() -> Session:
    """This request's session, opened on first use; callers commit."""
    session: Session | None = g.get("db_session")
    if session is None:
        db = conveyor().db
        # One connection for the request, kept across its commits (Database.pinned_session).
        g.db_connection = db.engine.connect()
        session = db.pinned_session(g.db_connection)
        g.db_session = session
    return session


def read(load: Callable[[Session], T]) -> T:
    """``load`` on this request's session, each statement outside a transaction.

    Under READ COMMITTED a transaction around a page's count and rows gives them no common
    snapshot either; it only adds psycopg2's BEGIN before and the request's ROLLBACK after.
    """
    session = db_session()
    with autocommit(session):
        return load(session)


def _close_session(_: BaseException | None) -> None:
    session: Session | None = g.pop("db_session", None)
    connection: Connection | None = g.pop("db_connection", None)
    if session is not None:
        # close() rolls back anything uncommitted.
        session.close()
    if connection is not None:
        connection.close()  # back to the pool
