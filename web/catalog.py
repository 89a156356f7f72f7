"""What the features and test-cases views share: cached GETs with ETags, cache-aware
writes, compression, and the mapping of constraint violations to 404/409.

GETs answer ``Cache-Control: private, no-cache`` with a strong ``ETag``: a client (or its
proxy cache) keeps the body but asks every time, and ``If-None-Match`` gets 304 when
nothing changed. ``no-cache`` rather than a ``max-age``: a read right after a write must
see it, which no freshness lifetime allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import redis
from flask import Flask, Response, request
from flask_compress import Compress
from pydantic import BaseModel, Field, StrictInt, StringConstraints
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from shared.cache import Cache, Cached, serialize
from shared.db import autocommit
from shared.models import TestCaseStatus
from shared.settings import Settings
from web.auth import required_scope
from web.errors import ApiError, Conflict, ServiceUnavailable
from web.extension import conveyor
from web.fastpath import ENVIRON_KEY, CachedRoute, matching_tag
from web.jobs import MAX_PAGE, MAX_PAGE_SIZE

CACHE_CONTROL = "private, no-cache"
# Codes of the PostgreSQL errors a write can meet from a client's input.
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
MAX_ID = 2**63 - 1  # bigint: a larger id in a URL is simply unknown (not a 500)

Page = Annotated[int, Field(ge=1, le=MAX_PAGE)]
PageSize = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)]


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Description = Annotated[str, StringConstraints(max_length=65_536)]
Points = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


class PageQuery(BaseModel):
    page: Page = 1
    page_size: PageSize = 20


class TestCaseListQuery(PageQuery):
    __test__ = False  # not a pytest test class

    status: TestCaseStatus | None = None


def not_null(value: Any) -> Any:
    """A field that may be left out of a PATCH but not set to null."""
    if value is None:
        raise ValueError("may not be null")
    return value


def init_compression(app: Flask, settings: Settings) -> None:
    """gzip every response of at least ``compress_min_bytes`` when the client accepts it.

    Only gzip: every client has it, and at level 6 it costs little next to Flask itself.
    Streamed responses (the import error CSV) are left exactly as they were, without the
    ``Vary: Accept-Encoding`` that flask-compress adds to everything it looks at.
    """
    app.config.update(
        COMPRESS_ALGORITHM=["gzip"],
        COMPRESS_MIN_SIZE=settings.compress_min_bytes,
        COMPRESS_LEVEL=settings.compress_level,
        COMPRESS_STREAMS=False,
        COMPRESS_MIMETYPES=["application/json", "application/problem+json"],
        COMPRESS_REGISTER=False,
    )
    compress = Compress(app)

    @app.after_request
    def _compress(response: Response) -> Response:
        return response if response.is_streamed else compress.after_request(response)


def base_url() -> str:
    """The prefix of links in bodies: ``public_url`` or nothing (paths)."""
    return (conveyor().settings.public_url or "").rstrip("/")


def cache() -> Cache:
    return conveyor().cache


def conditional(cached: Cached, layer: str) -> Response:
    """200 with the body, or 304 when the client already holds it (L3).

    ``X-Cache`` says which layer answered (``l1``, ``l2``, or ``db``): for people and
    tests watching the caches work.
    """
    matched = matching_tag(request.if_none_match, cached.etag) if request.if_none_match else None
    if matched is not None:
        cache().count("l3", "hit")
        response = Response(status=304)
        response.headers["ETag"] = matched
    else:
        cache().count("l3", "miss")
        response = Response(cached.body, mimetype="application/json")
        response.headers["ETag"] = cached.etag
    response.headers["Cache-Control"] = CACHE_CONTROL
    response.headers["X-Cache"] = layer
    return response


def cached_get(
    name: str,
    key: str,
    ttl_s: int,
    load: Callable[[], dict[str, Any]],
    *,
    read_feature: int | None = None,
) -> Response:
    """A GET answered through L1, L2 and L3; ``load`` builds the body from the database.

    ``read_feature`` counts a read of that feature (the warm task's most-read list). The
    route is left in the WSGI environ, so ``web.fastpath`` answers the next L1 hit of
    this URL without Flask.
    """
    if read_feature is not None:
        cache().count_read(read_feature)
    rule = request.url_rule
    request.environ[ENVIRON_KEY] = CachedRoute(
        name, key, rule.rule if rule else request.path, required_scope(), read_feature
    )
    return conditional(*cache().get(name, key, ttl_s, lambda: serialize(load())))


def written(body: dict[str, Any], status: int = 200, location: str | None = None) -> Response:
    """A write's answer: the new state, never stored by any cache."""
    response = Response(serialize(body), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    if location:
        response.headers["Location"] = location
    return response


def no_content() -> Response:
    """A delete's answer."""
    response = Response(status=204)
    response.headers["Cache-Control"] = "no-store"
    return response


@contextmanager
def writing(*classes: str) -> Iterator[None]:
    """Around a write's commit: the caches of ``classes`` forget it before the answer.

    Redis unreachable before the commit → 503 and nothing is written: a change that
    could not be invalidated would be served stale from Redis once it is back.
    """
    try:
        cache().before_write(classes)
    except redis.RedisError:
        raise ServiceUnavailable(
            "the cache is unavailable, so nothing was changed; try again shortly",
            problem="cache-unavailable",
        ) from None
    yield
    cache().after_write(classes)


@contextmanager
def integrity(session: Session, conflicts: dict[str, Callable[[], ApiError]]) -> Iterator[None]:
    """A constraint violation inside the block whose SQLSTATE is in ``conflicts`` becomes
    that error (after a rollback); anything else stays a bug."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        session.rollback()
        code = getattr(exc.orig, "pgcode", None)
        if code in conflicts:
            raise conflicts[code]() from None
        raise


def commit(session: Session, conflicts: dict[str, Callable[[], ApiError]]) -> None:
    """Commit, with ``integrity``'s mapping of constraint violations."""
    with integrity(session, conflicts):
        session.commit()


def insert(session: Session, row: object, conflicts: dict[str, Callable[[], ApiError]]) -> None:
    """Insert ``row`` in one statement that commits on its own, with ``integrity``'s mapping.

    One round trip where a transaction costs three (psycopg2's BEGIN and COMMIT), and no
    refresh after it: the INSERT's RETURNING brings back what the server filled in (id,
    created_at, updated_at).
    """
    with integrity(session, conflicts), autocommit(session):
        session.add(row)
        session.flush()


def external_id_taken(external_id: str | None) -> Callable[[], ApiError]:
    return lambda: Conflict(
        f"external_id {external_id!r} is already used",
        problem="external-id-taken",
        errors=[{"field": "external_id", "message": "already used"}],
    )
