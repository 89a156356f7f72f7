"""Jobs core: submit, lease, checkpoint, finish, cancel and reap.

The ``jobs`` row is the source of truth. Its life:

* ``submit`` inserts the row (PENDING, marked published), commits, then publishes the task
  whose id and only argument is the job id. A failed publish takes the mark back and
  leaves the row PENDING: the caller answers 503 and the reaper publishes it later, so
  nothing is silently lost.
* A worker ``acquire_lease``: one UPDATE that bumps the fencing token and the attempt count
  only if nobody holds a live lease. A second delivery of a running job gets nothing and
  backs off. ``checkpoint`` and ``finish`` only write while the caller's token is current.
* ``cancel`` marks PENDING jobs REVOKED (a later delivery sees that and does nothing) and
  asks running ones to stop at their next checkpoint.
* ``reap_stale_jobs`` republishes PENDING jobs nobody picked up and jobs whose lease lapsed
  (worker died); after ``max_attempts`` starts the job fails with ``worker_lost``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Interval, String, Table, and_, any_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared.db import DriverStatement, autocommit
from shared.models import ACTIVE_STATES, FINISHED_STATES, Job, JobState
from shared.queue import KINDS, Publisher, PublishError

log = logging.getLogger(__name__)


class JobError(Exception):
    """Base for jobs-core refusals; web maps each to a status."""


class IdempotencyMismatch(JobError):
    """The Idempotency-Key was used before with a different request."""


class JobFinished(JobError):
    """The job already ended; it cannot be cancelled."""


class LeaseLost(JobError):
    """Another delivery took the job over; the holder must stop without writing."""


class JobCancelled(JobError):
    """A cancel was requested; the task stops at this checkpoint."""


class JobFailed(JobError):
    """The job cannot succeed (bad file, too many errors): FAILURE with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobWaiting(JobError):
    """The job gave its lease back to wait (a deployment for its environment): it is
    PENDING again, and whoever it waits for publishes it when it may go on."""


class SliceDone(JobError):
    """The task ran its time slice; it hands the job to a continuation message.

    Slices stay well inside the broker's visibility timeout, so Redis never redelivers a
    message whose task is still running.
    """


def fingerprint(kind: str, params: dict[str, Any]) -> str:
    """A stable digest of what was asked, to tell a replay from a different request."""
    canonical = json.dumps({"kind": kind, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the statements of every job's life, built once ------------------------------------------
# A job runs through these for each submit, lease and finish: built per call, with the ORM's
# evaluation of what an UPDATE changed, they cost about a millisecond of CPU each (a canary
# job's whole worker side is a few). Built once with bound parameters they are compiled
# once (SQLAlchemy's statement cache) and run without the evaluation: RETURNING brings the
# row back, as a ``JobRecord`` (insert, lease) or refreshing a loaded Job (``_REFRESH``).
# clock_timestamp, not now(): now() is frozen at the start of the caller's transaction.
_NOW = func.clock_timestamp()
_JOBS = cast(Table, Job.__table__)
_REFRESH: Final = {"populate_existing": True, "synchronize_session": False}
_SUBMITTED_COLUMNS = (
    "id",
    "kind",
    "queue",
    "state",
    "owner",
    "params",
    "idempotency_key",
    "request_fingerprint",
    "max_attempts",
    "attempts",
    "publish_count",
    "cancel_requested",
    "lease_token",
)
# Core statements on the table, RETURNING the whole row as a ``JobRecord``.
_INSERT_ROW = insert(_JOBS).values(
    {name: bindparam(name, type_=_JOBS.c[name].type) for name in _SUBMITTED_COLUMNS}
    | {"published_at": _NOW}
)
_INSERT = _INSERT_ROW.returning(*_JOBS.c)
_INSERT_UNLESS_KEY_USED = _INSERT_ROW.on_conflict_do_nothing(
    constraint="uq_jobs_owner_idempotency_key"
).returning(*_JOBS.c)
_UNPUBLISHED = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"))
    .values(published_at=None, publish_count=_JOBS.c.publish_count - 1)
)
_PUBLISHED = (
    update(Job)
    .where(Job.id == bindparam("job_id"))
    .values(published_at=_NOW, publish_count=Job.publish_count + 1)
    .returning(Job)
)
_ACTIVE = bindparam("active_states", sorted(s.value for s in ACTIVE_STATES), type_=ARRAY(String))
_ACQUIRE = (
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("job_id"),
        # Array parameters, not IN lists: SQLAlchemy renders an IN list as an "expanding"
        # parameter and re-renders the statement's SQL at every execution (a twentieth of
        # a canary's instructions in the worker). PostgreSQL plans both forms alike.
        _JOBS.c.state == any_(_ACTIVE),
        _JOBS.c.cancel_requested.is_(False),
        or_(
            _JOBS.c.locked_by.is_(None),
            _JOBS.c.lease_expires_at < _NOW,
            _JOBS.c.locked_by == any_(bindparam("dead_holders", type_=ARRAY(String))),
        ),
    )
    .values(
        locked_by=bindparam("holder"),
        lease_token=_JOBS.c.lease_token + 1,
        lease_expires_at=_NOW + bindparam("ttl", type_=Interval()),
        heartbeat_at=_NOW,
        attempts=_JOBS.c.attempts + 1,
        state=JobState.STARTED.value,
        started_at=func.coalesce(_JOBS.c.started_at, _NOW),
    )
    .returning(*_JOBS.c)
)
_FINISH = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.lease_token == bindparam("token"))
    .values(
        state=bindparam("state"),
        result=bindparam("result", type_=_JOBS.c.result.type),
        error=bindparam("error", type_=_JOBS.c.error.type),
        finished_at=_NOW,
        locked_by=None,
        lease_expires_at=None,
    )
    .returning(_JOBS.c.id)
)


