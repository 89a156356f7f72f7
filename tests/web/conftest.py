"""Fixtures for the web app against real PostgreSQL and Redis.

The app uses its own connections, so everything a request must see (tokens, jobs) is
committed through ``committed_db`` and truncated after each test. Messages the app
publishes land in the test Redis database; they are deleted after each test so a worker
started by a later test does not meet jobs whose rows are gone.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from shared.cli import web_command
from shared.db import Database
from shared.models import ApiToken, Job, JobState, TokenScope
from shared.queue import KINDS, QUEUES
from shared.settings import Settings
from shared.tokens import create_token
from tests.conftest import ROOT, child_env, wait_until
from web import create_app


@dataclass(frozen=True)
class Token:
    id: str
    plain: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plain}"}


@dataclass(frozen=True)
class Tokens:
    read: Token
    write: Token
    other: Token  # a second write token: another owner
    admin: Token
    revoked: Token


def build_app(settings: Settings) -> Flask:
    app = create_app(settings)
    app.testing = True
    return app


def close_app(app: Flask) -> None:
    app.extensions["conveyor"].close()


@pytest.fixture
def app(settings: Settings, committed_db: Database) -> Iterator[Flask]:
    app = build_app(settings)
    yield app
    close_app(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def tokens(settings: Settings, committed_db: Database) -> Tokens:
    pepper = settings.secret("token_pepper")

    def make(name: str, scope: TokenScope) -> Token:
        with committed_db.session() as s:
            row, plain = create_token(s, pepper, name, scope)
            return Token(str(row.id), plain)

    revoked = make("revoked", TokenScope.ADMIN)
    with committed_db.session() as s:
        s.execute(
            update(ApiToken)
            .where(ApiToken.id == uuid.UUID(revoked.id))
            .values(revoked_at=ApiToken.created_at)
        )
        s.commit()
    return Tokens(
        read=make("reader", TokenScope.READ),
        write=make("writer", TokenScope.WRITE),
        other=make("other-writer", TokenScope.WRITE),
        admin=make("admin", TokenScope.ADMIN),
        revoked=revoked,
    )


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis; queues emptied afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.delete(*QUEUES)
    client.close()


@pytest.fixture(autouse=True)
def _empty_queues(broker: redis.Redis) -> None:
    """Every web test leaves the queues as it found them (see the module docstring)."""


def queued_message(broker: redis.Redis, job_id: str, queue: str = "default") -> dict[str, Any]:
    """The broker message for ``job_id`` waiting in ``queue``; fails if there is none."""
    for raw in broker.lrange(queue, 0, -1):
        message: dict[str, Any] = json.loads(raw)
        if message["headers"]["id"] == job_id:
            return message
    pytest.fail(f"no message for job {job_id} in queue {queue!r}")


def insert_job(db: Database, owner: str, **values: Any) -> uuid.UUID:
    """A committed job row written directly (no publish), for read-side tests."""
    kind = values.pop("kind", "canary")
    job = Job(
        id=values.pop("id", uuid.uuid4()),
        kind=kind,
        queue=KINDS[kind].queue,
        state=values.pop("state", JobState.PENDING.value),
        owner=owner,
        params=values.pop("params", {}),
        **values,
    )
    with db.session() as s:
        s.add(job)
        s.commit()
        return job.id


def set_job(db: Database, job_id: uuid.UUID | str, **values: Any) -> None:
    """Update a job row directly, as a worker would."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(str(job_id))).values(**values))
        s.commit()


def problem(response: TestResponse, status: int) -> dict[str, Any]:
    """Assert ``response`` is a problem document with ``status``; return its body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json(force=True)
    assert body["status"] == status
    assert body["title"]
    assert body["type"]
    return body


def unused_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(params=["refused", "silent"])
def dead_redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis URL that refuses connections, or accepts them and never answers."""
    if request.param == "refused":
        yield f"redis://127.0.0.1:{unused_port()}/0"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)  # the kernel completes handshakes; nobody ever replies
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


@pytest.fixture
def dead_redis_app(
    settings: Settings, committed_db: Database, dead_redis_url: str
) -> Iterator[Flask]:
    """The app with the real database but a dead broker."""
    app = build_app(settings.model_copy(update={"redis_url": dead_redis_url}))
    yield app
    close_app(app)


@pytest.fixture
def live_server(app: Flask) -> Iterator[str]:
    """``app`` served by a threaded werkzeug server, for real concurrent requests."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


WEB_SERVERS = ("granian", "gunicorn")


@contextlib.contextmanager
def run_gunicorn(settings: Settings, log_path: Path, *args: str, **env: str) -> Iterator[str]:
    """``gunicorn web.wsgi:app`` as deployed (``args`` added), until its /healthz answers."""
    port = unused_port()
    argv = [sys.executable, "-m", "gunicorn", "web.wsgi:app", "--bind", f"127.0.0.1:{port}"]
    with _serving([*argv, "--no-control-socket", *args], port, settings, log_path, env) as url:
        yield url


@contextlib.contextmanager
def run_web(
    settings: Settings, log_path: Path, server: str, *, workers: int, threads: int = 4, **env: str
) -> Iterator[str]:
    """``server`` started by the command ``conveyor web`` runs (``cli.web_command``)."""
    port = unused_port()
    chosen = settings.model_copy(update={"web_server": server, "web_port": port})
    argv = web_command(chosen, workers=workers, threads=threads)
    with _serving(argv, port, settings, log_path, {"CONVEYOR_WEB_SERVER": server, **env}) as url:
        yield url


@contextlib.contextmanager
def _serving(
    argv: list[str], port: int, settings: Settings, log_path: Path, env: dict[str, str]
) -> Iterator[str]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env(settings, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{argv[2]} exited:\n{log_path.read_text()[-4000:]}")
        try:
            return requests.get(f"{url}/healthz", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # bound, workers still booting
            return False

    try:
        wait_until(ready, timeout=30, interval=0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
