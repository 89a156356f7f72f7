"""Features and test cases as the API shows them: bodies, pages and their queries.

Web answers with these and the warm task (``worker.cache_warming``) fills Redis with
them, so both build the same bytes. Links are built from the path constants here rather
than Flask's URL map, because the worker has no app; ``tests/web/test_features.py``
follows them through the app, so a route change that forgets them fails there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared import counts
from shared.models import Feature, TestCase
from shared.pages import page_body

FEATURES_PATH = "/api/v1/features"
TEST_CASES_PATH = "/api/v1/test-cases"


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def feature_path(feature_id: int) -> str:
    return f"{FEATURES_PATH}/{feature_id}"


def feature_test_cases_path(feature_id: int) -> str:
    return f"{FEATURES_PATH}/{feature_id}/test-cases"


def test_case_path(test_case_id: int) -> str:
    return f"{TEST_CASES_PATH}/{test_case_id}"


def feature_body(feature: Feature, base: str = "") -> dict[str, Any]:
    """The API's representation of a feature; ``base`` is ``public_url`` or empty."""
    return {
        "id": feature.id,
        "external_id": feature.external_id,
        "name": feature.name,
        "description": feature.description,
        "status": feature.status,
        "complexity_points": feature.complexity_points,
        "created_at": _iso(feature.created_at),
        "updated_at": _iso(feature.updated_at),
        "links": {
            "self": base + feature_path(feature.id),
            "test_cases": base + feature_test_cases_path(feature.id),
        },
    }


def test_case_body(test_case: TestCase, base: str) -> dict[str, Any]:
    """The API's representation of a test case."""
    return {
        "id": test_case.id,
        "external_id": test_case.external_id,
        "feature_id": test_case.feature_id,
        "name": test_case.name,
        "status": test_case.status,
        "created_at": _iso(test_case.created_at),
        "updated_at": _iso(test_case.updated_at),
        "links": {
            "self": base + test_case_path(test_case.id),
            "feature": base + feature_path(test_case.feature_id),
        },
    }


def _page(
    items: list[dict[str, Any]],
    path: str,
    page: int,
    page_size: int,
    total: int,
    filters: dict[str, Any],
) -> dict[str, Any]:
    def page_link(number: int) -> str:
        return path + "?" + urlencode({**filters, "page": number, "page_size": page_size})

    return page_body(items, page, page_size, total, page_link)


def features_query(status: str | None) -> Any:
    """Newest first; ``ix_features_status_created_at`` (or ``ix_features_created_at``)
    serves it, and id breaks ties (an import's rows may share a created_at)."""
    stmt = select(Feature).order_by(Feature.created_at.desc(), Feature.id.desc())
    return stmt.where(Feature.status == status) if status else stmt


def features_page(
    session: Session, page: int, page_size: int, status: str | None, base: str = ""
) -> dict[str, Any]:
    """One page of features with the total and next/prev links."""
    total = counts.total(session, "features", status)
    rows = session.scalars(
        features_query(status).offset((page - 1) * page_size).limit(page_size)
    ).all()
    return _page(
        [feature_body(f, base) for f in rows],
        base + FEATURES_PATH,
        page,
        page_size,
        total,
        {"status": status} if status else {},
    )


def test_cases_page(
    session: Session,
    feature_id: int | None,
    page: int,
    page_size: int,
    status: str | None,
    base: str,
) -> dict[str, Any]:
    """One page of test cases (of one feature, or all), newest (highest id) first.

    Test cases carry no imported creation time, so the primary key is their order and
    its index serves the query; ``ix_test_cases_feature_id`` serves a feature's.
    """
    conditions: list[ColumnElement[bool]] = []
    if feature_id is not None:
        conditions.append(TestCase.feature_id == feature_id)
    if status:
        conditions.append(TestCase.status == status)
    if feature_id is None:
        total = counts.total(session, "test_cases", status)
    else:  # a feature's own test cases: ix_test_cases_feature_id finds them
        total = session.scalar(select(func.count()).select_from(TestCase).where(*conditions)) or 0
    rows = session.scalars(
        select(TestCase)
        .where(*conditions)
        .order_by(TestCase.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    path = feature_test_cases_path(feature_id) if feature_id is not None else TEST_CASES_PATH
    return _page(
        [test_case_body(t, base) for t in rows],
        base + path,
        page,
        page_size,
        total,
        {"status": status} if status else {},
    )
