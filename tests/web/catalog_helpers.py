"""Helpers for the features, test-cases and cache tests."""

from __future__ import annotations

from typing import Any

import redis
from flask.testing import FlaskClient

from tests.web.conftest import Tokens

CACHE_PATTERNS = ("cache:*", "feature:*", "features:*", "test_case:*", "test_cases:*")


def clear_cache(redis_url: str) -> None:
    """Forget every cache key: tests truncate tables, which no write announces."""
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in CACHE_PATTERNS:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


def create_feature(client: FlaskClient, tokens: Tokens, **fields: Any) -> dict[str, Any]:
    body = {"name": "Checkout", "complexity_points": 3, **fields}
    response = client.post("/api/v1/features", json=body, headers=tokens.write.headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    created: dict[str, Any] = response.get_json()
    return created


def create_test_case(
    client: FlaskClient, tokens: Tokens, feature_id: int, **fields: Any
) -> dict[str, Any]:
    body = {"name": "pays by card", **fields}
    response = client.post(
        f"/api/v1/features/{feature_id}/test-cases", json=body, headers=tokens.write.headers
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    created: dict[str, Any] = response.get_json()
    return created


def fields_of(problem_body: dict[str, Any]) -> list[str]:
    """The ``field`` of each ``errors`` entry, in order."""
    return [e["field"] for e in problem_body["errors"]]
