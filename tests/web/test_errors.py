"""Every error is application/problem+json; bugs fail tests, outages answer 503."""

from __future__ import annotations

import uuid

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.db import Database
from shared.settings import Settings
from tests.web.conftest import Tokens, build_app, close_app, problem, unused_port


def test_unknown_route_is_problem_404(client: FlaskClient) -> None:
    body = problem(client.get("/no/such/thing"), 404)
    assert body["type"] == "about:blank"
    assert body["title"] == "Not Found"


def test_wrong_method_is_problem_405_with_allow(client: FlaskClient) -> None:
    response = client.put("/healthz")
    problem(response, 405)
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    response = client.put(f"/api/v1/jobs/{uuid.uuid4()}")
    problem(response, 405)
    assert "DELETE" in response.headers["Allow"]


def _boom() -> str:
    raise RuntimeError("secret internals /srv/app/thing.py line 42")


def test_bug_is_500_without_traceback_outside_tests(app: Flask) -> None:
    app.add_url_rule("/boom", view_func=_boom)
    app.testing = False
    response = app.test_client().get("/boom")
    body = problem(response, 500)
    assert "secret internals" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert body["detail"] == "an unexpected error occurred"
    assert response.headers["X-Request-ID"]


def test_bug_is_raised_under_test(app: Flask) -> None:
    app.add_url_rule("/boom", view_func=_boom)
    with pytest.raises(RuntimeError, match="secret internals"):
        app.test_client().get("/boom")


def test_database_down_is_503(settings: Settings, committed_db: Database, tokens: Tokens) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{unused_port()}/postgres"
    app = build_app(settings.model_copy(update={"database_url": dead}))
    try:
        response = app.test_client().get("/api/v1/jobs", headers=tokens.read.headers)
    finally:
        close_app(app)
    body = problem(response, 503)
    assert response.headers["Retry-After"] == "5"
    assert body["type"].endswith(":database-unavailable")
    assert dead not in response.get_data(as_text=True)
