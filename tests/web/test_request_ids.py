"""X-Request-ID: kept when sensible, made up otherwise, always echoed."""

from __future__ import annotations

import re

import pytest
from flask.testing import FlaskClient


def test_offered_request_id_is_echoed(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "edge-7f3a:42"})
    assert response.headers["X-Request-ID"] == "edge-7f3a:42"


@pytest.mark.parametrize("offered", [None, "", "has spaces", "x" * 129, "<script>"])
def test_missing_or_unsafe_request_id_is_replaced(client: FlaskClient, offered: str | None) -> None:
    headers = {"X-Request-ID": offered} if offered is not None else {}
    response = client.get("/healthz", headers=headers)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_errors_carry_the_request_id(client: FlaskClient) -> None:
    response = client.get("/nowhere", headers={"X-Request-ID": "lost-1"})
    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "lost-1"
    response = client.get("/api/v1/jobs", headers={"X-Request-ID": "anon-1"})
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "anon-1"
