"""/api/v1/deployments: submission and its validation, reading, history, stats."""

from __future__ import annotations

import statistics
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from shared.db import Database
from shared.models import Deployment, Job
from tests.web.conftest import Tokens, problem, queued_message
from tests.worker.deploying import make_environment, make_feature

URL = "/api/v1/deployments"


def post(client: FlaskClient, tokens: Tokens, **payload: Any) -> Any:
    return client.post(URL, headers=tokens.write.headers, json=payload)


def test_a_deployment_is_accepted_recorded_and_queued(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    make_environment(committed_db, "staging")
    feature_id = make_feature(committed_db, "F-1", ("passed", "passed"))
    response = post(
        client, tokens, feature_external_id="F-1", environment="staging", version="1.2.0"
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["kind"] == "deployment"
    assert body["state"] == "PENDING"
    assert body["params"] == {
        "feature_id": feature_id,
        "environment": "staging",
        "version": "1.2.0",
        "force": False,
    }
    assert body["links"]["deployment"] == f"{URL}/{body['id']}"
    assert body["deployment"]["status"] == "queued"
    assert queued_message(broker, body["id"], "deployments")["headers"]["task"] == (
        "conveyor.deployments.run"
    )

    shown = client.get(f"{URL}/{body['id']}", headers=tokens.read.headers).get_json()
    assert shown["id"] == body["id"]
    assert shown["environment"] == "staging"
    assert shown["feature"]["external_id"] == "F-1"
    assert shown["version"] == "1.2.0"
    assert [(e["step"], e["status"]) for e in shown["events"]] == [("queued", "info")]
    assert shown["events"][0]["message"] == "queued by token 'writer'"
    # By numeric id too.
    again = post(client, tokens, feature_id=feature_id, environment="staging", version="1.2.1")
    assert again.status_code == 202


def test_unknown_feature_or_environment_is_404(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    make_environment(committed_db, "staging")
    make_feature(committed_db, "F-1")
    body = problem(
        post(client, tokens, feature_external_id="F-9", environment="staging", version="1"), 404
    )
    assert body["type"] == "urn:conveyor:problem:feature-not-found"
    body = problem(post(client, tokens, feature_id=999999, environment="staging", version="1"), 404)
    assert body["errors"] == [{"field": "feature_id", "message": "no such feature"}]
    body = problem(
        post(client, tokens, feature_external_id="F-1", environment="prod", version="1"), 404
    )
    assert body["type"] == "urn:conveyor:problem:environment-not-found"
    with committed_db.session() as s:
        assert s.query(Job).count() == 0


def test_unpassed_test_cases_are_422_unless_forced(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    make_environment(committed_db, "staging")
    make_environment(committed_db, "dev", require_passing_tests=False)
    make_feature(committed_db, "F-1", ("passed", "failed", "pending", "skipped"))
    body = problem(
        post(client, tokens, feature_external_id="F-1", environment="staging", version="2"), 422
    )
    assert body["type"] == "urn:conveyor:problem:test-cases-not-passed"
    assert [(t["external_id"], t["status"]) for t in body["test_cases"]] == [
        ("F-1-T1", "failed"),
        ("F-1-T2", "pending"),
        ("F-1-T3", "skipped"),
    ]
    assert [e["message"] for e in body["errors"]] == [
        "test case F-1-T1 is failed",
        "test case F-1-T2 is pending",
        "test case F-1-T3 is skipped",
    ]
    forced = post(
        client, tokens, feature_external_id="F-1", environment="staging", version="2", force=True
    )
    assert forced.status_code == 202
    assert forced.get_json()["deployment"]["force"] is True
    relaxed = post(client, tokens, feature_external_id="F-1", environment="dev", version="2")
    assert relaxed.status_code == 202


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"environment": "staging", "version": "1"}, "body"),
        (
            {
                "feature_id": 1,
                "feature_external_id": "F-1",
                "environment": "staging",
                "version": "1",
            },
            "body",
        ),
        ({"feature_id": "1", "environment": "staging", "version": "1"}, "feature_id"),
        (
            {"feature_external_id": "F-1", "environment": "staging", "version": "--kubeconfig=x"},
            "version",
        ),
        ({"feature_external_id": "F-1", "environment": "staging", "version": "1 2"}, "version"),
        ({"feature_external_id": "F-1", "environment": "staging", "version": ""}, "version"),
        ({"feature_external_id": "F-1", "environment": "staging", "version": "v" * 129}, "version"),
        ({"feature_external_id": "F-1", "environment": "staging"}, "version"),
        (
            {
                "feature_external_id": "F-1",
                "environment": "staging",
                "version": "1",
                "force": "yes",
            },
            "force",
        ),
        ({"feature_external_id": "F-1", "environment": "staging", "version": "1", "x": 1}, "x"),
    ],
)
def test_invalid_requests_are_422_by_field(
    client: FlaskClient, tokens: Tokens, payload: dict[str, Any], field: str
) -> None:
    body = problem(client.post(URL, headers=tokens.write.headers, json=payload), 422)
    assert field in [e["field"] for e in body["errors"]], body


def test_read_tokens_cannot_submit_and_unknown_ids_are_404(
    client: FlaskClient, tokens: Tokens
) -> None:
    problem(client.post(URL, headers=tokens.read.headers, json={}), 403)
    problem(client.get(f"{URL}/{uuid.uuid4()}", headers=tokens.read.headers), 404)
    problem(client.get(f"{URL}/not-a-uuid", headers=tokens.read.headers), 400)


