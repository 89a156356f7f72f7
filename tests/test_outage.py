"""A real Redis outage: our own embedded Redis is stopped and started again.

Submitting while it is down answers 503 within 10 s; once it is back, the reaper publishes
the job and a real worker runs it. Nothing is lost. The machine's shared Redis is never
touched: this test starts its own through the embedded launcher.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import jobs
from shared.db import Database
from shared.embedded import EmbeddedRedis
from shared.models import Job, JobState, TokenScope
from shared.queue import Publisher
from shared.settings import Settings
from shared.tokens import create_token
from tests.conftest import WorkerProcess, wait_until
from tests.web.conftest import build_app, close_app

pytestmark = [pytest.mark.services, pytest.mark.worker, pytest.mark.slow]


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    state = Path(tempfile.mkdtemp(prefix="conveyor-outage-"))
    server = EmbeddedRedis(state)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_submit_during_redis_outage_is_503_and_runs_after_recovery(
    settings: Settings, committed_db: Database, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    local = settings.model_copy(update={"redis_url": own_redis.url})
    with committed_db.session() as s:
        _, token = create_token(s, local.secret("token_pepper"), "outage", TokenScope.WRITE)
    headers = {"Authorization": f"Bearer {token}"}
    app = build_app(local)
    client = app.test_client()
    try:
        own_redis.stop()
        began = time.monotonic()
        response = client.post("/api/v1/canaries", json={}, headers=headers)
        elapsed = time.monotonic() - began
        assert response.status_code == 503
        assert response.mimetype == "application/problem+json"
        assert int(response.headers["Retry-After"]) > 0
        assert elapsed < 10
        job_id = uuid.UUID(response.get_json()["job_id"])
        with committed_db.session() as s:
            row = s.get_one(Job, job_id)
            assert row.state == JobState.PENDING
            assert row.published_at is None

        own_redis.start()  # same state folder: same port, same URL
        with committed_db.session() as s:
            counts = jobs.reap_stale_jobs(s, Publisher(local), republish_after_s=60)
        assert counts["republished"] == 1
        worker = WorkerProcess(local, tmp_path / "worker.log")
        try:
            worker.wait_ready()

            def finished() -> Job | None:
                with committed_db.session() as s:
                    job = s.get_one(Job, job_id)
                    return job if job.state == JobState.SUCCESS else None

            done = wait_until(finished, timeout=60)
            assert isinstance(done, Job)
            assert done.attempts == 1
        finally:
            worker.stop()
    finally:
        close_app(app)
