"""``/api/v1/test-cases``: list, create, read, update and delete test cases.

A feature's own list and create live under ``/api/v1/features/<id>/test-cases``
(``web.features``); both share the ``test_cases:list`` cache class.
"""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy import delete
from sqlalchemy.orm import Session

from shared import cache as keys
from shared.catalog import test_case_body, test_case_path, test_cases_page
from shared.models import Feature, TestCase, TestCaseStatus, TokenScope
from web.auth import requires
from web.catalog import (
    FOREIGN_KEY_VIOLATION,
    MAX_ID,
    UNIQUE_VIOLATION,
    ExternalId,
    Name,
    TestCaseListQuery,
    base_url,
    cached_get,
    commit,
    external_id_taken,
    insert,
    no_content,
    not_null,
    writing,
    written,
)
from web.errors import NotFound, Unprocessable
from web.extension import conveyor, db_session, read
from web.validation import json_object, query, validate

bp = Blueprint("test_cases", __name__, url_prefix="/api/v1/test-cases")

FeatureId = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]


class AllTestCasesQuery(TestCaseListQuery):
    feature_id: Annotated[int, Field(ge=1, le=MAX_ID)] | None = None


class TestCaseIn(BaseModel):
    __test__ = False
    model_config = ConfigDict(extra="forbid")

    feature_id: FeatureId
    name: Name
    external_id: ExternalId | None = None
    status: TestCaseStatus = TestCaseStatus.PENDING


class TestCasePatch(BaseModel):
    __test__ = False
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    external_id: ExternalId | None = None
    status: TestCaseStatus | None = None

    _required = field_validator("name", "status", mode="before")(not_null)


def _no_feature() -> Unprocessable:
    return Unprocessable.field("feature_id", "no such feature", problem="feature-not-found")


def _test_case(session: Session, test_case_id: int) -> TestCase:
    test_case = session.get(TestCase, test_case_id) if test_case_id <= MAX_ID else None
    if test_case is None:
        raise NotFound(f"no test case {test_case_id}", problem="test-case-not-found")
    return test_case


@bp.get("")
@requires(TokenScope.READ)
def list_test_cases() -> Response:
    """Test cases, newest first; ``status`` and ``feature_id`` filter."""
    q = query(AllTestCasesQuery)
    status = q.status.value if q.status else None
    return cached_get(
        keys.TEST_CASES_LIST,
        keys.test_cases_list_key(q.feature_id, q.page, q.page_size, status),
        conveyor().settings.cache_list_ttl_s,
        lambda: read(
            lambda s: test_cases_page(s, q.feature_id, q.page, q.page_size, status, base_url())
        ),
    )


@bp.post("")
@requires(TokenScope.WRITE)
def create_test_case() -> Response:
    """Create a test case: 201 with it and its ``Location``; 422 for an unknown feature."""
    data = validate(TestCaseIn, json_object())
    if read(lambda s: s.get(Feature, data.feature_id)) is None:
        raise _no_feature()
    test_case = TestCase(**data.model_dump(mode="json"))
    with writing(keys.TEST_CASES_LIST):
        insert(
            db_session(),
            test_case,
            {
                UNIQUE_VIOLATION: external_id_taken(data.external_id),
                FOREIGN_KEY_VIOLATION: _no_feature,  # deleted since the check
            },
        )
    base = base_url()
    return written(test_case_body(test_case, base), 201, base + test_case_path(test_case.id))


@bp.get("/<int:test_case_id>")
@requires(TokenScope.READ)
def get_test_case(test_case_id: int) -> Response:
    """One test case."""
    return cached_get(
        keys.TEST_CASE,
        keys.test_case_key(test_case_id),
        conveyor().settings.cache_item_ttl_s,
        lambda: read(lambda s: test_case_body(_test_case(s, test_case_id), base_url())),
    )


@bp.patch("/<int:test_case_id>")
@requires(TokenScope.WRITE)
def update_test_case(test_case_id: int) -> Response:
    """Change the given fields of a test case (its status, typically)."""
    data = validate(TestCasePatch, json_object())
    session = db_session()
    test_case = _test_case(session, test_case_id)
    changes: dict[str, Any] = data.model_dump(mode="json", exclude_unset=True)
    for field, value in changes.items():
        setattr(test_case, field, value)
    with writing(keys.TEST_CASE, keys.TEST_CASES_LIST):
        commit(session, {UNIQUE_VIOLATION: external_id_taken(data.external_id)})
    return written(test_case_body(test_case, base_url()))


@bp.delete("/<int:test_case_id>")
@requires(TokenScope.WRITE)
def delete_test_case(test_case_id: int) -> Response:
    """Delete a test case."""
    if test_case_id > MAX_ID:
        raise NotFound(f"no test case {test_case_id}", problem="test-case-not-found")
    session = db_session()
    with writing(keys.TEST_CASE, keys.TEST_CASES_LIST):
        deleted = session.execute(
            delete(TestCase).where(TestCase.id == test_case_id).returning(TestCase.id)
        ).all()
        commit(session, {})
    if not deleted:
        raise NotFound(f"no test case {test_case_id}", problem="test-case-not-found")
    return no_content()
