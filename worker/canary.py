"""The canary job: an end-to-end probe through web → Redis → worker → PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from worker.tasks import JobContext, execute_job, holder_id, job_task


def run_canary(ctx: JobContext) -> dict[str, Any]:
    """Report queue wait and the worker's database round trip; optionally stay busy.

    The round trip is the lease's: the UPDATE that took the job, a write on the worker's
    pooled connection, so the probe needs no statement of its own (a ``SELECT 1`` here
    was an eighth of a canary's instructions in the worker). ``sleep_s`` keeps it busy.
    """
    job = ctx.job
    queue_wait_ms = None
    if job.started_at is not None:
        enqueued = job.published_at or job.created_at
        queue_wait_ms = round((job.started_at - enqueued).total_seconds() * 1000, 2)
    sleep_s = float(job.params.get("sleep_s", 0))
    steps = max(1, int(sleep_s * 10))
    for step in range(steps if sleep_s else 0):
        time.sleep(sleep_s / steps)
        # A checkpoint every 100 ms: a cancel lands within one step.
        ctx.progress(step + 1, steps, "sleeping")
    return {
        "queue_wait_ms": queue_wait_ms,
        "run_ms": round((time.monotonic() - ctx.task_started) * 1000, 2),
        "db_roundtrip_ms": round(ctx.lease_ms, 2),
        "worker": holder_id(),
    }


@job_task("conveyor.canary.run", soft_time_limit=120, time_limit=150)
def canary(self: Task, job_id: str) -> None:
    execute_job(self, job_id, run_canary)