# The statements every job runs (submit, lease, finish), sent on the driver's cursor.
_INSERT_ON_DRIVER = DriverStatement(_INSERT)
_INSERT_UNLESS_KEY_USED_ON_DRIVER = DriverStatement(_INSERT_UNLESS_KEY_USED)
_ACQUIRE_ON_DRIVER = DriverStatement(_ACQUIRE)
_FINISH_ON_DRIVER = DriverStatement(_FINISH)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's row as a statement here returned it (RETURNING): read-only, in no session.

    What a submission answers with and a task reads. Loading an ORM ``Job`` from the
    RETURNING row cost more CPU than the statement's round trip (callgrind, in process:
    a canary's lease and finish 2.95 → 2.34 million instructions, its submission over HTTP
    6.20 → 5.64 million). The fields are the table's columns, in order (a test checks).
    """

    id: uuid.UUID
    kind: str
    queue: str
    state: str
    owner: str
    params: dict[str, Any]
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    idempotency_key: str | None
    request_fingerprint: str | None
    attempts: int
    max_attempts: int
    publish_count: int
    cancel_requested: bool
    locked_by: str | None
    lease_token: int
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        """The record of an ORM ``Job`` (a row loaded by a query)."""
        return cls(*(getattr(job, column.key) for column in _JOBS.c))


@dataclass
class Submitted:
    job: JobRecord
    created: bool  # False: an Idempotency-Key replay returned an existing job
    published: bool


def submit(
    session: Session,
    publisher: Publisher,
    kind: str,
    params: dict[str, Any],
    owner: str,
    idempotency_key: str | None = None,
    *,
    max_attempts: int = 3,
    headers: dict[str, str] | None = None,
    on_insert: Callable[[Session, uuid.UUID], None] | None = None,
) -> Submitted:
    """Record a job, commit, then publish it.

    With an ``idempotency_key``, concurrent and repeated submissions by one owner resolve to
    one row (INSERT … ON CONFLICT DO NOTHING, then read the winner). A replay of a job whose
    publish failed tries to publish it again. Raises IdempotencyMismatch when the key was
    used with a different request, PublishError when the broker refused (the row is kept).
    ``on_insert(session, job_id)`` runs in the inserting transaction, only for a new job.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    digest = fingerprint(kind, params)
    job_id = uuid.uuid4()
    values = {
        "id": job_id,
        "kind": kind,
        "queue": KINDS[kind].queue,
        "state": JobState.PENDING.value,
        "owner": owner,
        "params": params,
        "idempotency_key": idempotency_key,
        "request_fingerprint": digest,
        "max_attempts": max_attempts,
        "attempts": 0,
        "publish_count": 1,  # and published_at: the insert marks it published (see below)
        "cancel_requested": False,
        "lease_token": 0,
    }
    # RETURNING the whole row: the new job comes back whole, no SELECT after the commit.
    stmt = _INSERT_ON_DRIVER if idempotency_key is None else _INSERT_UNLESS_KEY_USED_ON_DRIVER
    if on_insert is None:
        with autocommit(session):
            row = stmt.first(session, values)
    else:
        row = stmt.first(session, values)
        if row is not None:
            # Rows that belong to the job (an import's file and checkpoint) commit with it,
            # before any worker can see the message.
            on_insert(session, job_id)
        session.commit()
    if row is None:
        existing = session.scalar(
            select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
        )
        assert existing is not None  # the conflicting row is committed: we waited on it
        if existing.kind != kind or existing.request_fingerprint != digest:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used with a different request"
            )
        job = existing
        if job.published_at is None and job.state == JobState.PENDING:
            publish_job(session, publisher, job, headers=headers)
        return Submitted(JobRecord.of(job), created=False, published=True)
    # The insert marked the job published, saving a transaction per job after the publish;
    # a refused publish takes the mark back. Should this process die between the commit
    # and the publish, the reaper republishes the job like any lost message: published
    # longer ago than ``pending_republish_after_s`` and not started, its queue empty.
    try:
        publisher.publish(kind, str(job_id), headers=headers)
    except PublishError:
        _unmark_published(session, job_id)
        raise
    return Submitted(JobRecord(*row), created=True, published=True)


