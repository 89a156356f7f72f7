"""Canary and job lifecycle through a real ``celery worker`` subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from shared import jobs
from shared.db import Database
from shared.models import Job
from shared.queue import Publisher
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.worker


def _state(db: Database, job_id: uuid.UUID) -> Job:
    with db.session() as s:
        return s.get_one(Job, job_id)


def _finished(db: Database, job_id: uuid.UUID) -> Job | None:
    job = _state(db, job_id)
    return job if job.state in {"SUCCESS", "FAILURE", "REVOKED"} else None


def _submit(db: Database, settings: Settings, params: dict[str, object] | None = None) -> Job:
    with db.session() as s:
        return jobs.submit(s, Publisher(settings), "canary", params or {}, owner="tests").job


def test_canary_reaches_success_with_latencies(
    settings: Settings, committed_db: Database, worker: WorkerProcess
) -> None:
    job = _submit(committed_db, settings)
    done = wait_until(lambda: _finished(committed_db, job.id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert done.attempts == 1
    assert done.result is not None
    assert done.result["queue_wait_ms"] >= 0
    assert done.result["run_ms"] >= 0
    assert done.result["db_roundtrip_ms"] > 0
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.finished_at >= done.started_at
    assert done.locked_by is None
    # Every line the worker wrote about this job is JSON and carries its id.
    lines = [ln for ln in worker.log_path.read_text().splitlines() if str(job.id) in ln]
    assert any('"job_id": "' + str(job.id) + '"' in ln for ln in lines)


def test_cancelled_pending_job_never_runs(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    # Submitted and cancelled while no worker runs: the message stays in Redis.
    job = _submit(committed_db, settings)
    with committed_db.session() as s:
        jobs.cancel(s, Publisher(settings), s.get_one(Job, job.id))
    # A canary behind it proves the worker consumed the queue past the cancelled one.
    marker = _submit(committed_db, settings)
    start_worker()
    wait_until(lambda: _finished(committed_db, marker.id), timeout=60)
    cancelled = _state(committed_db, job.id)
    assert cancelled.state == "REVOKED"
    assert cancelled.started_at is None
    assert cancelled.attempts == 0
    assert cancelled.result is None


def test_running_job_stops_at_next_checkpoint(
    settings: Settings, committed_db: Database, worker: WorkerProcess
) -> None:
    job = _submit(committed_db, settings, {"sleep_s": 20})
    wait_until(lambda: _state(committed_db, job.id).state == "PROGRESS", timeout=60)
    with committed_db.session() as s:
        jobs.cancel(s, Publisher(settings), s.get_one(Job, job.id))
    done = wait_until(lambda: _finished(committed_db, job.id), timeout=15)
    assert isinstance(done, Job)
    assert done.state == "REVOKED"
    assert done.error == {"code": "cancelled", "message": "cancelled while running"}
    assert done.progress is not None
    assert done.progress["percent"] < 100


def test_killed_worker_job_is_reaped_and_finished_by_another(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    first = start_worker()
    job = _submit(committed_db, settings, {"sleep_s": 3})
    wait_until(lambda: _state(committed_db, job.id).state == "PROGRESS", timeout=60)
    first.kill()
    # Expire the dead worker's lease rather than waiting job_lease_s.
    with committed_db.session() as s:
        s.execute(
            Job.__table__.update()
            .where(Job.id == job.id)
            .values(lease_expires_at=func.clock_timestamp() - timedelta(seconds=1))
        )
        s.commit()
        counts = jobs.reap_stale_jobs(s, Publisher(settings), republish_after_s=3600)
    assert counts["republished"] >= 1
    assert _state(committed_db, job.id).state == "RETRY"
    start_worker()
    done = wait_until(lambda: _finished(committed_db, job.id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert done.attempts == 2


def test_duplicate_delivery_runs_once(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    job = _submit(committed_db, settings, {"sleep_s": 1.5})
    # Publish the same job twice more: at-least-once delivery made visible.
    publisher = Publisher(settings)
    publisher.publish("canary", str(job.id))
    publisher.publish("canary", str(job.id))
    start_worker(concurrency=3)
    done = wait_until(lambda: _finished(committed_db, job.id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS"
    assert done.attempts == 1
    with committed_db.session() as s:
        assert s.scalar(select(Job.lease_token).where(Job.id == job.id)) == 1
