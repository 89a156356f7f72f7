"""The three cache layers: hits per layer, invalidation by every write in every process
(two real gunicorn processes among them), TTLs per class, ETag/304, gzip, warming, a
dead Redis, and an import through a real worker."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from shared import cache
from shared.cache import Cache
from shared.db import Database
from shared.models import ApiToken, Feature
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.web.catalog_helpers import clear_cache, create_feature, create_test_case
from tests.web.conftest import WEB_SERVERS, Tokens, build_app, close_app, problem, run_web
from worker.cache_warming import warm_cache


@pytest.fixture(autouse=True)
def _fresh_cache(redis_url: str) -> None:
    clear_cache(redis_url)


@pytest.fixture
def rd(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def other_app(settings: Settings, committed_db: Database) -> Iterator[Flask]:
    """A second app: its own L1 and listener, as another web process has."""
    app = build_app(settings)
    yield app
    close_app(app)


def generation(rd: redis.Redis, name: str) -> int:
    return int(rd.hget(cache.GENERATIONS_KEY, name) or 0)  # type: ignore[arg-type]


def test_each_layer_answers_in_turn(
    client: FlaskClient, other_app: Flask, tokens: Tokens, rd: redis.Redis, app: Flask
) -> None:
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    first = client.get(url, headers=tokens.read.headers)
    assert first.headers["X-Cache"] == "db"
    key = f"feature:{feature['id']}:v{generation(rd, cache.FEATURE)}"
    assert rd.get(key) == first.data  # L2 holds the exact bytes
    assert client.get(url, headers=tokens.read.headers).headers["X-Cache"] == "l1"
    other = other_app.test_client().get(url, headers=tokens.read.headers)
    assert other.headers["X-Cache"] == "l2"
    assert other.data == first.data
    assert other.headers["ETag"] == first.headers["ETag"]

    counts = app.extensions["conveyor"].cache.stats()
    assert counts["l1_hit"] >= 1
    assert counts["l2_miss"] >= 1
    app.extensions["conveyor"].cache.flush()
    assert cache.read_stats(rd)["l1_hit"] >= 1


def test_every_write_is_seen_at_once_by_another_process(
    client: FlaskClient, other_app: Flask, tokens: Tokens
) -> None:
    """Through a second app (its own L1), each read answers the state after each write,
    although every read was cached in its L1, in L2 and by the client (ETag) before."""
    reader = other_app.test_client()
    feature = create_feature(client, tokens)
    case = create_test_case(client, tokens, feature["id"])
    fid, cid = feature["id"], case["id"]
    reads = [
        "/api/v1/features",
        f"/api/v1/features/{fid}",
        f"/api/v1/features/{fid}/test-cases",
        "/api/v1/test-cases",
        f"/api/v1/test-cases/{cid}",
    ]
    w = tokens.write.headers
    writes: list[tuple[str, Callable[[], Any]]] = [
        ("create feature", lambda: create_feature(client, tokens)),
        ("patch feature", lambda: client.patch(reads[1], json={"name": "renamed"}, headers=w)),
        ("create test case", lambda: create_test_case(client, tokens, fid)),
        ("patch test case", lambda: client.patch(reads[4], json={"status": "passed"}, headers=w)),
        ("delete test case", lambda: client.delete(reads[4], headers=w)),
        ("delete feature", lambda: client.delete(reads[1], headers=w)),
    ]

    def snapshot(c: FlaskClient) -> dict[str, tuple[int, bytes, str]]:
        out = {}
        for url in reads:
            r = c.get(url, headers=tokens.read.headers)
            out[url] = (r.status_code, r.data, r.headers.get("ETag", ""))
        return out

    for name, write in writes:
        before = snapshot(reader)
        assert snapshot(reader) == before
        served = {reader.get(u, headers=tokens.read.headers).headers.get("X-Cache") for u in reads}
        assert served <= {"l1", None}, name  # every 200 came from the reader's memory
        result = write()
        if hasattr(result, "status_code"):
            assert result.status_code in (200, 204), (name, result.get_data(as_text=True))
        seen = snapshot(reader)
        assert seen == snapshot(client), name  # the writer's process agrees
        assert seen != before, name
        for url, (status, body, etag) in before.items():
            if status == 200 and seen[url][0] == 200 and seen[url][1] != body:
                # L3: the client's old ETag no longer gets a 304.
                held = {**tokens.read.headers, "If-None-Match": etag}
                assert reader.get(url, headers=held).status_code == 200, (name, url)


@pytest.mark.parametrize("server", WEB_SERVERS)
def test_two_web_servers_see_each_others_writes(
    settings: Settings, tokens: Tokens, tmp_path: Path, server: str
) -> None:
    """A PATCH through one server is read back at once through the other, whose L1
    held the old value."""
    with (
        run_web(settings, tmp_path / "a.log", server, workers=1) as a,
        run_web(settings, tmp_path / "b.log", server, workers=1) as b,
    ):
        created = requests.post(
            f"{a}/api/v1/features",
            json={"name": "v0", "complexity_points": 1},
            headers=tokens.write.headers,
            timeout=10,
        )
        assert created.status_code == 201, created.text
        url = created.headers["Location"]
        served_from: set[str] = set()
        for i in range(1, 21):
            # B reads until its L1 answers (its listener subscribed, the entry is there).
            def cached_in_b() -> bool:
                r = requests.get(f"{b}{url}", headers=tokens.read.headers, timeout=10)
                served_from.add(r.headers["X-Cache"])
                return r.headers["X-Cache"] == "l1"

            wait_until(cached_in_b, timeout=30, interval=0.05)
            listed = requests.get(f"{b}/api/v1/features", headers=tokens.read.headers, timeout=10)
            assert listed.json()["items"][0]["name"] == f"v{i - 1}"
            patched = requests.patch(
                f"{a}{url}", json={"name": f"v{i}"}, headers=tokens.write.headers, timeout=10
            )
            assert patched.status_code == 200, patched.text
            seen = requests.get(f"{b}{url}", headers=tokens.read.headers, timeout=10)
            assert seen.json()["name"] == f"v{i}", f"round {i}: B answered from {seen.headers}"
            listed = requests.get(f"{b}/api/v1/features", headers=tokens.read.headers, timeout=10)
            assert listed.json()["items"][0]["name"] == f"v{i}"
        assert "l1" in served_from


def test_ttl_per_class(
    client: FlaskClient, tokens: Tokens, rd: redis.Redis, settings: Settings
) -> None:
    feature = create_feature(client, tokens)
    case = create_test_case(client, tokens, feature["id"])
    for url in (
        f"/api/v1/features/{feature['id']}",
        "/api/v1/features?status=planned",
        f"/api/v1/test-cases/{case['id']}",
        f"/api/v1/features/{feature['id']}/test-cases",
        "/api/v1/test-cases",
    ):
        assert client.get(url, headers=tokens.read.headers).status_code == 200
    g = {
        n: generation(rd, n)
        for n in (cache.FEATURE, cache.FEATURES_LIST, cache.TEST_CASE, cache.TEST_CASES_LIST)
    }
    items = [
        f"feature:{feature['id']}:v{g[cache.FEATURE]}",
        f"test_case:{case['id']}:v{g[cache.TEST_CASE]}",
    ]
    lists = [
        f"features:list:1:20:planned:v{g[cache.FEATURES_LIST]}",
        f"test_cases:list:{feature['id']}:1:20:all:v{g[cache.TEST_CASES_LIST]}",
        f"test_cases:list:all:1:20:all:v{g[cache.TEST_CASES_LIST]}",
    ]
    assert settings.cache_item_ttl_s == 3600
    assert settings.cache_list_ttl_s == 300
    for key in items:
        assert settings.cache_list_ttl_s < rd.ttl(key) <= settings.cache_item_ttl_s, key
    for key in lists:
        assert 0 < rd.ttl(key) <= settings.cache_list_ttl_s, key  # type: ignore[operator]


def test_etag_and_not_modified(client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    first = client.get(url, headers=tokens.read.headers)
    etag = first.headers["ETag"]
    assert etag.startswith('"')
    assert first.headers["Cache-Control"] == "private, no-cache"
    for held in (etag, f"W/{etag}", etag[:-1] + ':gzip"', f'"other", {etag}', "*"):
        again = client.get(url, headers={**tokens.read.headers, "If-None-Match": held})
        assert again.status_code == 304, held
        assert again.data == b""
    assert (
        client.get(url, headers={**tokens.read.headers, "If-None-Match": '"other"'}).status_code
        == 200
    )

    client.patch(url, json={"complexity_points": 8}, headers=tokens.write.headers)
    changed = client.get(url, headers={**tokens.read.headers, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.get_json()["complexity_points"] == 8
    assert changed.headers["ETag"] != etag


def test_gzip_by_accept_encoding_and_size(client: FlaskClient, tokens: Tokens) -> None:
    for i in range(20):
        create_feature(client, tokens, description=f"feature number {i} " * 5)
    plain = client.get("/api/v1/features", headers=tokens.read.headers)
    assert len(plain.data) > 1000
    assert "Content-Encoding" not in plain.headers

    zipped = client.get(
        "/api/v1/features", headers={**tokens.read.headers, "Accept-Encoding": "gzip"}
    )
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    assert len(zipped.data) < len(plain.data)
    assert json.loads(gzip.decompress(zipped.data)) == plain.get_json()
    assert zipped.headers["ETag"] == plain.headers["ETag"][:-1] + ':gzip"'
    held = {
        **tokens.read.headers,
        "Accept-Encoding": "gzip",
        "If-None-Match": zipped.headers["ETag"],
    }
    assert client.get("/api/v1/features", headers=held).status_code == 304

    brotli_only = client.get(
        "/api/v1/features", headers={**tokens.read.headers, "Accept-Encoding": "br"}
    )
    assert "Content-Encoding" not in brotli_only.headers  # gzip is the one algorithm offered

    small = client.get(
        "/api/v1/features?page_size=1", headers={**tokens.read.headers, "Accept-Encoding": "gzip"}
    )
    assert len(small.data) < 1000
    assert "Content-Encoding" not in small.headers


def test_revoked_token_is_refused_at_once(
    client: FlaskClient, tokens: Tokens, settings: Settings, committed_db: Database
) -> None:
    """Valid tokens are remembered in process; a revoke (as ``conveyor token revoke``
    does it) reaches every process before it returns."""
    assert client.get("/api/v1/features", headers=tokens.other.headers).status_code == 200
    assert client.get("/api/v1/features", headers=tokens.other.headers).status_code == 200
    with committed_db.session() as s:
        s.execute(
            update(ApiToken)
            .where(ApiToken.id == uuid.UUID(tokens.other.id))
            .values(revoked_at=func.now())
        )
        s.commit()
    revoker = Cache(settings)
    try:
        revoker.after_write([cache.TOKENS])
    finally:
        revoker.close()
    problem(client.get("/api/v1/features", headers=tokens.other.headers), 401)


def test_dead_redis_reads_from_database_and_refuses_writes(
    dead_redis_app: Flask, tokens: Tokens, committed_db: Database
) -> None:
    with committed_db.session() as s:
        s.add(Feature(name="kept", complexity_points=1))
        s.commit()
    c = dead_redis_app.test_client()
    listed = c.get("/api/v1/features", headers=tokens.read.headers)
    assert listed.status_code == 200
    assert listed.headers["X-Cache"] == "db"
    assert listed.get_json()["total"] == 1
    body = problem(
        c.post(
            "/api/v1/features",
            json={"name": "x", "complexity_points": 1},
            headers=tokens.write.headers,
        ),
        503,
    )
    assert body["type"].endswith("cache-unavailable")
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Feature)) == 1


def test_warming_fills_redis_with_the_most_read(
    client: FlaskClient,
    app: Flask,
    other_app: Flask,
    tokens: Tokens,
    rd: redis.Redis,
    settings: Settings,
    committed_db: Database,
) -> None:
    popular, read_once, unread = (create_feature(client, tokens)["id"] for _ in range(3))
    for feature_id, times in ((popular, 3), (read_once, 1)):
        for _ in range(times):
            client.get(f"/api/v1/features/{feature_id}", headers=tokens.read.headers)
    app.extensions["conveyor"].cache.flush()
    assert rd.zscore(cache.READS_KEY, str(popular)) == 3
    rd.delete(*rd.scan_iter(match="feature*"))  # only the reads remain

    with committed_db.session() as s:
        written = warm_cache(s, rd, settings)
    assert written == 3  # two features and the first list page
    gen = generation(rd, cache.FEATURE)
    for feature_id in (popular, read_once):
        key = f"feature:{feature_id}:v{gen}"
        assert 0 < rd.ttl(key) <= settings.cache_item_ttl_s  # type: ignore[operator]
    assert not rd.exists(f"feature:{unread}:v{gen}")
    assert rd.exists(f"features:list:1:20:all:v{generation(rd, cache.FEATURES_LIST)}")
    assert rd.zscore(cache.READS_KEY, str(popular)) == 1.5  # halved: recent reads count most

    # What the worker stored is byte for byte what web would have built.
    warmed = other_app.test_client().get(f"/api/v1/features/{popular}", headers=tokens.read.headers)
    assert warmed.headers["X-Cache"] == "l2"
    fresh = client.get(f"/api/v1/features/{popular}", headers=tokens.read.headers)
    assert warmed.data == fresh.data
    listed = other_app.test_client().get("/api/v1/features", headers=tokens.read.headers)
    assert listed.headers["X-Cache"] == "l2"


@pytest.mark.worker
def test_an_import_invalidates_cached_lists(
    client: FlaskClient, tokens: Tokens, worker: WorkerProcess
) -> None:
    create_feature(client, tokens, external_id="E-0", name="before")
    url = "/api/v1/features?page_size=5"
    assert client.get(url, headers=tokens.read.headers).get_json()["total"] == 1
    assert client.get(url, headers=tokens.read.headers).headers["X-Cache"] == "l1"
    rows = "\n".join(f"E-{i},Imported {i},planned,{i % 5}" for i in range(50))
    posted = client.post(
        "/api/v1/imports?target=features",
        data=f"external_id,name,status,complexity_points\n{rows}\n".encode(),
        headers={**tokens.write.headers, "Content-Type": "text/csv"},
    )
    assert posted.status_code == 202, posted.get_data(as_text=True)
    job_url = f"/api/v1/jobs/{posted.get_json()['id']}"

    def finished() -> str | None:
        state: str = client.get(job_url, headers=tokens.write.headers).get_json()["state"]
        return state if state in {"SUCCESS", "FAILURE", "REVOKED"} else None

    assert wait_until(finished, timeout=60) == "SUCCESS"
    page = client.get(url, headers=tokens.read.headers).get_json()
    assert page["total"] == 50  # E-0 was updated in place, 49 rows are new
    got = client.get("/api/v1/features?page_size=100", headers=tokens.read.headers).get_json()
    assert "before" not in {f["name"] for f in got["items"]}
