"""``/api/v1/test-cases``: CRUD, validation, filters, pagination, and the feature's cascade."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from tests.web.catalog_helpers import clear_cache, create_feature, create_test_case, fields_of
from tests.web.conftest import Tokens, problem


@pytest.fixture(autouse=True)
def _fresh_cache(redis_url: str) -> None:
    clear_cache(redis_url)


def test_create_read_update_delete(client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    created = client.post(
        "/api/v1/test-cases",
        json={"feature_id": feature["id"], "name": "refunds", "external_id": "T-1"},
        headers=tokens.write.headers,
    )
    assert created.status_code == 201
    body = created.get_json()
    url = created.headers["Location"]
    assert url == f"/api/v1/test-cases/{body['id']}"
    assert (body["feature_id"], body["status"], body["external_id"]) == (
        feature["id"],
        "pending",
        "T-1",
    )
    assert client.get(url, headers=tokens.read.headers).get_json() == body

    patched = client.patch(url, json={"status": "passed"}, headers=tokens.write.headers)
    assert patched.status_code == 200
    assert patched.get_json()["status"] == "passed"
    assert client.get(url, headers=tokens.read.headers).get_json()["status"] == "passed"

    assert client.delete(url, headers=tokens.write.headers).status_code == 204
    problem(client.get(url, headers=tokens.read.headers), 404)
    problem(client.patch(url, json={"name": "x"}, headers=tokens.write.headers), 404)
    problem(client.delete(url, headers=tokens.write.headers), 404)


def test_validation(client: FlaskClient, tokens: Tokens) -> None:
    body = problem(
        client.post(
            "/api/v1/test-cases",
            json={"feature_id": "one", "name": "", "status": "green"},
            headers=tokens.write.headers,
        ),
        422,
    )
    assert sorted(fields_of(body)) == ["feature_id", "name", "status"]
    unknown = problem(
        client.post(
            "/api/v1/test-cases",
            json={"feature_id": 999_999, "name": "x"},
            headers=tokens.write.headers,
        ),
        422,
    )
    assert fields_of(unknown) == ["feature_id"]
    case = create_test_case(client, tokens, create_feature(client, tokens)["id"])
    nulls = problem(
        client.patch(
            f"/api/v1/test-cases/{case['id']}",
            json={"status": None, "feature_id": 2},
            headers=tokens.write.headers,
        ),
        422,
    )
    assert sorted(fields_of(nulls)) == ["feature_id", "status"]


def test_external_id_is_unique(client: FlaskClient, tokens: Tokens) -> None:
    feature = create_feature(client, tokens)
    create_test_case(client, tokens, feature["id"], external_id="T-9")
    body = problem(
        client.post(
            "/api/v1/test-cases",
            json={"feature_id": feature["id"], "name": "x", "external_id": "T-9"},
            headers=tokens.write.headers,
        ),
        409,
    )
    assert fields_of(body) == ["external_id"]


def test_list_filters_and_pages(client: FlaskClient, tokens: Tokens) -> None:
    a = create_feature(client, tokens)["id"]
    b = create_feature(client, tokens)["id"]
    ids = [
        create_test_case(client, tokens, a if i % 2 else b, status="failed" if i % 3 else "passed")[
            "id"
        ]
        for i in range(7)
    ]
    everything = client.get("/api/v1/test-cases?page_size=5", headers=tokens.read.headers)
    page = everything.get_json()
    assert page["total"] == 7
    assert [t["id"] for t in page["items"]] == ids[::-1][:5]
    assert page["links"]["next"] == "/api/v1/test-cases?page=2&page_size=5"
    last = client.get(page["links"]["next"], headers=tokens.read.headers).get_json()
    assert [t["id"] for t in last["items"]] == ids[::-1][5:]
    assert last["links"]["next"] is None

    of_a = client.get(f"/api/v1/test-cases?feature_id={a}", headers=tokens.read.headers)
    assert {t["feature_id"] for t in of_a.get_json()["items"]} == {a}
    assert of_a.get_json()["total"] == 3
    passed = client.get("/api/v1/test-cases?status=passed", headers=tokens.read.headers)
    assert passed.get_json()["total"] == 3  # i = 0, 3, 6

    past = client.get("/api/v1/test-cases?page=50", headers=tokens.read.headers).get_json()
    assert (past["items"], past["total"]) == ([], 7)
    for bad, field in (
        ("page_size=0", "page_size"),
        ("page_size=101", "page_size"),
        ("status=green", "status"),
        ("feature_id=0", "feature_id"),
    ):
        body = problem(client.get(f"/api/v1/test-cases?{bad}", headers=tokens.read.headers), 422)
        assert fields_of(body) == [field], bad


def test_deleting_the_feature_deletes_its_test_cases(client: FlaskClient, tokens: Tokens) -> None:
    """The cascade happens in the database; the caches of test cases must forget them too."""
    feature = create_feature(client, tokens)
    case = create_test_case(client, tokens, feature["id"])
    url = f"/api/v1/test-cases/{case['id']}"
    assert client.get(url, headers=tokens.read.headers).status_code == 200  # now cached
    listed = client.get("/api/v1/test-cases", headers=tokens.read.headers).get_json()
    assert listed["total"] == 1
    deleted = client.delete(f"/api/v1/features/{feature['id']}", headers=tokens.write.headers)
    assert deleted.status_code == 204
    problem(client.get(url, headers=tokens.read.headers), 404)
    assert client.get("/api/v1/test-cases", headers=tokens.read.headers).get_json()["total"] == 0


def test_scopes(client: FlaskClient, tokens: Tokens) -> None:
    case = create_test_case(client, tokens, create_feature(client, tokens)["id"])
    url = f"/api/v1/test-cases/{case['id']}"
    problem(client.get(url), 401)
    problem(client.patch(url, json={"name": "y"}, headers=tokens.read.headers), 403)
    problem(client.delete(url, headers=tokens.read.headers), 403)
    problem(
        client.post(
            "/api/v1/test-cases",
            json={"feature_id": case["feature_id"], "name": "x"},
            headers=tokens.read.headers,
        ),
        403,
    )
