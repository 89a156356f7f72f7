"""/api/v1/environments: admin creates, anyone with read lists; configs are validated."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.web.conftest import Tokens, problem

URL = "/api/v1/environments"


def test_admin_creates_environments_and_everyone_reads_them(
    client: FlaskClient, tokens: Tokens
) -> None:
    response = client.post(
        URL,
        headers=tokens.admin.headers,
        json={
            "name": "staging",
            "driver": "command",
            "config": {"argv": ["deploy.sh", "{feature}", "--version={version}", "{environment}"]},
            "health_check_url": "http://127.0.0.1:9/healthz",
        },
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == "/api/v1/environments/staging"
    assert body["config"] == {
        "argv": ["deploy.sh", "{feature}", "--version={version}", "{environment}"],
        "timeout_s": 60.0,
    }
    assert body["require_passing_tests"] is True
    assert body["current_version"] is None
    assert body["last_deployment"] is None
    assert client.post(URL, headers=tokens.admin.headers, json={"name": "prod"}).status_code == 201

    listed = client.get(URL, headers=tokens.read.headers).get_json()["items"]
    assert [e["name"] for e in listed] == ["prod", "staging"]
    assert listed[0]["driver"] == "record"
    one = client.get(f"{URL}/prod", headers=tokens.read.headers)
    assert one.get_json()["name"] == "prod"
    problem(client.get(f"{URL}/nope", headers=tokens.read.headers), 404)


def test_creating_needs_admin_and_a_free_name(client: FlaskClient, tokens: Tokens) -> None:
    problem(client.post(URL, headers=tokens.write.headers, json={"name": "x"}), 403)
    assert client.post(URL, headers=tokens.admin.headers, json={"name": "x"}).status_code == 201
    body = problem(client.post(URL, headers=tokens.admin.headers, json={"name": "x"}), 409)
    assert body["type"] == "urn:conveyor:problem:environment-exists"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "bad name"}, "name"),
        ({"name": "-dash"}, "name"),
        ({"name": "e", "driver": "ssh"}, "driver"),
        ({"name": "e", "config": {"argv": ["x"]}}, "config.argv"),
        ({"name": "e", "driver": "command", "config": {}}, "config.argv"),
        (
            {"name": "e", "driver": "command", "config": {"argv": "deploy.sh {version}"}},
            "config.argv",
        ),
        ({"name": "e", "driver": "command", "config": {"argv": ["x", "{host}"]}}, "config.argv"),
        (
            {"name": "e", "driver": "command", "config": {"argv": ["x", "{version!r}"]}},
            "config.argv",
        ),
        (
            {"name": "e", "driver": "command", "config": {"argv": ["x"], "timeout_s": 0}},
            "config.timeout_s",
        ),
        ({"name": "e", "driver": "webhook", "config": {"url": "ftp://h/x"}}, "config.url"),
        (
            {"name": "e", "driver": "webhook", "config": {"url": "http://h", "secret": "s"}},
            "config.secret",
        ),
        ({"name": "e", "health_check_url": "localhost:80"}, "health_check_url"),
        ({"name": "e", "require_passing_tests": "no"}, "require_passing_tests"),
    ],
)
def test_invalid_environments_are_422_by_field(
    client: FlaskClient, tokens: Tokens, payload: dict[str, Any], field: str
) -> None:
    body = problem(client.post(URL, headers=tokens.admin.headers, json=payload), 422)
    assert field in [e["field"] for e in body["errors"]], body
