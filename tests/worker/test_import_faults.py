"""Imports through real worker processes that die, get duplicate messages, or are cancelled.

Each test ends with the exact row count and no duplicates: a chunk lands exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from shared import jobs
from shared.db import Database
from shared.models import Feature, ImportRun, Job
from shared.queue import Publisher
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.worker.importing import count, create_import

pytestmark = [pytest.mark.worker, pytest.mark.slow]

HEADER = b"external_id,name,description,status,complexity_points,created_at\n"
# A short lease, so a killed worker's job is reaped in seconds, not a minute.
FAST_LEASE = {"CONVEYOR_JOB_LEASE_S": "2"}


def body(n: int) -> bytes:
    return HEADER + b"".join(
        f"F-{i:07d},Feature {i},Description of feature {i},planned,{i % 13},\n".encode()
        for i in range(n)
    )


def job_of(db: Database, job_id: uuid.UUID) -> Job:
    with db.session() as s:
        return s.get_one(Job, job_id)


def finished(db: Database, job_id: uuid.UUID) -> Job | None:
    job = job_of(db, job_id)
    return job if job.state in {"SUCCESS", "FAILURE", "REVOKED"} else None


def chunks_done(db: Database, job_id: uuid.UUID) -> int:
    with db.session() as s:
        return s.get_one(ImportRun, job_id).chunks


def assert_exactly_once(db: Database, n: int) -> None:
    with db.session() as s:
        total = s.scalar(select(func.count()).select_from(Feature))
        distinct = s.scalar(select(func.count(func.distinct(Feature.external_id))))
    assert total == n
    assert distinct == n


def reap_after_lease(db: Database, settings: Settings, job_id: uuid.UUID) -> None:
    """Wait for the dead worker's lease to lapse, then run the reaper once."""
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=func.clock_timestamp() - timedelta(seconds=1))
        )
        s.commit()
        counts = jobs.reap_stale_jobs(s, Publisher(settings), republish_after_s=3600)
    assert counts["republished"] == 1


@pytest.mark.parametrize("writers", ["1", "2"])
def test_worker_group_killed_mid_import_resumes_exactly_once(
    settings: Settings,
    committed_db: Database,
    start_worker: Callable[..., WorkerProcess],
    writers: str,
) -> None:
    n = 200_000
    first = start_worker(extra_env={**FAST_LEASE, "CONVEYOR_IMPORT_WRITERS": writers})
    job_id = create_import(committed_db, settings, body(n))
    wait_until(lambda: chunks_done(committed_db, job_id) >= n // 2000, timeout=120, interval=0.05)
    first.kill()  # SIGKILL to the whole process group: no warm shutdown, no ack
    landed = count(committed_db)
    assert 0 < landed < n
    reap_after_lease(committed_db, settings, job_id)
    start_worker(extra_env={"CONVEYOR_IMPORT_WRITERS": writers})
    done = wait_until(lambda: finished(committed_db, job_id), timeout=180)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert done.attempts == 2
    assert done.result is not None
    assert done.result["rows_read"] == n
    assert done.result["rows_inserted"] == n
    assert_exactly_once(committed_db, n)


@pytest.mark.parametrize("point", ["after_copy", "after_commit"])
def test_crash_around_commit_lands_each_chunk_once(
    settings: Settings,
    committed_db: Database,
    start_worker: Callable[..., WorkerProcess],
    point: str,
) -> None:
    n = 3500
    # The prefork child SIGKILLs itself at chunk 2, before or after its COMMIT. Celery's
    # main process sees the child die and requeues the message (reject_on_worker_lost);
    # another child takes over from the dead one and resumes from the checkpoint.
    worker = start_worker(extra_env={"CONVEYOR_FAULT": f"{point}:2"})
    job_id = create_import(committed_db, settings, body(n))
    done = wait_until(lambda: finished(committed_db, job_id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert "WorkerLostError" in worker.log_path.read_text()
    assert "taking over from a dead worker process" in worker.log_path.read_text()
    assert done.attempts == 2
    assert done.result is not None
    assert done.result["rows_inserted"] == n
    assert done.result["chunks"] == 4
    assert_exactly_once(committed_db, n)


def test_a_second_delivery_of_a_running_import_writes_nothing(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    n = 60_000
    job_id = create_import(committed_db, settings, body(n))
    Publisher(settings).publish("import", str(job_id))  # the same job, delivered twice
    worker = start_worker(concurrency=2)
    done = wait_until(lambda: finished(committed_db, job_id), timeout=120)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert done.attempts == 1
    assert done.lease_token == 1  # nobody else ever held it
    assert "job not runnable by this delivery" in worker.log_path.read_text()
    assert_exactly_once(committed_db, n)


def test_cancel_stops_at_a_chunk_boundary_and_keeps_what_landed(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    n = 200_000
    start_worker(extra_env={"CONVEYOR_IMPORT_WRITERS": "2"})
    job_id = create_import(committed_db, settings, body(n))
    wait_until(lambda: chunks_done(committed_db, job_id) >= 5, timeout=60, interval=0.05)
    with committed_db.session() as s:
        jobs.cancel(s, Publisher(settings), s.get_one(Job, job_id))
    done = wait_until(lambda: finished(committed_db, job_id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "REVOKED"
    assert done.result is not None
    landed = count(committed_db)
    assert landed < n
    assert landed % 1000 == 0  # whole chunks only
    assert done.result["rows_inserted"] == landed
    assert chunks_done(committed_db, job_id) == landed // 1000


def test_long_imports_run_in_slices_with_continuations(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    n = 5000
    # A zero-second slice: every chunk ends its delivery and queues a continuation.
    worker = start_worker(extra_env={"CONVEYOR_JOB_SLICE_S": "0"})
    job_id = create_import(committed_db, settings, body(n))
    done = wait_until(lambda: finished(committed_db, job_id), timeout=120)
    assert isinstance(done, Job)
    assert done.state == "SUCCESS", done.error
    assert done.attempts == 1  # continuations are not new attempts
    assert done.lease_token >= 5
    assert worker.log_path.read_text().count("continuation queued") >= 4
    assert_exactly_once(committed_db, n)


def test_worker_lost_after_max_attempts(
    settings: Settings, committed_db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = create_import(committed_db, settings, body(3000))
    with committed_db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(max_attempts=2))
        s.commit()
    # Every delivery dies in its first chunk: after two the job ends instead of looping.
    start_worker(extra_env={"CONVEYOR_FAULT": "after_copy:1:99"})
    done = wait_until(lambda: finished(committed_db, job_id), timeout=60)
    assert isinstance(done, Job)
    assert done.state == "FAILURE"
    assert done.error is not None
    assert done.error["code"] == "worker_lost"
    # Chunk 1 never commits; the other writer may have committed chunk 2 before the crash.
    with committed_db.session() as s:
        run = s.get_one(ImportRun, job_id)
    assert run.head_chunk == 0
    assert count(committed_db) == run.rows_inserted
    assert run.rows_inserted % 1000 == 0
