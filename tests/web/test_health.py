"""/healthz and /readyz against real and dead dependencies."""

from __future__ import annotations

import time

from flask import Flask
from flask.testing import FlaskClient

from shared.db import Database
from shared.settings import Settings
from tests.web.conftest import build_app, close_app, problem, unused_port


def test_healthz_is_ok(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_ok_with_both_services(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["checks"] == {"postgres": "ok", "redis": "ok"}
    # The pipeline, as information: no worker runs in this test, nothing waits.
    assert body["workers"] == {"up": 0, "hosts": {}}
    assert body["queues"] == {"default": 0, "imports": 0, "deployments": 0}


def test_readyz_names_a_dead_redis(dead_redis_app: Flask) -> None:
    started = time.monotonic()
    response = dead_redis_app.test_client().get("/readyz")
    assert time.monotonic() - started < 10
    body = problem(response, 503)
    assert response.headers["Retry-After"]
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"].startswith("down: ")
    assert "redis" in body["detail"]
    assert "postgres" not in body["detail"]


def test_readyz_names_a_dead_postgres(settings: Settings, committed_db: Database) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{unused_port()}/postgres"
    app = build_app(settings.model_copy(update={"database_url": dead}))
    try:
        response = app.test_client().get("/readyz")
        # The healthz answer does not depend on anything.
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        close_app(app)
    body = problem(response, 503)
    assert body["checks"]["postgres"].startswith("down: ")
    assert body["checks"]["redis"] == "ok"
