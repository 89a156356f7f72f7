"""Bearer tokens and scopes on /api/v1; health checks stay open."""

from __future__ import annotations

import logging
import re
import uuid

import pytest
from flask import Blueprint, Flask
from flask.testing import FlaskClient

from shared.db import Database
from shared.models import TokenScope
from tests.web.conftest import Tokens, insert_job, problem
from web.auth import check_api_protected, requires

CHALLENGE = 'Bearer realm="conveyor"'
INVALID = 'Bearer realm="conveyor", error="invalid_token"'


@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, CHALLENGE),
        ("Basic dXNlcjpwYXNz", CHALLENGE),
        ("Token cvr_abc", CHALLENGE),
        ("Bearer", INVALID),
        ("Bearer ", INVALID),
        ("Bearer not-one-of-ours", INVALID),
        ("Bearer cvr_" + "x" * 43, INVALID),
    ],
)
def test_missing_malformed_or_unknown_token_is_401(
    client: FlaskClient, tokens: Tokens, authorization: str | None, challenge: str
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/api/v1/jobs", headers=headers)
    problem(response, 401)
    assert response.headers["WWW-Authenticate"] == challenge


def test_revoked_token_is_401_invalid_token(client: FlaskClient, tokens: Tokens) -> None:
    response = client.get("/api/v1/jobs", headers=tokens.revoked.headers)
    problem(response, 401)
    assert response.headers["WWW-Authenticate"] == INVALID


def test_scheme_is_case_insensitive(client: FlaskClient, tokens: Tokens) -> None:
    response = client.get("/api/v1/jobs", headers={"Authorization": f"bearer {tokens.read.plain}"})
    assert response.status_code == 200


def test_read_token_reads_but_cannot_write(client: FlaskClient, tokens: Tokens) -> None:
    assert client.get("/api/v1/jobs", headers=tokens.read.headers).status_code == 200
    body = problem(client.post("/api/v1/canaries", headers=tokens.read.headers), 403)
    assert "write" in body["detail"]
    job_id = uuid.uuid4()
    problem(client.delete(f"/api/v1/jobs/{job_id}", headers=tokens.read.headers), 403)


def test_write_and_admin_tokens_may_write(client: FlaskClient, tokens: Tokens) -> None:
    assert client.post("/api/v1/canaries", headers=tokens.write.headers).status_code == 202
    assert client.post("/api/v1/canaries", headers=tokens.admin.headers).status_code == 202


def test_owner_sees_own_job_others_get_404_admin_sees_all(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    mine = insert_job(committed_db, owner=tokens.write.id)
    theirs = insert_job(committed_db, owner=tokens.other.id)

    assert client.get(f"/api/v1/jobs/{mine}", headers=tokens.write.headers).status_code == 200
    # Another owner's job is indistinguishable from an unknown one.
    problem(client.get(f"/api/v1/jobs/{theirs}", headers=tokens.write.headers), 404)
    problem(client.delete(f"/api/v1/jobs/{theirs}", headers=tokens.write.headers), 404)
    listed = client.get("/api/v1/jobs", headers=tokens.write.headers).get_json()
    assert [item["id"] for item in listed["items"]] == [str(mine)]

    for job_id in (mine, theirs):
        response = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.admin.headers)
        assert response.status_code == 200
    everyone = client.get("/api/v1/jobs", headers=tokens.admin.headers).get_json()
    assert {item["id"] for item in everyone["items"]} == {str(mine), str(theirs)}


def test_every_api_route_demands_a_token(app: Flask, client: FlaskClient) -> None:
    api_rules = [r for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")]
    assert api_rules
    for rule in api_rules:
        path = re.sub(r"<int:\w+>", "1", rule.rule).replace("<job_id>", str(uuid.uuid4()))
        for method in sorted((rule.methods or set()) - {"OPTIONS", "HEAD"}):
            response = client.open(path, method=method)
            assert response.status_code == 401, (method, path)


def test_health_checks_need_no_token(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_startup_refuses_an_unprotected_api_route() -> None:
    app = Flask(__name__)
    bp = Blueprint("loose", __name__, url_prefix="/api/v1/loose")

    @bp.get("")
    def loose() -> str:
        return "open to all"

    @bp.get("/guarded")
    @requires(TokenScope.READ)
    def guarded() -> str:
        return "ok"

    app.register_blueprint(bp)
    with pytest.raises(RuntimeError, match="/api/v1/loose"):
        check_api_protected(app)


def test_tokens_never_reach_the_logs(
    client: FlaskClient, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/api/v1/canaries", headers=tokens.write.headers)
    client.get("/api/v1/jobs", headers=tokens.revoked.headers)
    client.get("/api/v1/jobs", headers={"Authorization": "Bearer cvr_leaked-secret"})
    assert caplog.records  # the submission was logged
    logged = "\n".join(str(record.__dict__) for record in caplog.records)
    for secret in (tokens.write.plain, tokens.revoked.plain, "cvr_leaked-secret"):
        assert secret not in logged
