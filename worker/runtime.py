"""Per-process resources of a worker: settings, the database, a publisher.

Created on first use, in the process that uses them: a prefork child never touches the
parent's pooled connections (see ``worker.celery_app``'s ``worker_process_init`` hook).
"""

from __future__ import annotations

from functools import cache

from shared.db import Database
from shared.queue import Publisher
from shared.settings import Settings, load_settings


@cache
def settings() -> Settings:
    return load_settings()


@cache
def database() -> Database:
    return Database(settings(), pool_size=2, max_overflow=2)


@cache
def publisher() -> Publisher:
    from worker.celery_app import app  # the running app: reuse its broker connection pool

    return Publisher(settings(), app=app)


def after_fork() -> None:
    """In a fresh prefork child: drop inherited pooled connections without closing them."""
    if database.cache_info().currsize:
        database().dispose_in_child()
