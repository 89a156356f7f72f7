"""Task declaration and the job runner every job task goes through.

``job_task`` refuses unnamed tasks and unknown options: a task name is the wire protocol
between web and worker, and a typo'd option (warehouse's ``ignore_results=True``) must not
pass silently. ``execute_job`` owns the session, the lease and the job's final state, so a
task body is a plain function of a ``JobContext``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil
from celery import Task
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import jobs, metrics
from shared.logs import bind_context
from shared.models import Job, JobState
from shared.settings import Settings
from worker import runtime
from worker.celery_app import app

log = logging.getLogger(__name__)

_ALLOWED_OPTIONS = frozenset({"soft_time_limit", "time_limit", "rate_limit"})


def job_task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """Declare a Celery task with an explicit ``conveyor.*`` name and vetted options."""
    if not name.startswith("conveyor."):
        raise ValueError(f"task name {name!r} must be explicit and start with 'conveyor.'")
    unknown = set(options) - _ALLOWED_OPTIONS
    if unknown:
        raise TypeError(f"unknown task options for {name}: {sorted(unknown)}")
    decorator: Callable[[Callable[..., Any]], Task] = app.task(
        name=name, bind=True, acks_late=True, reject_on_worker_lost=True, **options
    )
    return decorator


@dataclass
class JobContext:
    """What a task body gets: its job, a session, and progress reporting."""

    session: Session
    lease: jobs.Lease
    job: jobs.JobRecord
    settings: Settings
    task_started: float
    # Wall time of the lease's UPDATE: the worker's own round trip to PostgreSQL.
    lease_ms: float = 0.0
    # What the job has done so far, kept as the result if it is cancelled or fails.
    partial_result: dict[str, Any] | None = None

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        """Record progress and renew the lease; raises JobCancelled or LeaseLost."""
        payload = jobs.progress_payload(done, total, self.job.started_at, message)
        jobs.checkpoint(self.session, self.lease, self.settings.job_lease_s, payload)

    def slice_over(self) -> bool:
        """Whether this delivery has run its time slice (then raise jobs.SliceDone)."""
        return time.monotonic() - self.task_started > self.settings.job_slice_s


def holder_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def _dead_local_holder(session: Session, job_id: uuid.UUID) -> list[str]:
    """The job's holder if it is a process on this host that no longer runs.

    A prefork child killed mid-task gets its message redelivered at once
    (``task_reject_on_worker_lost``); without this the job would wait for the lease to
    lapse. A recycled pid only makes us wait for the lease, never steal a live one.
    """
    holder = session.scalar(select(Job.locked_by).where(Job.id == job_id))
    if not holder or "/" not in holder:
        return []
    host, _, pid = holder.rpartition("/")
    if host != socket.gethostname() or not pid.isdigit() or psutil.pid_exists(int(pid)):
        return []
    return [holder]


def _record_end(job: jobs.JobRecord, state: JobState) -> None:
    """The job's duration from its first start, by outcome (success, failure, revoked)."""
    if job.started_at is not None:
        seconds = (datetime.now(UTC) - job.started_at).total_seconds()
        metrics.JOB_DURATION.labels(job.kind, state.value.lower()).observe(max(0.0, seconds))


def execute_job(task: Task, job_id: str, body: Callable[[JobContext], dict[str, Any]]) -> None:
    """Run ``body`` for the job under a lease and record how it ended.

    A delivery that cannot take the lease (job finished, cancelled, or running under
    another delivery) returns without touching the row: at-least-once delivery makes
    duplicates normal. A lost lease mid-run stops without writing.
    """
    request_id = getattr(task.request, "request_id", None)
    with bind_context(job_id=job_id, task_id=task.request.id, request_id=request_id):
        try:
            key = uuid.UUID(job_id)
        except ValueError:
            log.error("task argument is not a job id; dropping the message")
            return
        settings = runtime.settings()
        with runtime.database().session() as session:
            asked = time.perf_counter()
            lease = jobs.acquire_lease(session, key, holder_id(), settings.job_lease_s)
            lease_ms = (time.perf_counter() - asked) * 1000
            if lease is None and (dead := _dead_local_holder(session, key)):
                log.warning("taking over from a dead worker process", extra={"holder": dead[0]})
                lease = jobs.acquire_lease(
                    session, key, holder_id(), settings.job_lease_s, dead_holders=dead
                )
            if lease is None:
                log.info("job not runnable by this delivery (finished, cancelled or held)")
                return
            job = lease.job
            log.info("job started", extra={"kind": job.kind, "attempt": lease.attempt})
            if lease.attempt == 1 and job.started_at is not None:
                enqueued = job.published_at or job.created_at
                metrics.JOB_QUEUE_WAIT.labels(job.kind).observe(
                    max(0.0, (job.started_at - enqueued).total_seconds())
                )
            ctx = JobContext(session, lease, job, settings, time.monotonic(), lease_ms=lease_ms)
            try:
                result = body(ctx)
            except jobs.JobCancelled:
                session.rollback()
                jobs.finish(
                    session,
                    lease,
                    JobState.REVOKED,
                    result=ctx.partial_result,
                    error={"code": "cancelled", "message": "cancelled while running"},
                )
                _record_end(job, JobState.REVOKED)
                log.info("job cancelled")
                return
            except jobs.JobWaiting as exc:
                log.info("job waiting; its turn will publish it again", extra={"why": str(exc)})
                return
            except jobs.LeaseLost:
                log.warning("lease lost to another delivery; stopping without writing")
                return
            except jobs.SliceDone:
                session.rollback()
                if jobs.yield_lease(session, lease):
                    # Same task id: the job id. If this publish fails, the lease lapses in
                    # seconds and the reaper republishes.
                    runtime.publisher().publish(job.kind, job_id, {"request_id": request_id or ""})
                    log.info("slice done; continuation queued")
                return
            except jobs.JobFailed as exc:
                session.rollback()
                jobs.finish(
                    session,
                    lease,
                    JobState.FAILURE,
                    result=ctx.partial_result,
                    error={"code": exc.code, "message": exc.message},
                )
                _record_end(job, JobState.FAILURE)
                log.warning("job failed", extra={"code": exc.code})
                return
            except Exception as exc:
                session.rollback()
                jobs.finish(
                    session,
                    lease,
                    JobState.FAILURE,
                    result=ctx.partial_result,
                    error={"code": "task_error", "message": f"{type(exc).__name__}: {exc}"[:500]},
                )
                _record_end(job, JobState.FAILURE)
                log.exception("job failed")
                raise
            jobs.finish(session, lease, JobState.SUCCESS, result=result)
            _record_end(job, JobState.SUCCESS)
            log.info("job succeeded")
