"""The ``conveyor`` command as people and process managers run it: real subprocesses.

Token and migration commands run against the test database. The supervisor's restart
backoff and stop escalation run real child processes. ``conveyor run`` itself starts with
DATABASE_URL/REDIS_URL unset, so it brings up embedded PostgreSQL and Redis, web, a
worker, beat and Flower, and must leave nothing behind when interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import text

from shared import cli
from shared.db import Database
from shared.migrate import alembic_config
from shared.models import ApiToken, TokenScope
from shared.settings import Settings
from shared.tokens import authenticate, hash_token
from tests.conftest import ROOT, child_env, wait_until


def conveyor(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``conveyor ARGS`` as a subprocess (``python -m shared.cli``, the same entry)."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fields(output: str) -> dict[str, str]:
    """``key: value`` lines of ``token create``'s output."""
    pairs = (line.split(":", 1) for line in output.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


# --- help and wiring ----------------------------------------------------------------------


def test_help_is_fast_and_imports_neither_web_nor_worker() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}
    started = time.monotonic()
    result = conveyor(env, "--help")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    for command in ("run", "web", "worker", "beat", "flower", "db", "token", "check", "job"):
        assert command in result.stdout
    assert elapsed < 5.0, f"--help took {elapsed:.1f} s"

    probe = (
        "import json, sys, shared.cli; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    modules = set(json.loads(loaded.stdout))
    assert not modules & {"web", "worker", "celery", "gunicorn", "flower", "sqlalchemy"}


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["web"],
        ["worker"],
        ["beat"],
        ["flower"],
        ["db", "upgrade"],
        ["token", "create"],
        ["token", "list"],
        ["token", "revoke"],
        ["check"],
        ["job", "show"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli.main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_exec_commands_need_urls_or_a_running_conveyor_run(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
        "CONVEYOR_STATE_DIR": str(tmp_path),
    }
    result = conveyor(env, "worker")
    assert result.returncode == 1
    assert "needs DATABASE_URL and REDIS_URL" in result.stderr
    assert "conveyor run" in result.stderr
    result = conveyor(env, "flower")
    assert result.returncode == 1
    assert "needs REDIS_URL" in result.stderr


def test_worker_queues_match_the_routing() -> None:
    # The CLI spells the queues out so that --help need not import Celery.
    from shared.queue import QUEUES

    assert cli.QUEUES.split(",") == list(QUEUES)


def test_child_commands_keep_secrets_out_of_argv(settings: Settings) -> None:
    password = settings.secret("flower_password")
    argv = cli.flower_command(settings)
    env = cli.flower_env(settings, {})
    assert not any(password in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == f"{settings.flower_user}:{password}"
    for argv in (cli.web_command(settings), cli.worker_command(settings)):
        assert not any(settings.secret("token_pepper") in arg for arg in argv)


# --- tokens and migrations ----------------------------------------------------------------


def test_token_create_list_revoke_round_trip(settings: Settings, committed_db: Database) -> None:
    # The same secrets.json the subprocesses read (CONVEYOR_STATE_DIR): the same pepper.
    pepper = settings.secret("token_pepper")
    env = child_env(settings)

    created = conveyor(env, "token", "create", "--scope", "write", "--name", "ci-bot")
    assert created.returncode == 0, created.stderr
    out = fields(created.stdout)
    plain, token_id, prefix = out["token"], out["id"], out["prefix"]
    assert plain.startswith("cvr_")
    assert plain.startswith(prefix)
    assert created.stdout.count(plain) == 1, "the token is printed exactly once"
    assert plain not in created.stderr
    assert out["scope"] == "write"

    with committed_db.session() as session:
        row = session.get_one(ApiToken, uuid.UUID(token_id))
        # Only the HMAC is stored; the plain token is in no column.
        assert row.token_hash == hash_token(pepper, plain)
        values = session.execute(
            text("SELECT row_to_json(t)::text FROM api_tokens t WHERE id = :id"),
            {"id": token_id},
        ).scalar_one()
        assert plain not in values
        principal = authenticate(session, pepper, plain)
        assert principal is not None
        assert principal.scope == TokenScope.WRITE
        assert principal.name == "ci-bot"

    listed = conveyor(env, "token", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if token_id in line)
    assert "ci-bot" in line
    assert prefix in line
    assert plain not in listed.stdout

    revoked = conveyor(env, "token", "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked 1 token" in revoked.stdout
    with committed_db.session() as session:
        assert authenticate(session, pepper, plain) is None
        assert session.get_one(ApiToken, uuid.UUID(token_id)).revoked_at is not None

    again = conveyor(env, "token", "revoke", token_id)
    assert again.returncode == 1
    assert "no active token" in again.stderr

    listed = conveyor(env, "token", "list")
    line = next(line for line in listed.stdout.splitlines() if token_id in line)
    assert line.count("UTC") == 2, "created and revoked are both shown"


def test_token_create_quiet_prints_only_the_token(
    settings: Settings, committed_db: Database
) -> None:
    created = conveyor(child_env(settings), "token", "create", "--scope", "read", "-q")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cvr_")
    with committed_db.session() as session:
        principal = authenticate(session, settings.secret("token_pepper"), lines[0])
        assert principal is not None
        assert principal.scope == TokenScope.READ


def test_token_create_refuses_an_unknown_scope(settings: Settings) -> None:
    result = conveyor(child_env(settings), "token", "create", "--scope", "root")
    assert result.returncode == 2
    assert "root" in result.stderr


def test_db_upgrade_is_idempotent(settings: Settings, db: Database) -> None:
    assert settings.database_url is not None
    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    for _ in range(2):
        result = conveyor(child_env(settings), "db", "upgrade")
        assert result.returncode == 0, result.stderr
        assert f"is at {head}" in result.stdout
    with db.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == [head]


# --- the supervisor, with real child processes --------------------------------------------


def test_a_dying_child_is_restarted_with_exponential_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crasher = cli.Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"], {})
    supervisor = cli.Supervisor([crasher])
    caplog.set_level(logging.INFO, logger="conveyor.supervisor")
    supervisor.start_all()
    watcher = threading.Thread(target=supervisor.watch, kwargs={"poll_s": 0.05})
    watcher.start()
    try:
        # Dies at once; restarts after 1 s, then 2 s: the third death is due at about 3 s.
        time.sleep(3.8)
    finally:
        supervisor.stop_requested.set()
        watcher.join()
        supervisor.stop_all()
    exits = [r for r in caplog.records if r.getMessage().startswith("child exited")]
    delays = [r.__dict__["restart_in_s"] for r in exits]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert all(r.__dict__["returncode"] == 3 for r in exits)
    restarts = [r for r in caplog.records if r.getMessage() == "child restarted"]
    assert len(restarts) == 2


def test_backoff_is_capped() -> None:
    child = cli.Child("x", [sys.executable, "-c", "pass"], {})
    supervisor = cli.Supervisor([child])
    child.failures = 10
    child.start()
    assert child.proc is not None
    child.proc.wait()
    supervisor._tend(child, time.monotonic())
    assert child.restart_at is not None
    assert child.restart_at - time.monotonic() <= cli.BACKOFF_CAP_S


def test_stop_escalates_to_sigkill_and_takes_the_whole_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A master that ignores SIGTERM, with a grandchild in its process group.
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    monkeypatch.setitem(cli.STOP_TIMEOUT_S, "web", 0.5)
    child = cli.Child("web", [sys.executable, "-c", script], dict(os.environ))
    supervisor = cli.Supervisor([child])
    supervisor.start_all()
    assert child.proc is not None
    master = psutil.Process(child.proc.pid)
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=10)
    grandchild = psutil.Process(int(pid_file.read_text()))
    started = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - started < 5
    assert not _alive(master)
    psutil.wait_procs([grandchild], timeout=5)
    assert not _alive(grandchild)


# --- conveyor run, end to end -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _port(conn: Any) -> int | None:
    """The local port of a psutil connection (``laddr`` is an empty tuple for some)."""
    port: int | None = getattr(conn.laddr, "port", None)
    return port


def _listening_ports(procs: list[psutil.Process]) -> set[int]:
    ports: set[int] = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                port = _port(conn)
                if conn.status == psutil.CONN_LISTEN and port is not None:
                    ports.add(port)
        except psutil.Error:
            continue
    return ports


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _mentions(proc: psutil.Process, state: Path, ports: set[int]) -> bool:
    try:
        args = proc.cmdline()
    except psutil.Error:
        return False
    joined = " ".join(args)
    if str(state) in joined:
        return True
    return any(
        arg == str(port) or arg.endswith((f":{port}", f"={port}")) for arg in args for port in ports
    )


@pytest.fixture
def run_state() -> Iterator[Path]:
    # 0755 under /tmp: reachable by the unprivileged PostgreSQL user when we are root.
    state = Path(tempfile.mkdtemp(prefix="conveyor-run-test-"))
    state.chmod(0o755)
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.services
@pytest.mark.slow
def test_run_serves_a_canary_and_stops_clean(run_state: Path, tmp_path: Path) -> None:
    web_port, flower_port = _free_port(), _free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        # DATABASE_URL and REDIS_URL unset: embedded PostgreSQL and Redis.
        "CONVEYOR_STATE_DIR": str(run_state),
        "CONVEYOR_WEB_PORT": str(web_port),
        "CONVEYOR_FLOWER_PORT": str(flower_port),
        "CONVEYOR_EMBEDDED_PG_PORT": "0",
        "CONVEYOR_WORKER_CONCURRENCY": "1",
        "CONVEYOR_WEB_WORKERS": "1",
    }
    log_path = tmp_path / "run.log"
    api = f"http://127.0.0.1:{web_port}"
    flower = f"http://127.0.0.1:{flower_port}"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    procs: list[psutil.Process] = []
    try:

        def get(url: str, **kwargs: Any) -> requests.Response | None:
            if proc.poll() is not None:
                pytest.fail(f"conveyor run exited early:\n{log_path.read_text()[-6000:]}")
            try:
                return requests.get(url, timeout=5, **kwargs)
            except requests.ConnectionError:
                return None

        def ready() -> bool:
            response = get(f"{api}/readyz")
            return response is not None and response.status_code == 200

        wait_until(ready, timeout=60, interval=0.5)
        procs = _tree(proc.pid)

        # The admin token: a 0600 file, never printed.
        token_path = run_state / "admin-token"
        assert token_path.stat().st_mode & 0o777 == 0o600
        token = token_path.read_text().strip()
        assert token.startswith("cvr_")
        auth = {"Authorization": f"Bearer {token}"}

        submitted = requests.post(f"{api}/api/v1/canaries", json={}, headers=auth, timeout=10)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert submitted.headers["Location"].endswith(f"/api/v1/jobs/{job_id}")

        def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = requests.get(
                f"{api}/api/v1/jobs/{job_id}", headers=auth, timeout=10
            ).json()
            return body if body["state"] in cli.FINISHED else None

        job = wait_until(finished, timeout=60, interval=0.2)
        assert isinstance(job, dict)
        assert job["state"] == "SUCCESS", job
        assert job["result"]["queue_wait_ms"] is not None

        # Flower: basic auth with the generated password, which no argv shows.
        password = json.loads((run_state / "secrets.json").read_text())["flower_password"]
        anonymous = get(f"{flower}/")
        assert anonymous is not None
        assert anonymous.status_code == 401
        wrong = requests.get(f"{flower}/", auth=("admin", "wrong"), timeout=5)
        assert wrong.status_code == 401
        signed_in = requests.get(f"{flower}/", auth=("admin", password), timeout=5)
        assert signed_in.status_code == 200

        def worker_listed() -> bool:
            # refresh=1: ask the workers now (the cached answer predates the worker).
            response = get(f"{flower}/api/workers?refresh=1", auth=("admin", password))
            if response is None or response.status_code != 200:
                return False
            return any(name.startswith("conveyor@") for name in response.json())

        wait_until(worker_listed, timeout=30, interval=1)

        # `conveyor check` (admin token file by default) and `job show` against it.
        check = conveyor(env, "check", timeout=90)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "SUCCESS" in check.stdout
        shown = conveyor(env, "job", "show", job_id, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == "SUCCESS"
        # Token commands join the running embedded PostgreSQL instead of starting another.
        listed = conveyor(env, "token", "list")
        assert listed.returncode == 0, listed.stderr
        assert "admin" in listed.stdout

        procs = _tree(proc.pid)
        names = {p.name() for p in procs}
        assert "postgres" in names
        assert any("redis" in name for name in names)
        for p in procs:
            with_args = " ".join(p.cmdline())
            assert password not in with_args
            assert token not in with_args
        output = log_path.read_text()
        assert token not in output
        assert password not in output
        ports = _listening_ports(procs) | {web_port, flower_port}
        assert {web_port, flower_port} <= _listening_ports(procs)
        assert len(ports) >= 4, "web, Flower, PostgreSQL and Redis listen"

        # An embedded server that dies is restarted on the same data and port.
        redis_server = next(p for p in _tree(proc.pid) if "redis-server" in p.name())
        redis_server.kill()
        wait_until(
            lambda: "embedded server restarted" in log_path.read_text(), timeout=30, interval=0.5
        )
        wait_until(ready, timeout=30, interval=0.5)
        again = requests.post(f"{api}/api/v1/canaries", json={}, headers=auth, timeout=10)
        assert again.status_code == 202, again.text
        job_id = again.json()["id"]
        job = wait_until(finished, timeout=60, interval=0.2)
        assert isinstance(job, dict)
        assert job["state"] == "SUCCESS", job
        procs = _tree(proc.pid)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            # Failed midway: take the whole tree down (children have their own groups).
            with contextlib.suppress(psutil.Error):
                procs = procs or _tree(proc.pid)
            proc.kill()
            proc.wait()
        leftovers = [p for p in procs if _alive(p)]
        for p in leftovers:
            p.kill()

    assert not leftovers, [p.pid for p in leftovers]
    remaining = [
        p.info["pid"]
        for p in psutil.process_iter(["pid"])
        if p.pid != os.getpid() and _mentions(p, run_state, ports)
    ]
    assert not remaining, remaining
    listening = {
        _port(c)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and _port(c) in ports
    }
    assert not listening, listening
    assert "Conveyor stopped." in log_path.read_text()
