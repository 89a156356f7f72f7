"""GET/DELETE /api/v1/jobs/<id> and GET /api/v1/jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from sqlalchemy import event, func

from shared.db import Database
from shared.models import Job, JobState
from tests.web.conftest import Tokens, insert_job, problem, set_job

JOB_FIELDS = {
    "id",
    "kind",
    "state",
    "progress",
    "params",
    "result",
    "error",
    "attempts",
    "max_attempts",
    "cancel_requested",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "links",
}


def test_get_job_answers_the_row(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = insert_job(committed_db, owner=tokens.write.id, params={"sleep_s": 1.5})
    response = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert set(body) == JOB_FIELDS
    assert body["id"] == str(job_id)
    assert body["kind"] == "canary"
    assert body["state"] == "PENDING"
    assert body["params"] == {"sleep_s": 1.5}
    assert body["progress"] is None
    assert body["result"] is None
    assert body["error"] is None
    assert body["attempts"] == 0
    assert body["started_at"] is None
    assert body["links"] == {"self": f"/api/v1/jobs/{job_id}"}
    created = datetime.fromisoformat(body["created_at"])
    assert body["created_at"].endswith("Z")
    assert created.utcoffset() == timedelta(0)


def test_reading_jobs_opens_no_transaction(
    app: Flask, client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    """A status poll is one round trip: its SELECT runs outside a transaction, so psycopg2
    sends no BEGIN before it and the request's end no ROLLBACK after it (the list too)."""
    job_id = insert_job(committed_db, owner=tokens.write.id)
    engine = app.extensions["conveyor"].db.engine
    after_select: list[int] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM jobs" in statement:
            after_select.append(conn.connection.dbapi_connection.get_transaction_status())

    event.listen(engine, "after_cursor_execute", record)
    try:
        assert client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers).status_code == 200
        missing = f"/api/v1/jobs/{uuid.uuid4()}"
        assert client.get(missing, headers=tokens.write.headers).status_code == 404
        listed = client.get("/api/v1/jobs", headers=tokens.write.headers)
        assert listed.get_json()["items"][0]["id"] == str(job_id)
    finally:
        event.remove(engine, "after_cursor_execute", record)
    # get, missing, the list's count and page
    assert after_select == [TRANSACTION_STATUS_IDLE] * 4


def test_get_job_shows_progress_result_and_error(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = insert_job(committed_db, owner=tokens.write.id)
    progress = {"done": 5, "total": 10, "percent": 50.0, "eta_seconds": 2.5, "message": "half"}
    set_job(
        committed_db, job_id, state="PROGRESS", progress=progress, started_at=func.now(), attempts=1
    )
    body = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers).get_json()
    assert body["state"] == "PROGRESS"
    assert body["progress"] == progress
    assert body["started_at"].endswith("Z")
    assert body["attempts"] == 1

    error = {"code": "boom", "message": "it broke", "internal": "not for clients"}
    set_job(committed_db, job_id, state="FAILURE", error=error, finished_at=func.now())
    body = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers).get_json()
    assert body["state"] == "FAILURE"
    assert body["error"] == {"code": "boom", "message": "it broke"}
    assert body["finished_at"].endswith("Z")


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "0" * 33])
def test_malformed_job_id_is_400(client: FlaskClient, tokens: Tokens, bad_id: str) -> None:
    problem(client.get(f"/api/v1/jobs/{bad_id}", headers=tokens.read.headers), 400)
    problem(client.delete(f"/api/v1/jobs/{bad_id}", headers=tokens.write.headers), 400)


def test_unknown_job_is_404_never_pending(client: FlaskClient, tokens: Tokens) -> None:
    body = problem(client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=tokens.admin.headers), 404)
    assert "PENDING" not in str(body)


