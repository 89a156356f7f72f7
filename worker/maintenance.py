"""Periodic maintenance run by beat: the reaper (jobs, then deployments they left), the
cleanup of uploaded files, and the fold of the row-count deltas."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from celery import Task
from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session

from shared import counts, deployments, jobs, storage
from shared.models import FINISHED_STATES, ImportRun, Job, Upload
from shared.queue import CLEANUP_TASK, COMPACT_COUNTS_TASK, REAP_TASK
from worker import runtime
from worker.deployments import after_release
from worker.tasks import job_task

log = logging.getLogger(__name__)


@job_task(REAP_TASK, soft_time_limit=60, time_limit=90)
def reap(self: Task) -> dict[str, int]:
    """Republish lost PENDING jobs and jobs whose worker died; fail exhausted ones."""
    settings = runtime.settings()
    with runtime.database().session() as session:
        counts = jobs.reap_stale_jobs(
            session, runtime.publisher(), republish_after_s=settings.pending_republish_after_s
        )
        # Deployments whose job ended without them (cancelled while waiting, failed after
        # its workers kept dying) release their environment and wake the next in line.
        closed, wake, environments = deployments.reconcile_finished(session)
    for job_id in wake:
        after_release(job_id, set())
    after_release(None, environments)
    counts["deployments_closed"] = closed
    if any(counts.values()):
        log.info("reaper acted", extra=counts)
    return counts


def delete_finished_uploads(session: Session, retention_s: float, limit: int = 200) -> int:
    """Delete stored files whose import ended more than ``retention_s`` ago; returns how many.

    Files no import refers to (a request that failed after storing) go after the same
    grace. The ``uploads`` row stays, marked deleted, so the import keeps its digest and
    size; only the large object is removed.
    """
    cutoff = datetime.now(UTC) - timedelta(seconds=retention_s)
    finished_import = (
        select(ImportRun.upload_id)
        .join(Job, Job.id == ImportRun.job_id)
        .where(Job.state.in_([s.value for s in FINISHED_STATES]), Job.finished_at < cutoff)
    )
    referenced = exists().where(ImportRun.upload_id == Upload.id)
    uploads = session.scalars(
        select(Upload)
        .where(
            Upload.deleted_at.is_(None),
            or_(
                Upload.id.in_(finished_import),
                and_(~referenced, Upload.created_at < cutoff),
            ),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for upload in uploads:
        storage.delete(session, upload.oid)
        upload.deleted_at = datetime.now(UTC)
    session.commit()
    return len(uploads)


@job_task(CLEANUP_TASK, soft_time_limit=120, time_limit=150)
def cleanup(self: Task) -> int:
    """Delete uploaded files of finished imports after the retention grace."""
    with runtime.database().session() as session:
        deleted = delete_finished_uploads(session, runtime.settings().upload_retention_s)
    if deleted:
        log.info("deleted uploaded files", extra={"uploads": deleted})
    return deleted


@job_task(COMPACT_COUNTS_TASK, soft_time_limit=60, time_limit=90)
def compact_counts(self: Task) -> dict[str, int]:
    """Fold the row-count deltas of features and test cases (shared/counts.py)."""
    removed = counts.compact(runtime.database().engine)
    if any(removed.values()):
        log.debug("row-count deltas folded", extra={"removed": removed})
    return removed