def _unmark_published(session: Session, job_id: uuid.UUID) -> None:
    """A refused publish: the job is unpublished again, for a replay or the reaper."""
    try:
        with autocommit(session):
            session.execute(_UNPUBLISHED, {"job_id": job_id})
    except SQLAlchemyError:
        session.rollback()
        # Marked published but not: the reaper republishes it once the mark is old enough.
        log.exception("could not unmark a job whose publish failed", extra={"job_id": str(job_id)})


def publish_job(
    session: Session, publisher: Publisher, job: Job, headers: dict[str, str] | None = None
) -> None:
    """Publish ``job``'s task and record when; PublishError leaves the row for the reaper."""
    publisher.publish(job.kind, str(job.id), headers=headers)
    # RETURNING with populate_existing refreshes ``job`` itself: no SELECT after the commit.
    with autocommit(session):
        session.scalars(_PUBLISHED, {"job_id": job.id}, execution_options=_REFRESH).one()


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    """The job, or None when unknown or (with ``owner``) someone else's."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def cancel(session: Session, publisher: Publisher, job: Job) -> Job:
    """Cancel: PENDING → REVOKED now; running → stops at its next checkpoint."""
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state.in_([JobState.PENDING, JobState.RETRY]))
        .values(
            state=JobState.REVOKED.value,
            cancel_requested=True,
            finished_at=func.clock_timestamp(),
            error={"code": "cancelled", "message": "cancelled before it started"},
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    if result is None:
        flagged = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.in_([JobState.STARTED, JobState.PROGRESS]))
            .values(cancel_requested=True)
            .returning(Job.id)
        ).scalar_one_or_none()
        if flagged is None:
            session.rollback()
            raise JobFinished(f"job {job.id} already finished")
    session.commit()
    publisher.revoke(str(job.id))
    session.refresh(job)
    return job


# --- worker side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    job_id: uuid.UUID
    token: int
    holder: str
    attempt: int
    job: JobRecord = field(compare=False, repr=False)


def acquire_lease(
    session: Session,
    job_id: uuid.UUID,
    holder: str,
    ttl_s: int,
    dead_holders: Collection[str] = (),
) -> Lease | None:
    """Take the job if it is active and nobody holds a live lease; None means back off.

    ``dead_holders`` names holders known to be dead (a killed process on this host), whose
    lease need not run out first. The attempt count rises with every acquisition, so a job
    whose workers keep dying (redelivered by ``task_reject_on_worker_lost``) ends with
    ``worker_lost`` after ``max_attempts`` instead of looping.
    """
    with autocommit(session):
        row = _ACQUIRE_ON_DRIVER.first(
            session,
            {
                "job_id": job_id,
                "dead_holders": list(dead_holders),
                "holder": holder,
                "ttl": timedelta(seconds=ttl_s),
            },
        )
    if row is None:
        return None
    job = JobRecord(*row)
    attempts, max_attempts = job.attempts, job.max_attempts
    lease = Lease(job_id=job_id, token=job.lease_token, holder=holder, attempt=attempts, job=job)
    if attempts > max_attempts:
        finish(
            session,
            lease,
            JobState.FAILURE,
            error={
                "code": "worker_lost",
                "message": f"gave up after {max_attempts} attempts whose workers died",
            },
        )
        return None
    return lease


def progress_payload(
    done: int, total: int | None, started_at: datetime | None, message: str = ""
) -> dict[str, Any]:
    """``done``, ``total``, ``percent``, ``eta_seconds`` and ``message`` for the API."""
    percent = None
    eta = None
    if total:
        percent = round(min(100.0, 100.0 * done / total), 1)
        if started_at is not None and done > 0:
            elapsed = (datetime.now(UTC) - started_at).total_seconds()
            eta = max(0.0, round(elapsed * (total - done) / done, 1))
            if not math.isfinite(eta):
                eta = None
    return {
        "done": done,
        "total": total,
        "percent": percent,
        "eta_seconds": eta,
        "message": message,
    }


def renew_lease_sql(progress: str = "%(progress)s", source: str = "", join: str = "") -> str:
    """``checkpoint``'s rule as SQL, for writers on a raw connection that fold it into
    their own statement: renew only while the fencing token and holder are still ours.

    ``progress`` is an SQL expression for the new progress (default: a bound parameter),
    ``source`` an optional FROM list it may refer to and ``join`` the condition tying it.
    Parameters: job, token, holder, ttl (seconds). Returns ``cancel_requested``.
    """
    return f"""
    UPDATE jobs SET lease_expires_at = clock_timestamp() + make_interval(secs => %(ttl)s),
        heartbeat_at = clock_timestamp(), progress = {progress}, state = 'PROGRESS',
        updated_at = clock_timestamp()
    {"FROM " + source if source else ""}
    WHERE jobs.id = %(job)s AND jobs.lease_token = %(token)s
        AND jobs.locked_by = %(holder)s {"AND " + join if join else ""}
    RETURNING jobs.cancel_requested
