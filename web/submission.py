"""Creating a job over HTTP: the one path every job-creating endpoint answers through.

``submit_and_respond`` records the job, commits, publishes (``shared.jobs.submit``) and
answers:

* 202 Accepted with the job and ``Location`` when the job is new;
* 200 OK with the same job and ``Location`` when an ``Idempotency-Key`` the caller used
  before comes back with the same request (a replay, also under concurrency: one row);
* 422 when that key was used with a different request, or is empty or too long;
* 503 with ``Retry-After`` and ``job_id`` when the broker refused the message. The row
  stays PENDING and the reaper publishes it; retrying with the same key is safe.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Response, jsonify, request

from shared import jobs
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


def _idempotency_key() -> str | None:
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


def submit_and_respond(kind: str, params: dict[str, Any]) -> Response:
    """Submit a ``kind`` job with validated ``params`` for the caller and answer for it."""
    principal = current_principal()
    ext = conveyor()
    key = _idempotency_key()
    try:
        submitted = jobs.submit(
            db_session(),
            ext.publisher,
            kind,
            params,
            owner=principal.token_id,
            idempotency_key=key,
            max_attempts=ext.settings.job_max_attempts,
            headers={"request_id": current_request_id()},
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
    job = submitted.job
    log.info(
        "job submitted",
        extra={"job_id": str(job.id), "kind": kind, "replay": not submitted.created},
    )
    response = jsonify(job_body(job))
    response.status_code = 202 if submitted.created else 200
    response.headers["Location"] = job_url(job.id)
    return response
