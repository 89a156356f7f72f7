"""Periodic maintenance run by beat: the reaper."""

from __future__ import annotations

import logging

from celery import Task

from shared import jobs
from shared.queue import REAP_TASK
from worker import runtime
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
    if any(counts.values()):
        log.info("reaper acted", extra=counts)
    return counts
