"""L1 hits of the catalog's GETs answered in front of Flask.

A cached GET spends most of its time in Flask itself: routing, the request context and
the before/after hooks cost ~0.13 ms of CPU per request (README "Load benchmark"), while
the answer is already bytes in process memory. This WSGI layer answers such a request
directly when everything it needs is in memory, and otherwise hands it to Flask
untouched. It does what the Flask path does for the same request:

* the bearer token is accepted only from the L1 token cache (``web.auth`` fills it; a
  revoke retires it everywhere before it answers), and must carry the view's scope;
* the body is served only while its L1 entry is live under the current generation
  (``Cache.peek``: the same rule as ``Cache.get``), so a write seen by Flask's path is
  seen here too;
* ``If-None-Match`` → 304 with the tag the client named; gzip as flask-compress chooses
  it, compressed once per body; ``ETag``, ``Cache-Control``, ``Vary``, ``X-Cache: l1``;
* ``X-Request-ID`` echoed or made up; the request's duration under its route in
  ``conveyor_http_request_duration_seconds``; L1/L3 hits and feature reads counted.

**Which entry a URL names** is learnt from Flask: ``web.catalog.cached_get`` leaves the
data class, key, route and scope in the WSGI environ, and this layer remembers them under
the exact path and query string once Flask answered 200 or 304. Only the view validates
and builds keys; a URL it rejected is never remembered. Nothing else is taken over: other
methods, ``HEAD``, ``Range``, a missing or uncached token, an expired entry all go to Flask.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache
from flask import Flask
from flask_compress.flask_compress import _choose_algorithm, _compress_data
from werkzeug.datastructures import ETags
from werkzeug.http import parse_etags

from shared import metrics
from shared.cache import TOKENS, Cache, Cached
from shared.models import TokenScope
from shared.tokens import Principal, hash_token
from web.request_ids import HEADER as REQUEST_ID_HEADER
from web.request_ids import request_id_for

# _choose_algorithm and _compress_data are flask-compress's own choice of encoding and its
# compressor, so both paths agree (private names: the version is pinned in pyproject.toml,
# and tests/web/test_fastpath.py compares the two paths' answers).
ENVIRON_KEY = "conveyor.cached_route"
# Conditions this layer does not evaluate; Flask (werkzeug) does.
_DEFER_HEADERS = ("HTTP_RANGE", "HTTP_IF_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_RANGE")
_ENCODINGS_REMEMBERED = 256

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class CachedRoute:
    """What a cached GET's view left for this layer (``web.catalog.cached_get``)."""

    name: str  # data class, shared.cache
    key: str
    rule: str  # the URL rule: the metrics' route label
    scope: TokenScope
    read_feature: int | None = None  # counted for the warm task's most-read list


@dataclass(frozen=True, slots=True)
class Config:
    """What the layer needs from the app; see ``init_fast_path``."""

    pepper: str
    cache_control: str
    compress_min_bytes: int
    algorithms: tuple[str, ...]
    compress: Callable[[bytes, str], bytes]
    metrics: bool


