"""``/api/v1/jobs``: a job's status, the caller's jobs, and cancellation.

The ``jobs`` row answers every status question, so an id the caller cannot see (unknown,
or another owner's) is 404, never an invented PENDING. Admin tokens see every job.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared import jobs
from shared.jobs import JobRecord
from shared.models import Job, JobState, TokenScope
from shared.pages import page_body
from shared.queue import KINDS
from web.auth import current_principal, requires, visible_owner
from web.errors import BadRequest, Conflict, NotFound
from web.extension import conveyor, db_session, read
from web.links import link
from web.validation import query

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")

PROGRESS_FIELDS = ("done", "total", "percent", "eta_seconds", "message")
# Shown only for kinds that count rows (imports).
ROW_FIELDS = ("rows", "rows_per_s")
MAX_PAGE_SIZE = 100
# Bounds OFFSET, which PostgreSQL would otherwise reject (500) past its integer range.
MAX_PAGE = 1_000_000


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_url(job_id: uuid.UUID | str) -> str:
    """Where a job's status lives."""
    return link("jobs.get_job", job_id=str(job_id))


def job_body(job: Job | JobRecord) -> dict[str, Any]:
    """The API's representation of a job."""
    progress = None
    if job.progress is not None:
        progress = {name: job.progress.get(name) for name in PROGRESS_FIELDS}
        progress |= {name: job.progress[name] for name in ROW_FIELDS if name in job.progress}
    error = None
    if job.error is not None:
        error = {"code": job.error.get("code"), "message": job.error.get("message")}
    return {
        "id": str(job.id),
        "kind": job.kind,
        "state": job.state,
        "progress": progress,
        "params": job.params,
        "result": job.result,
        "error": error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
        "links": {"self": job_url(job.id)},
    }


def _no_store(response: Response) -> Response:
    # Status changes under the client's feet; no cache may answer for the row.
    response.headers["Cache-Control"] = "no-store"
    return response


def _visible_job(session: Session, raw_id: str) -> Job:
    try:
        job_id = uuid.UUID(raw_id)
    except ValueError:
        raise BadRequest(f"{raw_id!r} is not a job id (a UUID)") from None
    job = jobs.get_job(session, job_id, owner=visible_owner(current_principal()))
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


@bp.get("/<job_id>")
@requires(TokenScope.READ)
def get_job(job_id: str) -> Response:
    """A job's state, progress, result or error."""
    # What pollers call most: one statement, outside a transaction (web.extension.read).
    job = read(lambda session: _visible_job(session, job_id))
    return _no_store(jsonify(job_body(job)))


class JobListQuery(BaseModel):
    kind: str | None = None
    state: JobState | None = None
    page: int = Field(1, ge=1, le=MAX_PAGE)
    page_size: int = Field(20, ge=1, le=MAX_PAGE_SIZE)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str | None) -> str | None:
        if kind is not None and kind not in KINDS:
            raise ValueError(f"must be one of: {', '.join(sorted(KINDS))}")
        return kind


@bp.get("")
@requires(TokenScope.READ)
def list_jobs() -> Response:
    """The caller's jobs (an admin's: everyone's), newest first, a page at a time."""
    q = query(JobListQuery)
    conditions: list[ColumnElement[bool]] = []
    owner = visible_owner(current_principal())
    if owner is not None:
        conditions.append(Job.owner == owner)
    if q.kind is not None:
        conditions.append(Job.kind == q.kind)
    if q.state is not None:
        conditions.append(Job.state == q.state.value)

    def load(session: Session) -> tuple[int, Sequence[Job]]:
        total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
        # id breaks created_at ties (one transaction's rows share now()), so pages never
        # overlap.
        rows = session.scalars(
            select(Job)
            .where(*conditions)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .offset((q.page - 1) * q.page_size)
            .limit(q.page_size)
        ).all()
        return total, rows

    total, rows = read(load)

    filters = {k: v for k, v in {"kind": q.kind, "state": q.state}.items() if v is not None}

    def page_link(page: int) -> str:
        return link("jobs.list_jobs", **filters, page=page, page_size=q.page_size)

    body = page_body([job_body(job) for job in rows], q.page, q.page_size, total, page_link)
    return _no_store(jsonify(body))


@bp.delete("/<job_id>")
@requires(TokenScope.WRITE)
def cancel_job(job_id: str) -> tuple[Response, int]:
    """Cancel: a queued job is REVOKED now (200); a running one stops soon (202)."""
    job = _visible_job(db_session(), job_id)
    try:
        job = jobs.cancel(db_session(), conveyor().publisher, job)
    except jobs.JobFinished:
        raise Conflict(
            f"job {job.id} already finished ({job.state}); there is nothing to cancel",
            problem="job-finished",
            job_id=str(job.id),
            state=job.state,
        ) from None
    status = 200 if job.state == JobState.REVOKED else 202
    return _no_store(jsonify(job_body(job))), status
