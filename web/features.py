"""``/api/v1/features``: list, create, read, update and delete features, and a feature's
test cases.

GETs go through the three cache layers (``web.catalog``, ``shared.cache``); every write
invalidates what it changed before it answers.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import delete
from sqlalchemy.orm import Session

from shared import cache as keys
from shared.catalog import (
    feature_body,
    feature_path,
    features_page,
    test_case_body,
    test_case_path,
    test_cases_page,
)
from shared.models import Feature, FeatureStatus, TestCase, TestCaseStatus, TokenScope
from web.auth import requires
from web.catalog import (
    FOREIGN_KEY_VIOLATION,
    MAX_ID,
    UNIQUE_VIOLATION,
    Description,
    ExternalId,
    Name,
    PageQuery,
    Points,
    TestCaseListQuery,
    base_url,
    cached_get,
    commit,
    external_id_taken,
    insert,
    integrity,
    no_content,
    not_null,
    writing,
    written,
)
from web.errors import Conflict, NotFound
from web.extension import conveyor, db_session, read
from web.validation import json_object, query, validate

bp = Blueprint("features", __name__, url_prefix="/api/v1/features")


class FeatureListQuery(PageQuery):
    status: FeatureStatus | None = None


class FeatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    complexity_points: Points
    external_id: ExternalId | None = None
    description: Description | None = None
    status: FeatureStatus = FeatureStatus.PLANNED


class FeaturePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    complexity_points: Points | None = None
    external_id: ExternalId | None = None
    description: Description | None = None
    status: FeatureStatus | None = None

    _required = field_validator("name", "complexity_points", "status", mode="before")(not_null)


class FeatureTestCaseIn(BaseModel):
    """A test case created under its feature (the URL names the feature)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    external_id: ExternalId | None = None
    status: TestCaseStatus = TestCaseStatus.PENDING


def _feature(session: Session, feature_id: int) -> Feature:
    feature = session.get(Feature, feature_id) if feature_id <= MAX_ID else None
    if feature is None:
        raise NotFound(f"no feature {feature_id}", problem="feature-not-found")
    return feature


@bp.get("")
@requires(TokenScope.READ)
def list_features() -> Response:
    """Features, newest first, a page at a time; ``status`` filters."""
    q = query(FeatureListQuery)
    status = q.status.value if q.status else None
    return cached_get(
        keys.FEATURES_LIST,
        keys.features_list_key(q.page, q.page_size, status),
        conveyor().settings.cache_list_ttl_s,
        lambda: read(
            lambda session: features_page(session, q.page, q.page_size, status, base_url())
        ),
    )


@bp.post("")
@requires(TokenScope.WRITE)
def create_feature() -> Response:
    """Create a feature: 201 with it and its ``Location``."""
    data = validate(FeatureIn, json_object())
    feature = Feature(**data.model_dump(mode="json"))
    with writing(keys.FEATURES_LIST):
        insert(db_session(), feature, {UNIQUE_VIOLATION: external_id_taken(data.external_id)})
    base = base_url()
    return written(feature_body(feature, base), 201, base + feature_path(feature.id))


@bp.get("/<int:feature_id>")
@requires(TokenScope.READ)
def get_feature(feature_id: int) -> Response:
    """One feature."""
    return cached_get(
        keys.FEATURE,
        keys.feature_key(feature_id),
        conveyor().settings.cache_item_ttl_s,
        lambda: read(lambda session: feature_body(_feature(session, feature_id), base_url())),
        read_feature=feature_id,
    )


@bp.patch("/<int:feature_id>")
@requires(TokenScope.WRITE)
def update_feature(feature_id: int) -> Response:
    """Change the given fields of a feature."""
    data = validate(FeaturePatch, json_object())
    session = db_session()
    feature = _feature(session, feature_id)
    for field, value in data.model_dump(mode="json", exclude_unset=True).items():
        setattr(feature, field, value)
    with writing(keys.FEATURE, keys.FEATURES_LIST):
        commit(session, {UNIQUE_VIOLATION: external_id_taken(data.external_id)})
    return written(feature_body(feature, base_url()))


@bp.delete("/<int:feature_id>")
@requires(TokenScope.WRITE)
def delete_feature(feature_id: int) -> Response:
    """Delete a feature and its test cases; 409 while deployments refer to it."""
    session = db_session()
    if feature_id > MAX_ID:
        raise NotFound(f"no feature {feature_id}", problem="feature-not-found")

    def has_deployments() -> Conflict:
        return Conflict(
            f"feature {feature_id} has deployments, which keep their history; "
            "it cannot be deleted (set its status to cancelled instead)",
            problem="feature-has-deployments",
        )

    # Its test cases go with it (ON DELETE CASCADE), so their caches are retired too.
    with (
        writing(keys.FEATURE, keys.FEATURES_LIST, keys.TEST_CASE, keys.TEST_CASES_LIST),
        integrity(session, {FOREIGN_KEY_VIOLATION: has_deployments}),
    ):
        deleted = session.execute(
            delete(Feature).where(Feature.id == feature_id).returning(Feature.id)
        ).all()
        session.commit()
    if not deleted:
        raise NotFound(f"no feature {feature_id}", problem="feature-not-found")
    return no_content()


@bp.get("/<int:feature_id>/test-cases")
@requires(TokenScope.READ)
def list_feature_test_cases(feature_id: int) -> Response:
    """A feature's test cases, newest first; ``status`` filters."""
    q = query(TestCaseListQuery)
    status = q.status.value if q.status else None

    def load(session: Session) -> dict[str, Any]:
        _feature(session, feature_id)  # 404, never cached: a later create must show up
        return test_cases_page(session, feature_id, q.page, q.page_size, status, base_url())

    return cached_get(
        keys.TEST_CASES_LIST,
        keys.test_cases_list_key(feature_id, q.page, q.page_size, status),
        conveyor().settings.cache_list_ttl_s,
        lambda: read(load),
    )


@bp.post("/<int:feature_id>/test-cases")
@requires(TokenScope.WRITE)
def create_feature_test_case(feature_id: int) -> Response:
    """Create a test case of this feature: 201 with it and its ``Location``."""
    data = validate(FeatureTestCaseIn, json_object())
    read(lambda s: _feature(s, feature_id))
    test_case = TestCase(feature_id=feature_id, **data.model_dump(mode="json"))

    def feature_gone() -> NotFound:  # deleted between the check and the commit
        return NotFound(f"no feature {feature_id}", problem="feature-not-found")

    with writing(keys.TEST_CASES_LIST):
        insert(
            db_session(),
            test_case,
            {
                UNIQUE_VIOLATION: external_id_taken(data.external_id),
                FOREIGN_KEY_VIOLATION: feature_gone,
            },
        )
    base = base_url()
    return written(test_case_body(test_case, base), 201, base + test_case_path(test_case.id))