class FastPath:
    """WSGI middleware around ``app.wsgi_app`` (installed by ``init_fast_path``)."""

    def __init__(self, inner: WsgiApp, cache: Cache, config: Config, entries: int) -> None:
        self.inner = inner
        self.cache = cache
        self.config = config
        self._lock = threading.Lock()
        self._routes: LRUCache[tuple[str, str], CachedRoute] = LRUCache(entries)
        self._compressed: LRUCache[tuple[str, str], bytes] = LRUCache(entries)
        self._encodings: dict[str, str | None] = {}
        self.answered = 0  # requests this layer answered (tests, and people debugging)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        if environ.get("REQUEST_METHOD") == "GET":
            where = (environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
            with self._lock:
                route = self._routes.get(where)
            if route is not None:
                answer = self._answer(route, environ, start_response, started)
                if answer is not None:
                    return answer
            return self._learn(where, environ, start_response)
        return self.inner(environ, start_response)

    # --- learning ------------------------------------------------------------------------

    def _learn(
        self, where: tuple[str, str], environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        status_seen: list[str] = []

        def recording(status: str, headers: Any, exc_info: Any = None) -> Any:
            status_seen.append(status)
            return start_response(status, headers, exc_info)

        body = self.inner(environ, recording)
        route: CachedRoute | None = environ.get(ENVIRON_KEY)
        if route is not None and status_seen and status_seen[-1][:3] in ("200", "304"):
            with self._lock:
                self._routes[where] = route
        return body

    # --- answering -----------------------------------------------------------------------

    def _principal(self, environ: dict[str, Any]) -> Principal | None:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        principal: Principal | None = self.cache.peek(
            TOKENS, hash_token(self.config.pepper, token.strip())
        )
        return principal

    def _encoding(self, accept: str) -> str | None:
        if not accept:
            return None
        try:
            return self._encodings[accept]
        except KeyError:
            chosen = _choose_algorithm(self.config.algorithms, accept)
            if len(self._encodings) >= _ENCODINGS_REMEMBERED:
                self._encodings.clear()
            self._encodings[accept] = chosen
            return chosen

    def _answer(
        self,
        route: CachedRoute,
        environ: dict[str, Any],
        start_response: StartResponse,
        started: float,
    ) -> list[bytes] | None:
        if any(name in environ for name in _DEFER_HEADERS):
            return None
        principal = self._principal(environ)
        if principal is None or not principal.allows(route.scope):
            return None
        cached: Cached | None = self.cache.peek(route.name, route.key)
        if cached is None:
            return None
        config = self.config
        encoding = self._encoding(environ.get("HTTP_ACCEPT_ENCODING", ""))
        if encoding is not None and len(cached.body) < config.compress_min_bytes:
            encoding = None
        etag = cached.etag if encoding is None else f'{cached.etag[:-1]}:{encoding}"'
        conditional = environ.get("HTTP_IF_NONE_MATCH")
        matched = matching_tag(parse_etags(conditional), cached.etag) if conditional else None
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
        if matched is not None:
            status, body = "304 NOT MODIFIED", b""
            headers = [("ETag", matched)]
        else:
            status, body = "200 OK", cached.body
            headers = [("Content-Type", "application/json")]
            if encoding is not None:
                body = self._compress(cached, encoding)
                headers.append(("Content-Encoding", encoding))
            headers += [("Content-Length", str(len(body))), ("ETag", etag)]
        headers += [
            ("Cache-Control", config.cache_control),
            ("X-Cache", "l1"),
            ("Vary", "Accept-Encoding"),
            (REQUEST_ID_HEADER, request_id),
        ]
        start_response(status, headers)
        with self._lock:
            self.answered += 1
        # Counted as the Flask path counts them: the token's and the body's L1 hits.
        self.cache.count("l1", "hit", 2)
        self.cache.count("l3", "miss" if matched is None else "hit")
        if route.read_feature is not None:
            self.cache.count_read(route.read_feature)
        if config.metrics:
            metrics.observe_request(
                "GET", route.rule, int(status[:3]), time.perf_counter() - started
            )
        return [body]

    def _compress(self, cached: Cached, encoding: str) -> bytes:
        with self._lock:
            body = self._compressed.get((cached.etag, encoding))
        if body is None:
            body = self.config.compress(cached.body, encoding)
            with self._lock:
                self._compressed[(cached.etag, encoding)] = body
        return body


def matching_tag(tags: ETags, etag: str) -> str | None:
    """The tag of ``If-None-Match`` that names ``etag``, if any.

    Compressed responses carry ``"<tag>:gzip"`` (flask-compress keeps strong validators
    distinct per encoding), so a suffix after ``:`` still names the same body.
    """
    if tags.star_tag:
        return etag
    bare = etag.strip('"')
    for tag in tags.as_set(include_weak=True):
        if tag.split(":", 1)[0] == bare:
            return f'"{tag}"'
    return None


def init_fast_path(
    app: Flask,
    cache: Cache,
    pepper: str,
    cache_control: str,
    *,
    metrics_enabled: bool,
    entries: int,
) -> None:
    """Put the layer in front of ``app.wsgi_app`` (``web.create_app``, after compression
    is configured: its settings are read here)."""

    def compress(data: bytes, algorithm: str) -> bytes:
        return _compress_data(app, data, algorithm)

    config = Config(
        pepper=pepper,
        cache_control=cache_control,
        compress_min_bytes=app.config["COMPRESS_MIN_SIZE"],
        algorithms=tuple(app.config["COMPRESS_ALGORITHM"]),
        compress=compress,
        metrics=metrics_enabled,
    )
    app.wsgi_app = FastPath(app.wsgi_app, cache, config, entries)  # type: ignore[method-assign]
