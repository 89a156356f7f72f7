"""``/api/v1/features``: CRUD, validation, pagination, conflicts, and the list's index."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from shared.catalog import features_query
from shared.db import Database
from shared.models import Deployment, Environment, Job
from tests.web.catalog_helpers import clear_cache, create_feature, create_test_case, fields_of
from tests.web.conftest import Tokens, problem


@pytest.fixture(autouse=True)
def _fresh_cache(redis_url: str) -> None:
    clear_cache(redis_url)


def test_create_read_update_delete(client: FlaskClient, tokens: Tokens) -> None:
    created = client.post(
        "/api/v1/features",
        json={
            "name": "  Checkout  ",
            "complexity_points": 5,
            "external_id": "F-1",
            "description": "pay for things",
            "status": "in_progress",
        },
        headers=tokens.write.headers,
    )
    assert created.status_code == 201
    body = created.get_json()
    assert created.headers["Location"] == f"/api/v1/features/{body['id']}"
    assert body["name"] == "Checkout"  # surrounding spaces dropped
    assert body["status"] == "in_progress"
    assert body["created_at"].endswith("Z")

    got = client.get(created.headers["Location"], headers=tokens.read.headers)
    assert got.status_code == 200
    assert got.get_json() == body

    patched = client.patch(
        created.headers["Location"],
        json={"status": "done", "description": None},
        headers=tokens.write.headers,
    )
    assert patched.status_code == 200
    assert patched.get_json()["status"] == "done"
    assert patched.get_json()["description"] is None
    assert patched.get_json()["name"] == "Checkout"  # fields not sent stay

    deleted = client.delete(created.headers["Location"], headers=tokens.write.headers)
    assert deleted.status_code == 204
    problem(client.get(created.headers["Location"], headers=tokens.read.headers), 404)
    problem(client.delete(created.headers["Location"], headers=tokens.write.headers), 404)


def test_the_seed_paths_make_one_round_trip_per_statement(
    app: Flask, client: FlaskClient, tokens: Tokens
) -> None:
    """The seed scenario's create and list (and a read of one), on cache misses: each
    statement runs outside a transaction (psycopg2 sends no BEGIN, COMMIT or ROLLBACK
    around it), and a create is its INSERT alone (RETURNING brings back the server's
    defaults: no refresh follows)."""
    engine = app.extensions["conveyor"].db.engine
    seen: list[tuple[str, int]] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if " features" in statement or " feature_counts" in statement:
            verb = statement.split(None, 1)[0]
            seen.append((verb, conn.connection.dbapi_connection.get_transaction_status()))

    event.listen(engine, "after_cursor_execute", record)
    try:
        created = create_feature(client, tokens, name="One trip")
        assert seen == [("INSERT", TRANSACTION_STATUS_IDLE)]
        assert created["created_at"].endswith("Z")
        assert created["updated_at"] == created["created_at"]
        seen.clear()
        got = client.get(f"/api/v1/features/{created['id']}", headers=tokens.read.headers)
        assert got.get_json() == created
        listed = client.get("/api/v1/features?page=1&page_size=20", headers=tokens.read.headers)
        assert listed.get_json()["items"][0] == created
    finally:
        event.remove(engine, "after_cursor_execute", record)
    # the one feature, then the list's total (from feature_counts) and page
    assert seen == [("SELECT", TRANSACTION_STATUS_IDLE)] * 3


def test_a_patch_answers_from_its_update_without_reading_the_row_again(
    app: Flask, client: FlaskClient, tokens: Tokens
) -> None:
    """The UPDATE returns ``updated_at`` (eager_defaults): a PATCH of a feature or a test
    case reads the row and updates it, nothing after, and answers what a later GET reads."""
    feature = create_feature(client, tokens, name="Patched once")
    case = create_test_case(client, tokens, feature["id"])
    engine = app.extensions["conveyor"].db.engine
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if " features" in statement or " test_cases" in statement:
            seen.append(statement.split(None, 1)[0])

    for before, change in ((feature, {"status": "done"}), (case, {"status": "passed"})):
        seen.clear()
        event.listen(engine, "after_cursor_execute", record)
        try:
            patched = client.patch(
                before["links"]["self"], json=change, headers=tokens.write.headers
            )
        finally:
            event.remove(engine, "after_cursor_execute", record)
        assert patched.status_code == 200, patched.get_json()
        assert seen == ["SELECT", "UPDATE"]
        body = patched.get_json()
        assert body["status"] == change["status"]
        assert body["updated_at"] > before["updated_at"]
        read = client.get(before["links"]["self"], headers=tokens.read.headers)
        assert read.get_json() == body


def test_links_lead_to_the_routes(client: FlaskClient, tokens: Tokens) -> None:
    """Bodies build links without Flask (the warm task has no app): they must still resolve."""
    feature = create_feature(client, tokens)
    case = create_test_case(client, tokens, feature["id"])
    for url in (
        feature["links"]["self"],
        feature["links"]["test_cases"],
        case["links"]["self"],
        case["links"]["feature"],
    ):
        assert client.get(url, headers=tokens.read.headers).status_code == 200, url


def test_validation_names_each_field_once(client: FlaskClient, tokens: Tokens) -> None:
    response = client.post(
        "/api/v1/features",
        json={"complexity_points": "three", "status": "someday", "colour": "red", "name": ""},
        headers=tokens.write.headers,
    )
    body = problem(response, 422)
    assert sorted(fields_of(body)) == ["colour", "complexity_points", "name", "status"]

    missing = problem(client.post("/api/v1/features", json={}, headers=tokens.write.headers), 422)
    assert sorted(fields_of(missing)) == ["complexity_points", "name"]

    negative = problem(
        client.post(
            "/api/v1/features",
            json={"name": "x", "complexity_points": -1},
            headers=tokens.write.headers,
        ),
        422,
    )
    assert fields_of(negative) == ["complexity_points"]


def test_patch_validation_and_unknown_ids(client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    body = problem(
        client.patch(url, json={"name": None, "status": None}, headers=tokens.write.headers), 422
    )
    assert sorted(fields_of(body)) == ["name", "status"]
    assert body["errors"][0]["message"].endswith("may not be null")
    problem(client.patch(url, json={"id": 7}, headers=tokens.write.headers), 422)

    for unknown in (10**12, 2**63, 10**30):
        problem(client.get(f"/api/v1/features/{unknown}", headers=tokens.read.headers), 404)
        problem(
            client.patch(
                f"/api/v1/features/{unknown}", json={"name": "x"}, headers=tokens.write.headers
            ),
            404,
        )
        problem(client.delete(f"/api/v1/features/{unknown}", headers=tokens.write.headers), 404)


def test_external_id_is_unique(client: FlaskClient, tokens: Tokens) -> None:
    create_feature(client, tokens, external_id="F-7")
    other = create_feature(client, tokens, external_id="F-8")
    body = problem(
        client.post(
            "/api/v1/features",
            json={"name": "again", "complexity_points": 1, "external_id": "F-7"},
            headers=tokens.write.headers,
        ),
        409,
    )
    assert body["type"].endswith("external-id-taken")
    problem(
        client.patch(
            f"/api/v1/features/{other['id']}",
            json={"external_id": "F-7"},
            headers=tokens.write.headers,
        ),
        409,
    )


def test_scopes(client: FlaskClient, tokens: Tokens) -> None:
    problem(client.get("/api/v1/features"), 401)
    problem(client.get("/api/v1/features", headers=tokens.revoked.headers), 401)
    problem(
        client.post(
            "/api/v1/features",
            json={"name": "x", "complexity_points": 1},
            headers=tokens.read.headers,
        ),
        403,
    )
    feature = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}"
    problem(client.patch(url, json={"name": "y"}, headers=tokens.read.headers), 403)
    problem(client.delete(url, headers=tokens.read.headers), 403)
    assert client.get(url, headers=tokens.read.headers).status_code == 200


def test_pagination(client: FlaskClient, tokens: Tokens) -> None:
    ids = [
        create_feature(client, tokens, status="done" if i % 5 == 0 else "planned")["id"]
        for i in range(25)
    ]
    first = client.get("/api/v1/features", headers=tokens.read.headers).get_json()
    assert (first["page"], first["page_size"], first["total"]) == (1, 20, 25)
    assert [f["id"] for f in first["items"]] == ids[::-1][:20]  # newest first
    assert first["links"]["prev"] is None
    assert first["links"]["next"] == "/api/v1/features?page=2&page_size=20"

    second = client.get(first["links"]["next"], headers=tokens.read.headers).get_json()
    assert [f["id"] for f in second["items"]] == ids[::-1][20:]
    assert second["links"]["next"] is None
    assert second["links"]["prev"] == "/api/v1/features?page=1&page_size=20"

    past = client.get("/api/v1/features?page=9", headers=tokens.read.headers).get_json()
    assert (past["items"], past["total"], past["links"]["next"]) == ([], 25, None)

    done = client.get(
        "/api/v1/features?status=done&page_size=2", headers=tokens.read.headers
    ).get_json()
    assert done["total"] == 5
    assert [f["id"] for f in done["items"]] == [ids[20], ids[15]]
    assert done["links"]["next"] == "/api/v1/features?status=done&page=2&page_size=2"

    for bad, field in (
        ("page_size=0", "page_size"),
        ("page_size=101", "page_size"),
        ("page=0", "page"),
        ("page=x", "page"),
        ("status=someday", "status"),
    ):
        body = problem(client.get(f"/api/v1/features?{bad}", headers=tokens.read.headers), 422)
        assert fields_of(body) == [field], bad
    assert (
        client.get("/api/v1/features?page_size=100", headers=tokens.read.headers).status_code == 200
    )


def test_feature_test_cases(client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    other = create_feature(client, tokens)
    url = f"/api/v1/features/{feature['id']}/test-cases"
    first = create_test_case(client, tokens, feature["id"], status="passed")
    second = create_test_case(client, tokens, feature["id"])
    create_test_case(client, tokens, other["id"])
    assert first["feature_id"] == feature["id"]
    assert second["status"] == "pending"

    page = client.get(url, headers=tokens.read.headers).get_json()
    assert [t["id"] for t in page["items"]] == [second["id"], first["id"]]
    assert page["total"] == 2
    passed = client.get(f"{url}?status=passed", headers=tokens.read.headers).get_json()
    assert [t["id"] for t in passed["items"]] == [first["id"]]

    problem(client.get("/api/v1/features/999999/test-cases", headers=tokens.read.headers), 404)
    problem(
        client.post(
            "/api/v1/features/999999/test-cases", json={"name": "x"}, headers=tokens.write.headers
        ),
        404,
    )
    body = problem(
        client.post(url, json={"name": "", "feature_id": 3}, headers=tokens.write.headers), 422
    )
    assert sorted(fields_of(body)) == ["feature_id", "name"]


def test_delete_feature_with_deployments_is_409(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    feature = create_feature(client, tokens)
    with committed_db.session() as s:
        env = Environment(name="staging")
        job = Job(id=uuid.uuid4(), kind="deployment", queue="deployments", owner="t", params={})
        s.add_all([env, job])
        s.flush()
        s.add(
            Deployment(
                job_id=job.id,
                feature_id=feature["id"],
                environment_id=env.id,
                version="1.0",
                status="succeeded",
            )
        )
        s.commit()
    url = f"/api/v1/features/{feature['id']}"
    body = problem(client.delete(url, headers=tokens.write.headers), 409)
    assert body["type"].endswith("feature-has-deployments")
    assert client.get(url, headers=tokens.read.headers).status_code == 200


def test_list_query_uses_the_index(session: Session) -> None:
    """EXPLAIN of the list query on 20k rows, after ANALYZE: an index serves every filter
    (no Seq Scan, no full sort), the seed's ``(status, created_at DESC)`` one for a
    selective status. (For a status most rows have, walking ``created_at`` and skipping
    the others is as good, and PostgreSQL may rightly choose that.)"""
    session.execute(
        text(
            "INSERT INTO features (name, status, complexity_points, created_at) "
            "SELECT 'f' || i, CASE WHEN i % 50 = 0 THEN 'in_progress' "
            "WHEN i % 5 = 0 THEN 'planned' ELSE 'done' END, i % 13, "
            "now() - i * interval '1 minute' FROM generate_series(1, 20000) AS i"
        )
    )
    session.execute(text("ANALYZE features"))
    for status, index in (
        ("in_progress", "ix_features_status_created_at"),
        ("done", "ix_features_"),
        (None, "ix_features_created_at"),
    ):
        stmt = features_query(status).offset(40).limit(20)
        sql = str(
            stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        )
        plan = "\n".join(row[0] for row in session.execute(text(f"EXPLAIN {sql}")))
        assert f"Index Scan using {index}" in plan, plan
        assert "Seq Scan" not in plan, plan