def test_cancelling_a_queued_deployment_shows_it_cancelled(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    make_environment(committed_db, "staging")
    make_feature(committed_db, "F-1")
    job_id = post(
        client, tokens, feature_external_id="F-1", environment="staging", version="1"
    ).get_json()["id"]
    response = client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers)
    assert response.status_code == 200
    shown = client.get(f"{URL}/{job_id}", headers=tokens.read.headers).get_json()
    assert shown["state"] == "REVOKED"
    assert shown["status"] == "cancelled"
    listed = client.get(f"{URL}?status=cancelled", headers=tokens.read.headers).get_json()
    assert [d["id"] for d in listed["items"]] == [job_id]


def _history(
    db: Database, env_id: int, feature_id: int, rows: list[tuple[str, float, float]]
) -> None:
    """Finished deployments written directly: (status, seconds held, hours ago finished)."""
    now = datetime.now(UTC)
    with db.session() as s:
        for i, (status, held, hours_ago) in enumerate(rows):
            job_id = uuid.uuid4()
            finished = now - timedelta(hours=hours_ago)
            state = {"succeeded": "SUCCESS", "cancelled": "REVOKED"}.get(status, "FAILURE")
            s.add(
                Job(
                    id=job_id,
                    kind="deployment",
                    queue="deployments",
                    state=state,
                    owner="t",
                    params={},
                    finished_at=finished,
                )
            )
            s.flush()
            s.add(
                Deployment(
                    job_id=job_id,
                    feature_id=feature_id,
                    environment_id=env_id,
                    version=f"v{i}",
                    status=status,
                    started_at=finished - timedelta(seconds=held),
                    finished_at=finished,
                )
            )
        s.commit()


def test_history_filters_and_pages(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    staging = make_environment(committed_db, "staging")
    prod = make_environment(committed_db, "prod")
    f1 = make_feature(committed_db, "F-1")
    f2 = make_feature(committed_db, "F-2")
    _history(committed_db, staging, f1, [("succeeded", 1, 1)] * 3 + [("rolled_back", 1, 1)])
    _history(committed_db, prod, f2, [("succeeded", 1, 1)] * 2)
    get = lambda q: client.get(f"{URL}?{q}", headers=tokens.read.headers).get_json()  # noqa: E731
    assert get("")["total"] == 6
    assert get("environment=staging")["total"] == 4
    assert get("environment=staging&status=rolled_back")["total"] == 1
    assert get("feature=F-2")["total"] == 2
    assert get(f"feature={f2}")["total"] == 2
    page = get("environment=staging&page=2&page_size=3")
    assert len(page["items"]) == 1
    assert page["links"]["prev"] == f"{URL}?environment=staging&page=1&page_size=3"
    assert page["links"]["next"] is None
    first = get("page_size=3")
    assert first["links"]["next"] == f"{URL}?page=2&page_size=3"
    problem(client.get(f"{URL}?status=sleeping", headers=tokens.read.headers), 422)


def test_stats_match_the_history_and_are_cached(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    staging = make_environment(committed_db, "staging")
    prod = make_environment(committed_db, "prod")
    f1 = make_feature(committed_db, "F-1")
    recent = [
        ("succeeded", 10, 1),
        ("succeeded", 20, 2),
        ("succeeded", 30, 3),
        ("failed", 40, 4),
        ("rolled_back", 50, 5),
        ("cancelled", 5, 6),
    ]
    older = [("succeeded", 100, 48), ("failed", 200, 24 * 10)]
    _history(committed_db, staging, f1, recent + older)
    _history(committed_db, prod, f1, [("succeeded", 7, 1)])
    broker.delete(
        *[
            f"deployments:stats:{e}:{p}"
            for e in ("staging", "prod", "_all")
            for p in ("24h", "7d", "30d")
        ]
    )

    def stats(q: str) -> dict[str, Any]:
        response = client.get(f"{URL}/stats?{q}", headers=tokens.read.headers)
        assert response.status_code == 200, response.get_json()
        body: dict[str, Any] = response.get_json()
        return body

    day = stats("environment=staging&period=24h")
    assert day["cached"] is False
    assert day["counts"] == {"succeeded": 3, "failed": 1, "rolled_back": 1, "cancelled": 1}
    assert day["total"] == 6
    assert day["success_rate"] == round(3 / 5, 4)
    held = [10, 20, 30, 40, 50, 5]
    assert day["duration_s"]["count"] == 6
    assert day["duration_s"]["p50"] == pytest.approx(
        statistics.quantiles(held, n=100, method="inclusive")[49], abs=0.01
    )
    assert day["duration_s"]["p95"] == pytest.approx(
        statistics.quantiles(held, n=100, method="inclusive")[94], abs=0.01
    )

    week = stats("environment=staging&period=7d")
    assert week["counts"]["succeeded"] == 4
    month = stats("environment=staging&period=30d")
    assert month["total"] == 8
    everywhere = stats("period=24h")
    assert everywhere["environment"] is None
    assert everywhere["counts"]["succeeded"] == 4

    # The second read comes from Redis, under the documented key.
    assert broker.ttl("deployments:stats:staging:24h") > 0
    assert stats("environment=staging&period=24h")["cached"] is True
    assert broker.exists("deployments:stats:_all:24h")

    problem(client.get(f"{URL}/stats?period=1y", headers=tokens.read.headers), 422)
    problem(client.get(f"{URL}/stats?environment=nope", headers=tokens.read.headers), 404)