"""  # noqa: S608 - callers pass constant SQL; values are bound parameters


def raise_for_lease(lease: Lease, row: Any) -> None:
    """Judge the row a lease renewal returned: LeaseLost if none, JobCancelled if asked."""
    if row is None:
        raise LeaseLost(f"job {lease.job_id}: lease {lease.token} is no longer current")
    if row[0]:
        raise JobCancelled(f"job {lease.job_id} was cancelled")


def checkpoint(
    session: Session,
    lease: Lease,
    ttl_s: int,
    progress: dict[str, Any] | None = None,
    *,
    commit: bool = True,
) -> None:
    """Renew the lease and record progress in the caller's transaction.

    Raises LeaseLost when another delivery holds the job now, JobCancelled when a cancel
    was requested. With ``commit=False`` the caller commits, so a chunk of work and its
    checkpoint land in one transaction.
    """
    values: dict[str, Any] = {
        "lease_expires_at": func.clock_timestamp() + timedelta(seconds=ttl_s),
        "heartbeat_at": func.clock_timestamp(),
    }
    if progress is not None:
        values["progress"] = progress
        values["state"] = JobState.PROGRESS.value
    row = session.execute(
        update(Job)
        .where(
            Job.id == lease.job_id, Job.lease_token == lease.token, Job.locked_by == lease.holder
        )
        .values(**values)
        .returning(Job.cancel_requested)
    ).one_or_none()
    try:
        raise_for_lease(lease, row)
    except JobError:
        session.rollback()
        raise
    if commit:
        session.commit()


def yield_lease(session: Session, lease: Lease) -> bool:
    """Give the job up cleanly so a continuation can take it at once.

    The continuation's acquisition must not count as a new attempt (attempts count worker
    deaths), so the attempt this slice used is given back. Should the continuation's
    publish fail, the lease still lapses shortly and the reaper republishes the job.
    """
    row = session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token)
        .values(
            locked_by=None,
            lease_expires_at=func.clock_timestamp() + timedelta(seconds=5),
            attempts=Job.attempts - 1,
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    session.commit()
    return row is not None


def park(session: Session, lease: Lease, progress: dict[str, Any]) -> None:
    """Give the job back as PENDING with ``progress`` saying what it waits for; the caller
    then raises JobWaiting. Commits with whatever the caller wrote, or LeaseLost.

    Waiting is not an attempt (attempts count worker deaths), and ``published_at`` restarts
    the reaper's clock: should the wake-up message be lost, the reaper republishes the job
    after ``pending_republish_after_s`` and it looks again.
    """
    row = session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token)
        .values(
            state=JobState.PENDING.value,
            progress=progress,
            locked_by=None,
            lease_expires_at=None,
            attempts=Job.attempts - 1,
            published_at=func.clock_timestamp(),
        )
        .returning(Job.id)
    ).scalar_one_or_none()
    if row is None:
        session.rollback()
        raise LeaseLost(f"job {lease.job_id}: lease {lease.token} is no longer current")
    session.commit()


def finish(
    session: Session,
    lease: Lease,
    state: JobState,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """End the job if the lease is still ours; returns False when it was lost."""
    assert state in FINISHED_STATES
    with autocommit(session):
        row = _FINISH_ON_DRIVER.first(
            session,
            {
                "job_id": lease.job_id,
                "token": lease.token,
                "state": state.value,
                "result": result,
                "error": error,
            },
        )
    return row is not None


def reap_stale_jobs(
    session: Session,
    publisher: Publisher,
    *,
    republish_after_s: float,
    limit: int = 500,
) -> dict[str, int]:
    """Republish lost work; returns counts of what it did.

    * PENDING/RETRY jobs never published, or published longer ago than
      ``republish_after_s`` and not started although their queue is empty (Redis
      flushed or restarted without persistence: the message is lost).
    * Running jobs whose lease expired (worker killed): back to RETRY and republished,
      or FAILURE ``worker_lost`` when their attempts are used up.

    A duplicate message is harmless: the lease lets only one delivery run the job.
    """
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=republish_after_s)
    exhausted = session.execute(
        update(Job)
        .where(
            Job.state.in_([JobState.STARTED.value, JobState.PROGRESS.value]),
            Job.lease_expires_at < func.clock_timestamp(),
            Job.attempts >= Job.max_attempts,
        )
        .values(
            state=JobState.FAILURE.value,
            finished_at=func.clock_timestamp(),
            locked_by=None,
            error={"code": "worker_lost", "message": "the worker running this job stopped"},
        )
        .returning(Job.id)
    ).all()
    cancelled = session.execute(
        update(Job)
        .where(
            Job.state.in_([JobState.STARTED.value, JobState.PROGRESS.value]),
            Job.lease_expires_at < func.clock_timestamp(),
            Job.cancel_requested.is_(True),
        )
        .values(
            state=JobState.REVOKED.value,
            finished_at=func.clock_timestamp(),
            locked_by=None,
            error={"code": "cancelled", "message": "cancelled; its worker had stopped"},
        )
        .returning(Job.id)
    ).all()
    session.commit()
    candidates = list(
        session.scalars(
            select(Job)
            .where(
                or_(
                    and_(
                        Job.state.in_([JobState.PENDING.value, JobState.RETRY.value]),
                        Job.cancel_requested.is_(False),
                        or_(Job.published_at.is_(None), Job.published_at < cutoff),
                    ),
                    and_(
                        Job.state.in_([JobState.STARTED.value, JobState.PROGRESS.value]),
                        Job.lease_expires_at < func.clock_timestamp(),
                    ),
                )
            )
            .order_by(Job.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    republished = 0
    backlog: dict[str, int] = {}
    for job in candidates:
        never_published = job.published_at is None
        if job.state in (JobState.PENDING, JobState.RETRY) and not never_published:
            # Published but not started. While its queue still holds messages, it is most
            # likely waiting its turn: a duplicate would only inflate the backlog. Once the
            # queue is empty and it still has not started, its message was lost.
            if job.queue not in backlog:
                backlog[job.queue] = publisher.queue_length(job.queue)
            if backlog[job.queue] > 0:
                continue
        if job.state in (JobState.STARTED, JobState.PROGRESS):
            job.state = JobState.RETRY.value
            job.locked_by = None
        try:
            publisher.publish(job.kind, str(job.id))
        except PublishError:
            log.warning("reaper could not publish", extra={"job_id": str(job.id)})
            break
        job.published_at = now
        job.publish_count += 1
        republished += 1
    session.commit()
    return {"failed": len(exhausted), "cancelled": len(cancelled), "republished": republished}
