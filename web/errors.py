"""Every error answers ``application/problem+json`` (RFC 9457); this module is the one map.

A view raises an ``ApiError`` subclass: the status lives on the class, the instance carries
the detail and any extension members (``errors`` for 422, ``job_id`` where one exists).
werkzeug's own exceptions (unknown route, wrong method) keep their headers, such as
``Allow``. A database that cannot be reached, or a broker that refuses a message, is a
503 with ``Retry-After``. Anything else is a bug: logged with its traceback and answered
500 without one, except under test, where it is re-raised so the test fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Flask, Response, current_app
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from shared.queue import PublishError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Problem types are URNs: stable identifiers a client can switch on, never dereferenced.
PROBLEM_TYPE_PREFIX = "urn:conveyor:problem:"
DB_RETRY_AFTER_S = 5


class ApiError(Exception):
    """An error with an HTTP status, rendered as a problem document."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        problem: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extras: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.problem = problem  # a slug for ``type``; None means about:blank
        self.headers = dict(headers or {})
        self.extras = extras


class BadRequest(ApiError):
    status = 400
    title = "Bad Request"


class Unauthorized(ApiError):
    """401 with the Bearer challenge; ``invalid_token`` when a token was presented."""

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str, *, invalid_token: bool = False) -> None:
        challenge = 'Bearer realm="conveyor"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(ApiError):
    status = 403
    title = "Forbidden"


class NotFound(ApiError):
    status = 404
    title = "Not Found"


class Conflict(ApiError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(ApiError):
    status = 413
    title = "Content Too Large"


class UnsupportedMediaType(ApiError):
    status = 415
    title = "Unsupported Media Type"


class Unprocessable(ApiError):
    """422 with one ``{"field", "message"}`` entry per offending field."""

    status = 422
    title = "Unprocessable Content"

    def __init__(
        self,
        errors: list[dict[str, str]],
        detail: str = "the request failed validation",
        *,
        problem: str = "validation-failed",
    ) -> None:
        super().__init__(detail, problem=problem, errors=errors)

    @classmethod
    def field(
        cls, field: str, message: str, *, problem: str = "validation-failed"
    ) -> Unprocessable:
        """A 422 about a single field."""
        return cls([{"field": field, "message": message}], f"{field}: {message}", problem=problem)


class ServiceUnavailable(ApiError):
    """503 with ``Retry-After``: a dependency is down, the client should try again."""

    status = 503
    title = "Service Unavailable"

    def __init__(
        self, detail: str, *, retry_after_s: int = 5, problem: str | None = None, **extras: Any
    ) -> None:
        super().__init__(
            detail, problem=problem, headers={"Retry-After": str(retry_after_s)}, **extras
        )


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    problem: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extras: Any,
) -> Response:
    """A problem+json response; extension members go beside the standard ones."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + problem if problem else "about:blank",
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update(extras)
    response = Response(json.dumps(body, default=str), status=status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    return response


def _api_error(error: ApiError) -> Response:
    return problem_response(
        error.status,
        error.title,
        error.detail,
        problem=error.problem,
        headers=error.headers,
        **error.extras,
    )


def _http_exception(error: HTTPException) -> Response | HTTPException:
    if error.response is not None or error.code is None or error.code < 400:
        # Redirects (a missing trailing slash) and prebuilt responses pass through as is.
        return error
    # Keep werkzeug's headers (Allow on 405, Retry-After when set) but not its HTML type.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem_response(error.code, error.name, error.description, headers=headers)


def _database_error(error: sa_exc.DBAPIError | sa_exc.TimeoutError) -> Response:
    connection_trouble = isinstance(
        error, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError
    ) or (isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated)
    if not connection_trouble:
        # An integrity or data error is a bug in how we wrote the query, not an outage.
        return _unexpected(error)
    log.warning("database unavailable", exc_info=error)
    return problem_response(
        503,
        ServiceUnavailable.title,
        "the database is unavailable; try again shortly",
        problem="database-unavailable",
        headers={"Retry-After": str(DB_RETRY_AFTER_S)},
    )


def _publish_error(error: PublishError) -> Response:
    # Normally answered by web.submission, which knows the job; this is the safety net.
    log.warning("broker refused a message", exc_info=error)
    extras = {"job_id": error.job_id} if error.job_id else {}
    return problem_response(
        503,
        ServiceUnavailable.title,
        "the message broker is unavailable; try again shortly",
        problem="broker-unavailable",
        headers={"Retry-After": "5"},
        **extras,
    )


def _unexpected(error: Exception) -> Response:
    if current_app.testing:
        raise error
    log.error("unhandled error", exc_info=error)
    return problem_response(500, ApiError.title, "an unexpected error occurred")


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; Flask picks the most specific class for each exception."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(sa_exc.DBAPIError, _database_error)
    app.register_error_handler(sa_exc.TimeoutError, _database_error)
    app.register_error_handler(PublishError, _publish_error)
    app.register_error_handler(Exception, _unexpected)