def _insert_many(db: Database, owner: str, count: int) -> list[uuid.UUID]:
    """``count`` jobs, in pairs sharing a created_at, newest first as the API orders them."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        created = base + timedelta(minutes=i // 2)
        rows.append((created, insert_job(db, owner=owner, created_at=created)))
    rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
    return [job_id for _, job_id in rows]


def test_list_pages_are_stable_and_linked(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    expected = _insert_many(committed_db, tokens.write.id, 25)
    seen: list[str] = []
    url: str | None = "/api/v1/jobs?page_size=10"
    pages = []
    while url:
        response = client.get(url, headers=tokens.write.headers)
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"
        body = response.get_json()
        pages.append(body)
        seen += [item["id"] for item in body["items"]]
        url = body["links"]["next"]
    assert seen == [str(job_id) for job_id in expected]
    assert [len(p["items"]) for p in pages] == [10, 10, 5]
    assert {p["total"] for p in pages} == {25}
    assert [p["page"] for p in pages] == [1, 2, 3]
    assert pages[0]["links"]["prev"] is None
    assert pages[0]["links"]["self"] == "/api/v1/jobs?page=1&page_size=10"
    assert pages[2]["links"]["prev"] == "/api/v1/jobs?page=2&page_size=10"
    assert pages[2]["links"]["next"] is None

    default = client.get("/api/v1/jobs", headers=tokens.write.headers).get_json()
    assert default["page_size"] == 20
    assert len(default["items"]) == 20


def test_list_filters_by_kind_and_state(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    pending = insert_job(committed_db, owner=tokens.write.id)
    done = insert_job(committed_db, owner=tokens.write.id, state="SUCCESS")
    deployment = insert_job(committed_db, owner=tokens.write.id, kind="deployment")

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/v1/jobs?{query}", headers=tokens.write.headers)
        assert response.status_code == 200
        return sorted(item["id"] for item in response.get_json()["items"])

    assert ids("state=PENDING") == sorted([str(pending), str(deployment)])
    assert ids("state=SUCCESS") == [str(done)]
    assert ids("kind=deployment") == [str(deployment)]
    assert ids("kind=canary&state=PENDING") == [str(pending)]
    assert ids("kind=import") == []
    body = client.get("/api/v1/jobs?kind=canary&page_size=1", headers=tokens.write.headers)
    assert body.get_json()["links"]["next"] == "/api/v1/jobs?kind=canary&page=2&page_size=1"


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ("page=0", {"page"}),
        ("page=-1", {"page"}),
        ("page=abc", {"page"}),
        ("page=99999999999", {"page"}),
        ("page_size=0", {"page_size"}),
        ("page_size=101", {"page_size"}),
        ("page_size=1.5", {"page_size"}),
        ("state=BOGUS", {"state"}),
        ("state=pending", {"state"}),
        ("kind=nope", {"kind"}),
        ("page=0&page_size=500&state=X&kind=y", {"page", "page_size", "state", "kind"}),
    ],
)
def test_list_validation_is_422_per_field(
    client: FlaskClient, tokens: Tokens, query: str, fields: set[str]
) -> None:
    body = problem(client.get(f"/api/v1/jobs?{query}", headers=tokens.read.headers), 422)
    assert [error["field"] for error in body["errors"]] == sorted(
        fields, key=["kind", "state", "page", "page_size"].index
    )
    assert all(error["message"] for error in body["errors"])


def test_cancel_pending_job_revokes_it(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = client.post("/api/v1/canaries", headers=tokens.write.headers).get_json()["id"]
    response = client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers)
    assert response.status_code == 200
    assert response.get_json()["state"] == "REVOKED"
    assert response.get_json()["finished_at"] is not None
    with committed_db.session() as s:
        assert s.get_one(Job, uuid.UUID(job_id)).state == JobState.REVOKED


def test_cancel_running_job_asks_it_to_stop(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = insert_job(committed_db, owner=tokens.write.id)
    set_job(committed_db, job_id, state="STARTED", started_at=func.now(), attempts=1)
    response = client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers)
    assert response.status_code == 202
    body = response.get_json()
    assert body["cancel_requested"] is True
    assert body["state"] == "STARTED"  # the worker ends it at its next checkpoint


@pytest.mark.parametrize("state", ["SUCCESS", "FAILURE", "REVOKED"])
def test_cancel_finished_job_is_409(
    client: FlaskClient, tokens: Tokens, committed_db: Database, state: str
) -> None:
    job_id = insert_job(committed_db, owner=tokens.write.id)
    set_job(committed_db, job_id, state=state, finished_at=func.now())
    body = problem(client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers), 409)
    assert body["job_id"] == str(job_id)
    assert body["state"] == state
    with committed_db.session() as s:
        assert s.get_one(Job, job_id).state == state


def test_admin_may_cancel_anyones_job(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = insert_job(committed_db, owner=tokens.write.id)
    response = client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.admin.headers)
    assert response.status_code == 200
    assert response.get_json()["state"] == "REVOKED"
