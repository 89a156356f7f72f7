"""The L1 fast path (web/fastpath.py): answers exactly what Flask answers, counts and
times what it answers, and hands Flask everything it cannot answer from memory."""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import generate_latest
from werkzeug.test import TestResponse

from shared import metrics
from shared.db import Database
from shared.settings import Settings
from tests.web.catalog_helpers import clear_cache, create_feature, create_test_case
from tests.web.conftest import Tokens, build_app, close_app, problem
from tests.web.test_metrics import parse, value
from web.fastpath import FastPath

# Headers that differ between any two responses whoever answers them.
VARYING = {"X-Request-ID", "Date"}


@pytest.fixture(autouse=True)
def _fresh_cache(redis_url: str) -> None:
    clear_cache(redis_url)


@pytest.fixture
def flask_only(settings: Settings, committed_db: Database) -> Iterator[Flask]:
    """The same app without the fast path: every answer from Flask's views."""
    app = build_app(settings.model_copy(update={"cache_fast_path": False}))
    assert not isinstance(app.wsgi_app, FastPath)
    yield app
    close_app(app)


def fast_path(app: Flask) -> FastPath:
    layer = app.wsgi_app
    assert isinstance(layer, FastPath)
    return layer


def comparable(response: TestResponse) -> tuple[int, Any, dict[str, str]]:
    body = response.data
    if response.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    headers = {k: v for k, v in response.headers.items() if k not in VARYING}
    if response.headers.get("Content-Encoding") == "gzip":
        headers.pop("Content-Length")  # gzip output carries a timestamp; compare the body
    return response.status_code, body, headers


def test_answers_l1_hits_exactly_as_flask_does(
    app: Flask, client: FlaskClient, flask_only: Flask, tokens: Tokens
) -> None:
    for i in range(21):
        feature = create_feature(client, tokens, description=f"feature number {i} " * 5)
    case = create_test_case(client, tokens, feature["id"])
    urls = [
        "/api/v1/features?page=1&page_size=20",  # > 1000 bytes: gzip applies
        "/api/v1/features?page=2&page_size=20&status=planned",
        f"/api/v1/features/{feature['id']}",
        f"/api/v1/features/{feature['id']}/test-cases",
        "/api/v1/test-cases",
        f"/api/v1/test-cases/{case['id']}",
    ]
    other = flask_only.test_client()
    layer = fast_path(app)
    for url in urls:
        reference = other.get(url, headers=tokens.read.headers)
        assert reference.status_code == 200
        etag = reference.headers["ETag"]
        variants: list[dict[str, str]] = [
            {},
            {"Accept-Encoding": "gzip, deflate"},
            {"Accept-Encoding": "br;q=1.0, gzip;q=0.5"},
            {"Accept-Encoding": "gzip;q=0"},
            {"If-None-Match": etag},
            {"If-None-Match": f"W/{etag}"},
            {"If-None-Match": f'"other", {etag[:-1]}:gzip"', "Accept-Encoding": "gzip"},
            {"If-None-Match": "*"},
            {"If-None-Match": '"other"'},
            {"X-Request-ID": "trace-me-42"},
            {"X-Request-ID": "not acceptable!"},
        ]
        for extra in variants:
            headers = {**tokens.read.headers, **extra}
            client.get(url, headers=headers)  # fills L1 and teaches the layer this URL
            expected = other.get(url, headers=headers)
            assert expected.headers["X-Cache"] == "l1"
            before = layer.answered
            got = client.get(url, headers=headers)
            assert layer.answered == before + 1, (url, extra)
            assert comparable(got) == comparable(expected), (url, extra)
            if "X-Request-ID" in extra and extra["X-Request-ID"] == "trace-me-42":
                assert got.headers["X-Request-ID"] == "trace-me-42"
            else:
                assert len(got.headers["X-Request-ID"]) == 32


def test_counts_times_and_records_reads_like_flask(
    app: Flask, client: FlaskClient, tokens: Tokens
) -> None:
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    ext = app.extensions["conveyor"]
    client.get(url, headers=tokens.read.headers)  # db, learnt
    route = "/api/v1/features/<int:feature_id>"

    def observed() -> float:
        samples = parse(generate_latest(metrics.process_registry()).decode())
        return value(
            samples, "conveyor_http_request_duration_seconds_count", route=route, status="200"
        )

    timed, counts = observed(), Counter(ext.cache.stats())
    reads_before = ext.cache._reads[feature["id"]]
    for _ in range(5):
        assert client.get(url, headers=tokens.read.headers).status_code == 200
    assert fast_path(app).answered == 5
    assert observed() == timed + 5
    after = Counter(ext.cache.stats())
    assert after["l1_hit"] - counts["l1_hit"] == 10  # the token's hit and the body's, each
    assert after["l3_miss"] - counts["l3_miss"] == 5
    assert after["l1_miss"] == counts["l1_miss"]
    assert ext.cache._reads[feature["id"]] - reads_before == 5  # the warm task's most-read


def test_hands_flask_what_it_cannot_answer(app: Flask, client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    layer = fast_path(app)
    for _ in range(2):
        client.get(url, headers=tokens.read.headers)
    assert layer.answered == 1
    # No token, an unknown one, a malformed header: Flask's 401s, not a cached body.
    problem(client.get(url), 401)
    problem(client.get(url, headers={"Authorization": "Bearer nonsense"}), 401)
    problem(client.get(url, headers={"Authorization": f"Basic {tokens.read.plain}"}), 401)
    # Conditions and methods it leaves to werkzeug.
    ranged = client.get(url, headers={**tokens.read.headers, "Range": "bytes=0-9"})
    assert ranged.status_code in (200, 206)
    assert client.head(url, headers=tokens.read.headers).status_code == 200
    assert layer.answered == 1
    # A write: the old entry is of an old generation, so Flask loads the new state once...
    patched = client.patch(url, json={"name": "renamed"}, headers=tokens.write.headers)
    assert patched.status_code == 200
    fresh = client.get(url, headers=tokens.read.headers)
    assert fresh.headers["X-Cache"] in ("l2", "db")
    assert fresh.get_json()["name"] == "renamed"
    assert layer.answered == 1
    # ...and the layer answers the new body afterwards.
    again = client.get(url, headers=tokens.read.headers)
    assert again.get_json()["name"] == "renamed"
    assert layer.answered == 2
    # A URL Flask rejected is never learnt.
    for _ in range(2):
        problem(client.get("/api/v1/features?page_size=0", headers=tokens.read.headers), 422)
    assert layer.answered == 2
