"""Creating a job over HTTP: the one path every job-creating endpoint answers through.

``submit_and_respond`` records the job, commits, publishes (``shared.jobs.submit``) and
answers:

* 202 Accepted with the job and ``Location`` when the job is new;
* 200 OK with the same job and ``Location`` when an ``Idempotency-Key`` the caller used
  before comes back with the same request (a replay, also under concurrency: one row);
* 422 when that key was used with a different request, or is empty or too long;
* 503 with ``Retry-After`` and ``job_id`` when the broker refused the message. The row
  stays PENDING and the reaper publishes it; retrying with the same key is safe.

A job that owns rows written before the submit (an import's uploaded file) passes two
callbacks: ``on_insert(session, job_id)`` writes the job's own rows in the inserting
transaction, and ``on_discard(session)`` removes what the request stored whenever it did
not create the job (a replay, a reused key, any error before the insert). ``submit``
commits before it knows whether the key was new, so the discard runs after that commit.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy.orm import Session

from shared import jobs
from shared.jobs import JobRecord
from shared.queue import PublishError
from web.auth import current_principal
from web.errors import ServiceUnavailable, Unprocessable
from web.extension import conveyor, db_session
from web.jobs import job_body, job_url
from web.request_ids import current_request_id

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255  # the column's width
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
PUBLISH_RETRY_AFTER_S = 5


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header, validated (422 when empty, long or not ASCII)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key.strip():
        raise Unprocessable.field(IDEMPOTENCY_HEADER, "must not be empty")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise Unprocessable.field(
            IDEMPOTENCY_HEADER, f"must be at most {MAX_IDEMPOTENCY_KEY} characters"
        )
    if not _PRINTABLE_ASCII.fullmatch(key):
        raise Unprocessable.field(IDEMPOTENCY_HEADER, "must be printable ASCII")
    return key


def submit_and_respond(
    kind: str,
    params: dict[str, Any],
    *,
    on_insert: Callable[[Session, uuid.UUID], None] | None = None,
    on_discard: Callable[[Session], None] | None = None,
    describe: Callable[[JobRecord], dict[str, Any]] = job_body,
) -> Response:
    """Submit a ``kind`` job with validated ``params`` for the caller and answer for it.

    ``describe`` renders the job for the answer (default: ``job_body``).
    """
    principal = current_principal()
    ext = conveyor()
    session = db_session()
    inserted = False

    def insert_hook(hook_session: Session, job_id: uuid.UUID) -> None:
        nonlocal inserted
        inserted = True
        if on_insert is not None:
            on_insert(hook_session, job_id)

    try:
        key = idempotency_key()
        submitted = jobs.submit(
            session,
            ext.publisher,
            kind,
            params,
            owner=principal.token_id,
            idempotency_key=key,
            max_attempts=ext.settings.job_max_attempts,
            headers={"request_id": current_request_id()},
            # Without a hook the insert commits on its own (jobs.submit).
            on_insert=insert_hook if on_insert or on_discard else None,
        )
    except jobs.IdempotencyMismatch as exc:
        raise Unprocessable.field(
            IDEMPOTENCY_HEADER, str(exc), problem="idempotency-key-reused"
        ) from None
    except PublishError as exc:
        log.warning("job recorded but not queued", extra={"job_id": exc.job_id, "kind": kind})
        extras: dict[str, Any] = {}
        if exc.job_id:
            extras = {"job_id": exc.job_id, "links": {"job": job_url(exc.job_id)}}
        raise ServiceUnavailable(
            "the job was recorded but the queue is unavailable; it will be queued when the "
            "queue is back (retrying with the same Idempotency-Key is safe)",
            retry_after_s=PUBLISH_RETRY_AFTER_S,
            problem="queue-unavailable",
            **extras,
        ) from exc
    finally:
        # Not inserted by this request: whatever it stored for the job belongs to no job.
        # (Inserted but not committed needs nothing: the rollback at teardown drops it.)
        if not inserted and on_discard is not None:
            on_discard(session)
    job = submitted.job
    log.info(
        "job submitted",
        extra={"job_id": str(job.id), "kind": kind, "replay": not submitted.created},
    )
    response = jsonify(describe(job))
    response.status_code = 202 if submitted.created else 200
    response.headers["Location"] = job_url(job.id)
    return response
