"""``web.wsgi:app`` as deployed, under granian and gunicorn: several worker processes,
settings from env."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from shared.db import Database
from shared.models import TokenScope
from shared.settings import Settings
from shared.tokens import create_token
from tests.conftest import wait_until
from tests.web.conftest import WEB_SERVERS, run_web

WORKERS = 4


@dataclass
class Server:
    url: str
    state_dir: Path
    log_path: Path


@pytest.fixture(params=WEB_SERVERS)
def server(
    request: pytest.FixtureRequest, settings: Settings, committed_db: Database, tmp_path: Path
) -> Iterator[Server]:
    """The server on a fresh state folder: its workers start together and must agree on
    secrets."""
    state_dir = tmp_path / "state"
    log_path = tmp_path / "web.log"
    with run_web(
        settings, log_path, request.param, workers=WORKERS, CONVEYOR_STATE_DIR=str(state_dir)
    ) as url:
        yield Server(url, state_dir, log_path)


def test_every_worker_shares_the_generated_pepper_and_logs_json(
    server: Server, committed_db: Database
) -> None:
    pepper = json.loads((server.state_dir / "secrets.json").read_text())["token_pepper"]
    with committed_db.session() as s:
        _, plain = create_token(s, pepper, "wsgi", TokenScope.WRITE)
    headers = {"Authorization": f"Bearer {plain}"}
    # Each request is a new connection, so the workers take turns: all must accept the token.
    statuses = {
        requests.get(f"{server.url}/api/v1/jobs", headers=headers, timeout=10).status_code
        for _ in range(4 * WORKERS)
    }
    assert statuses == {200}

    request_id = f"wsgi-{uuid.uuid4().hex[:8]}"
    response = requests.post(
        f"{server.url}/api/v1/canaries",
        headers={**headers, "X-Request-ID": request_id},
        timeout=10,
    )
    assert response.status_code == 202
    assert response.headers["X-Request-ID"] == request_id
    job_id = response.json()["id"]

    def submission_logged() -> dict[str, object] | None:
        for line in server.log_path.read_text().splitlines():
            if request_id in line:
                record: dict[str, object] = json.loads(line)
                return record
        return None

    record = wait_until(submission_logged, timeout=10)
    assert record == {**record, "request_id": request_id, "job_id": job_id, "process": "web"}
    assert plain not in server.log_path.read_text()
