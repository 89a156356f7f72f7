"""POST /api/v1/canaries and the submission path every job-creating endpoint shares."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from shared import jobs
from shared.db import Database
from shared.models import Job
from shared.queue import Publisher
from shared.settings import Settings
from tests.web.conftest import Tokens, problem, queued_message


def _job(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.get_one(Job, uuid.UUID(job_id))


def test_canary_is_accepted_recorded_and_queued(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    response = client.post(
        "/api/v1/canaries", headers={**tokens.write.headers, "X-Request-ID": "req-canary-1"}
    )
    assert response.status_code == 202
    body = response.get_json()
    assert response.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert body["kind"] == "canary"
    assert body["state"] == "PENDING"
    assert body["params"] == {}
    assert body["links"]["self"] == response.headers["Location"]

    job = _job(committed_db, body["id"])
    assert job.owner == tokens.write.id
    assert job.published_at is not None
    assert job.max_attempts == 3
    message = queued_message(broker, body["id"])
    assert message["headers"]["task"] == "conveyor.canary.run"
    # The request id travels with the task, so worker log lines join up with ours.
    assert message["headers"]["request_id"] == "req-canary-1"

    status = client.get(response.headers["Location"], headers=tokens.read.headers)
    assert status.status_code == 404  # the read token is another owner
    status = client.get(response.headers["Location"], headers=tokens.write.headers)
    assert status.get_json()["id"] == body["id"]


def test_canary_accepts_a_sleep(client: FlaskClient, tokens: Tokens) -> None:
    for sleep_s, stored in ((2.5, 2.5), (0, 0.0), (30, 30.0)):
        response = client.post(
            "/api/v1/canaries", headers=tokens.write.headers, json={"sleep_s": sleep_s}
        )
        assert response.status_code == 202
        assert response.get_json()["params"] == {"sleep_s": stored}
    response = client.post("/api/v1/canaries", headers=tokens.write.headers, json={})
    assert response.get_json()["params"] == {}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"sleep_s": 31}, "sleep_s"),
        ({"sleep_s": -1}, "sleep_s"),
        ({"sleep_s": "3"}, "sleep_s"),
        ({"sleep_s": True}, "sleep_s"),
        ({"sleep_s": [1]}, "sleep_s"),
        ({"unexpected": 1}, "unexpected"),
        ([1, 2], "body"),
        ("text", "body"),
    ],
)
def test_canary_params_are_validated(
    client: FlaskClient, tokens: Tokens, committed_db: Database, payload: Any, field: str
) -> None:
    response = client.post("/api/v1/canaries", headers=tokens.write.headers, json=payload)
    body = problem(response, 422)
    assert [error["field"] for error in body["errors"]] == [field]
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.parametrize("raw", ["{", '{"sleep_s": NaN}', '{"sleep_s": 1,}'])
def test_malformed_json_is_400(client: FlaskClient, tokens: Tokens, raw: str) -> None:
    response = client.post(
        "/api/v1/canaries", headers=tokens.write.headers, data=raw, content_type="application/json"
    )
    problem(response, 400)


def test_non_json_body_is_415(client: FlaskClient, tokens: Tokens) -> None:
    response = client.post(
        "/api/v1/canaries",
        headers=tokens.write.headers,
        data="sleep_s=1",
        content_type="text/plain",
    )
    problem(response, 415)


def test_oversized_body_is_413(client: FlaskClient, tokens: Tokens) -> None:
    response = client.post(
        "/api/v1/canaries",
        headers=tokens.write.headers,
        data="[" + "0," * (1 << 20) + "0]",
        content_type="application/json",
    )
    problem(response, 413)


def test_idempotency_key_replays_the_same_job(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    headers = {**tokens.write.headers, "Idempotency-Key": "replay-1"}
    first = client.post("/api/v1/canaries", headers=headers, json={"sleep_s": 1})
    second = client.post("/api/v1/canaries", headers=headers, json={"sleep_s": 1.0})
    assert first.status_code == 202  # created
    assert second.status_code == 200  # replayed: same job, nothing new
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.headers["Location"] == first.headers["Location"]

    # Keys belong to their owner: another token's identical key is another job.
    other = client.post(
        "/api/v1/canaries",
        headers={**tokens.other.headers, "Idempotency-Key": "replay-1"},
        json={"sleep_s": 1},
    )
    assert other.status_code == 202
    assert other.get_json()["id"] != first.get_json()["id"]


def test_idempotency_key_with_a_different_body_is_422(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    headers = {**tokens.write.headers, "Idempotency-Key": "changed-mind"}
    first = client.post("/api/v1/canaries", headers=headers, json={"sleep_s": 1})
    assert first.status_code == 202
    body = problem(client.post("/api/v1/canaries", headers=headers, json={"sleep_s": 2}), 422)
    assert body["type"].endswith(":idempotency-key-reused")
    assert [error["field"] for error in body["errors"]] == ["Idempotency-Key"]
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1


@pytest.mark.parametrize(("key", "status"), [("k" * 255, 202), ("k" * 256, 422), ("", 422)])
def test_idempotency_key_length(client: FlaskClient, tokens: Tokens, key: str, status: int) -> None:
    headers = {**tokens.write.headers, "Idempotency-Key": key}
    response = client.post("/api/v1/canaries", headers=headers)
    assert response.status_code == status
    if status == 422:
        assert problem(response, 422)["errors"][0]["field"] == "Idempotency-Key"


def test_concurrent_requests_with_one_key_create_one_job(
    live_server: str, tokens: Tokens, committed_db: Database
) -> None:
    clients = 50
    start = threading.Barrier(clients)
    headers = {**tokens.write.headers, "Idempotency-Key": "stampede"}

    def post(_: int) -> tuple[int, str]:
        start.wait()  # release every request at once
        response = requests.post(
            f"{live_server}/api/v1/canaries", headers=headers, json={"sleep_s": 1}, timeout=30
        )
        return response.status_code, response.json()["id"]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(post, range(clients)))

    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * (clients - 1) + [202]
    assert len({job_id for _, job_id in results}) == 1
    with committed_db.session() as s:
        rows = s.scalars(select(Job).where(Job.idempotency_key == "stampede")).all()
    assert [str(row.id) for row in rows] == [results[0][1]]
    assert rows[0].published_at is not None


def test_submit_while_redis_is_down_is_503_and_the_reaper_queues_it(
    dead_redis_app: Flask,
    tokens: Tokens,
    settings: Settings,
    committed_db: Database,
    broker: redis.Redis,
) -> None:
    client = dead_redis_app.test_client()
    started = time.monotonic()
    response = client.post("/api/v1/canaries", headers=tokens.write.headers)
    elapsed = time.monotonic() - started

    assert elapsed < 10
    body = problem(response, 503)
    assert response.headers["Retry-After"] == "5"
    job_id = body["job_id"]
    assert body["links"]["job"] == f"/api/v1/jobs/{job_id}"
    job = _job(committed_db, job_id)
    assert job.state == "PENDING"
    assert job.published_at is None
    assert job.owner == tokens.write.id

    # Redis is back (the real one): the reaper publishes what the request could not.
    publisher = Publisher(settings)
    try:
        with committed_db.session() as s:
            counts = jobs.reap_stale_jobs(s, publisher, republish_after_s=60)
    finally:
        publisher.app.close()
    assert counts["republished"] >= 1
    assert _job(committed_db, job_id).published_at is not None
    assert queued_message(broker, job_id)["headers"]["task"] == "conveyor.canary.run"


@pytest.mark.parametrize("dead_redis_url", ["refused"], indirect=True)
def test_retrying_with_the_same_key_after_503_queues_the_same_job(
    dead_redis_app: Flask,
    client: FlaskClient,
    tokens: Tokens,
    committed_db: Database,
    broker: redis.Redis,
) -> None:
    headers = {**tokens.write.headers, "Idempotency-Key": "retry-after-outage"}
    down = dead_redis_app.test_client()
    first = problem(down.post("/api/v1/canaries", headers=headers), 503)
    again = problem(down.post("/api/v1/canaries", headers=headers), 503)
    assert again["job_id"] == first["job_id"]

    recovered = client.post("/api/v1/canaries", headers=headers)
    assert recovered.status_code == 200
    assert recovered.get_json()["id"] == first["job_id"]
    assert _job(committed_db, first["job_id"]).published_at is not None
    queued_message(broker, first["job_id"])
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
