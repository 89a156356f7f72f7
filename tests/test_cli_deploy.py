"""``conveyor env`` and ``conveyor deploy`` as subprocesses against a live API and a real worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from shared.db import Database
from shared.models import TokenScope
from shared.settings import Settings
from shared.tokens import create_token
from tests.conftest import ROOT, WorkerProcess, child_env
from tests.web.conftest import app, live_server  # noqa: F401 - fixtures, reused
from tests.worker.deploying import make_feature


@pytest.fixture
def server(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """The API on a free port (``live_server``); the deployments queue emptied afterwards."""
    yield request.getfixturevalue("live_server")
    client = redis.Redis.from_url(redis_url)
    client.delete("deployments")
    client.close()


@pytest.fixture
def admin(settings: Settings, committed_db: Database) -> str:
    with committed_db.session() as s:
        _, plain = create_token(s, settings.secret("token_pepper"), "cli", TokenScope.ADMIN)
    return plain


def conveyor(
    settings: Settings, server: str, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args, "--url", server, "--token", token],
        cwd=ROOT,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_env_create_and_list(settings: Settings, server: str, admin: str) -> None:
    made = conveyor(settings, server, admin, "env", "create", "staging")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "environment staging: record driver"
    config = '{"argv": ["helm", "upgrade", "{feature}", "--version", "{version}"]}'
    made = conveyor(
        settings, server, admin, "env", "create", "prod", "--driver", "command", "--config", config
    )
    assert made.returncode == 0, made.stderr
    again = conveyor(settings, server, admin, "env", "create", "prod")
    assert again.returncode == 1
    assert "HTTP 409" in again.stderr
    bad = conveyor(settings, server, admin, "env", "create", "x", "--driver", "command")
    assert bad.returncode == 1
    assert "config.argv" in bad.stderr
    listed = conveyor(settings, server, admin, "env", "list")
    assert listed.returncode == 0, listed.stderr
    assert "prod" in listed.stdout
    assert "staging" in listed.stdout


@pytest.mark.worker
def test_deploy_wait_shows_the_steps_and_the_outcome(
    settings: Settings, server: str, admin: str, committed_db: Database, worker: WorkerProcess
) -> None:
    make_feature(committed_db, "F-1", ("passed",))
    assert conveyor(settings, server, admin, "env", "create", "staging").returncode == 0
    ok = conveyor(settings, server, admin, "deploy", "F-1", "staging", "1.0", "--wait")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    steps = [line.split()[1] for line in ok.stdout.splitlines() if line[:4].isdigit()]
    assert steps == [
        "queued",
        "validate",
        "validate",
        "deploy",
        "deploy",
        "verify",
        "verify",
        "record",
        "record",
    ]
    assert ok.stdout.splitlines()[-1].endswith(": SUCCESS (succeeded)")

    failing = '{"argv": ["false"]}'
    made = conveyor(
        settings,
        server,
        admin,
        "env",
        "create",
        "broken",
        "--driver",
        "command",
        "--config",
        failing,
    )
    assert made.returncode == 0, made.stderr
    bad = conveyor(settings, server, admin, "deploy", "F-1", "broken", "1.0", "--wait")
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[-1].endswith(
        "FAILURE (failed): deploy_failed: deploy failed: exited with status 1; "
        "nothing to roll back to (no previous version)"
    )

    unknown = conveyor(settings, server, admin, "deploy", "F-404", "staging", "1.0")
    assert unknown.returncode == 1
    assert "HTTP 404" in unknown.stderr
