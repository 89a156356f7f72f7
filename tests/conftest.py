"""Test fixtures on real services.

PostgreSQL and Redis: this machine's when reachable (127.0.0.1:5432 / :6379), otherwise
started once per session through the embedded launcher, the same one ``conveyor run``
uses. Each session gets its own database (migrated once) and its own Redis database
index, so parallel runs and a developer's ``make run`` never see each other's data.

Tests that talk to the database directly use ``session``: joined to an outer transaction
with savepoints and rolled back afterwards (SQLAlchemy "Joining a Session into an External
Transaction"). Tests that need a real worker process to see committed rows use
``committed_db`` and the ``worker`` fixture, and clean up by truncating.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from shared.db import Database
from shared.migrate import upgrade
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379"
TABLES = (
    "import_errors",
    "imports",
    "uploads",
    "deployment_events",
    "deployments",
    "environments",
    "test_cases",
    "features",
    "jobs",
    "api_tokens",
)


def _pg_reachable(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


def _redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(admin PostgreSQL URL, Redis base URL): this machine's, or embedded ones."""
    need_pg = not _pg_reachable(LOCAL_PG)
    need_redis = not _redis_reachable(LOCAL_REDIS)
    if not (need_pg or need_redis):
        yield LOCAL_PG, LOCAL_REDIS
        return
    from shared.embedded import EmbeddedServices

    # A 0755 folder under /tmp: reachable by the unprivileged PostgreSQL user when root.
    state = Path(tempfile.mkdtemp(prefix="conveyor-test-services-"))
    state.chmod(0o755)
    with EmbeddedServices(state, postgres=need_pg, redis=need_redis) as embedded:
        pg = embedded.database_url.rsplit("/", 1)[0] + "/postgres" if need_pg else LOCAL_PG
        rd = embedded.redis_url.rsplit("/", 1)[0] if need_redis else LOCAL_REDIS  # type: ignore[union-attr]
        yield pg, rd


@pytest.fixture(scope="session")
def database_url(services: tuple[str, str]) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    admin_url, _ = services
    name = f"conveyor_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        admin_url.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url(services: tuple[str, str]) -> Iterator[str]:
    """A Redis database index of our own, flushed before and after the session."""
    _, base = services
    url = f"{base}/{11 + os.getpid() % 5}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-state-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, state_dir: Path) -> Settings:
    """Settings built directly, never by patching the environment."""
    return Settings(
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        state_dir=state_dir,
        redis_socket_timeout_s=2.0,
        log_json=True,
    )


@pytest.fixture(scope="session")
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    yield database
    database.engine.dispose()


@pytest.fixture
def session(db: Database) -> Iterator[Session]:
    """A session inside an outer transaction, rolled back after the test."""
    with db.engine.connect() as conn:
        outer = conn.begin()
        sess = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield sess
        finally:
            sess.close()
            outer.rollback()


@pytest.fixture
def committed_db(db: Database) -> Iterator[Database]:
    """For tests whose rows other processes must see: commits for real, truncates after."""
    yield db
    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for a Conveyor subprocess pointed at the test services."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "DATABASE_URL": settings.database_url or "",
        "REDIS_URL": settings.redis_url or "",
        "CONVEYOR_STATE_DIR": str(settings.state_dir),
        "CONVEYOR_ENV": "test",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra)
    return env


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


class WorkerProcess:
    """A real ``celery worker`` subprocess against the test services."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        concurrency: int = 2,
        queues: str = "default,imports,deployments",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.hostname = f"test-{uuid.uuid4().hex[:6]}@%h"
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                self.hostname,
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=child_env(settings, **(extra_env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited early:\n{self.log_path.read_text()[-4000:]}")
            return b"ready." in self.log_path.read_bytes()

        wait_until(ready, timeout=timeout, interval=0.2)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and prefork children)."""
        os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self._log.close()


@pytest.fixture
def worker(settings: Settings, committed_db: Database, tmp_path: Path) -> Iterator[WorkerProcess]:
    """One running worker for the test; stopped afterwards."""
    proc = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def start_worker(
    settings: Settings, committed_db: Database, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on demand (for kill/restart tests); all stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(**kwargs: object) -> WorkerProcess:
        proc = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop()
