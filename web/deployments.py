"""``/api/v1/deployments``: submit a deployment, follow its steps, read history and stats.

A deployment is a ``deployment`` job plus its row and events; it is addressed by its job
id (what ``POST`` answers as ``id``), so one id serves ``/deployments/<id>`` and
``/jobs/<id>`` (whose ``DELETE`` cancels it). Deployments are an environment's shared
history: every ``read`` token sees all of them, while the job itself stays its owner's.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
from flask import Blueprint, Response, current_app, jsonify
from flask.blueprints import BlueprintSetupState
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from sqlalchemy import ColumnElement, Row, func, literal, or_, select
from sqlalchemy.orm import Session

from shared.deployments import (
    STATS_PERIODS,
    VERSION_PATTERN,
    effective_status,
    insert_deployment,
    stats_cache,
    stats_key,
    unpassed_test_cases,
)
from shared.jobs import JobRecord
from shared.models import (
    DEPLOYMENT_FINAL,
    DEPLOYMENT_HOLDING,
    DEPLOYMENT_WAITING,
    Deployment,
    DeploymentEvent,
    Environment,
    Feature,
    Job,
    TokenScope,
)
from shared.pages import page_body
from web.auth import current_principal, requires
from web.errors import BadRequest, NotFound, Unprocessable
from web.extension import conveyor, db_session
from web.jobs import MAX_PAGE, MAX_PAGE_SIZE, iso, job_body, job_url
from web.links import link
from web.submission import submit_and_respond
from web.validation import json_object, query, validate

log = logging.getLogger(__name__)

bp = Blueprint("deployments", __name__, url_prefix="/api/v1/deployments")

STATUSES = (*DEPLOYMENT_WAITING, *DEPLOYMENT_HOLDING, *DEPLOYMENT_FINAL)
CACHE_EXTENSION = "conveyor.deployments.cache"
SHOWN_TEST_CASES = 100


@bp.record_once
def _init_cache(state: BlueprintSetupState) -> None:
    # One client per app for the stats cache (the probe's client must stay free for probes).
    state.app.extensions[CACHE_EXTENSION] = functools.cache(
        lambda: stats_cache(state.app.extensions["conveyor"].settings)
    )


def _cache() -> redis.Redis:
    client: redis.Redis = current_app.extensions[CACHE_EXTENSION]()
    return client


class DeploymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_id: Annotated[StrictInt, Field(ge=1, le=2**63 - 1)] | None = None
    feature_external_id: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    environment: Annotated[str, Field(min_length=1, max_length=100)]
    version: Annotated[str, Field(pattern=VERSION_PATTERN)]
    force: StrictBool = False

    @model_validator(mode="after")
    def _one_feature(self) -> DeploymentIn:
        if (self.feature_id is None) == (self.feature_external_id is None):
            raise ValueError("give exactly one of feature_id and feature_external_id")
        return self


def _no_store(body: dict[str, Any]) -> Response:
    # Deployments change under the client's feet; no cache may answer for them.
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response


def deployment_url(job_id: uuid.UUID | str) -> str:
    return link("deployments.get_deployment", job_id=str(job_id))


def _columns() -> tuple[Any, ...]:
    return (
        Deployment,
        Job,
        Environment.name.label("environment"),
        Feature,
        effective_status().label("effective"),
    )


def _joined(stmt: Any) -> Any:
    return (
        stmt.join(Job, Job.id == Deployment.job_id)
        .join(Environment, Environment.id == Deployment.environment_id)
        .join(Feature, Feature.id == Deployment.feature_id)
    )


def deployment_body(row: Row[Any]) -> dict[str, Any]:
    """The API's representation of a deployment (one row of ``_columns()``)."""
    d: Deployment = row.Deployment
    job: Job = row.Job
    feature: Feature = row.Feature
    duration = None
    if d.started_at is not None and d.finished_at is not None:
        duration = round((d.finished_at - d.started_at).total_seconds(), 3)
    shown = job_body(job)
    return {
        "id": str(d.job_id),
        "deployment_id": d.id,
        "environment": row.environment,
        "feature": {"id": feature.id, "external_id": feature.external_id, "name": feature.name},
        "version": d.version,
        "previous_version": d.previous_version,
        "force": d.force,
        "status": row.effective,
        "step": d.step,
        "state": job.state,
        "progress": shown["progress"],
        "error": shown["error"],
        "created_at": iso(d.created_at),
        "started_at": iso(d.started_at),
        "finished_at": iso(d.finished_at),
        "duration_s": duration,
        "links": {"self": deployment_url(d.job_id), "job": job_url(d.job_id)},
    }


def _row_for_job(session: Session, job_id: uuid.UUID) -> Row[Any] | None:
    stmt = _joined(select(*_columns()).select_from(Deployment)).where(Deployment.job_id == job_id)
    row: Row[Any] | None = session.execute(stmt).one_or_none()
    return row


def _accepted(job: JobRecord) -> dict[str, Any]:
    """A submitted deployment's answer: the job, with its deployment."""
    body = job_body(job)
    row = _row_for_job(db_session(), job.id)
    if row is not None:
        body["deployment"] = deployment_body(row)
        body["links"]["deployment"] = deployment_url(job.id)
    return body


@bp.post("")
@requires(TokenScope.WRITE)
def create_deployment() -> Response:
    """Queue a deployment: 202 with its job; 404 for an unknown feature or environment,
    422 when the request is invalid or the feature's test cases have not all passed."""
    data = validate(DeploymentIn, json_object())
    session = db_session()
    environment = session.scalar(select(Environment).where(Environment.name == data.environment))
    if environment is None:
        raise NotFound(
            f"no environment {data.environment!r}",
            problem="environment-not-found",
            errors=[{"field": "environment", "message": "no such environment"}],
        )
    if data.feature_id is not None:
        feature, field = session.get(Feature, data.feature_id), "feature_id"
    else:
        feature = session.scalar(
            select(Feature).where(Feature.external_id == data.feature_external_id)
        )
        field = "feature_external_id"
    if feature is None:
        raise NotFound(
            f"no feature {data.feature_id or data.feature_external_id!r}",
            problem="feature-not-found",
            errors=[{"field": field, "message": "no such feature"}],
        )
    if environment.require_passing_tests and not data.force:
        unpassed = unpassed_test_cases(session, feature.id, SHOWN_TEST_CASES)
        if unpassed:
            error = Unprocessable(
                [
                    {
                        "field": field,
                        "message": f"test case {tc.external_id or tc.id} is {tc.status}",
                    }
                    for tc in unpassed
                ],
                f"{len(unpassed)}{'+' if len(unpassed) == SHOWN_TEST_CASES else ''} test case(s) "
                "of the feature have not passed (send force: true to deploy anyway)",
                problem="test-cases-not-passed",
            )
            error.extras["test_cases"] = [
                {"id": tc.id, "external_id": tc.external_id, "name": tc.name, "status": tc.status}
                for tc in unpassed
            ]
            raise error
    params = {
        "feature_id": feature.id,
        "environment": environment.name,
        "version": data.version,
        "force": data.force,
    }
    principal = current_principal()
    feature_id, environment_id = feature.id, environment.id

    def on_insert(hook_session: Session, job_id: uuid.UUID) -> None:
        insert_deployment(
            hook_session,
            job_id,
            feature_id=feature_id,
            environment_id=environment_id,
            version=data.version,
            force=data.force,
            queued_by=f"token {principal.name!r}",
        )

    return submit_and_respond("deployment", params, on_insert=on_insert, describe=_accepted)


@bp.get("/<job_id>")
@requires(TokenScope.READ)
def get_deployment(job_id: str) -> Response:
    """A deployment (by its job id) with every step's event."""
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        raise BadRequest(f"{job_id!r} is not a deployment id (its job's UUID)") from None
    session = db_session()
    row = _row_for_job(session, key)
    if row is None:
        raise NotFound(f"no deployment {key}", problem="deployment-not-found")
    body = deployment_body(row)
    events = session.scalars(
        select(DeploymentEvent)
        .where(DeploymentEvent.deployment_id == row.Deployment.id)
        .order_by(DeploymentEvent.id)
    )
    body["events"] = [
        {"at": iso(e.created_at), "step": e.step, "status": e.status, "message": e.message}
        for e in events
    ]
    return _no_store(body)


class DeploymentListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: str | None = None
    status: Literal[STATUSES] | None = None  # type: ignore[valid-type]
    feature: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    page: int = Field(1, ge=1, le=MAX_PAGE)
    page_size: int = Field(20, ge=1, le=MAX_PAGE_SIZE)


@bp.get("")
@requires(TokenScope.READ)
def list_deployments() -> Response:
    """Deployments, newest first, a page at a time; filtered by environment, status or
    feature (its external id, or its numeric id)."""
    q = query(DeploymentListQuery)
    conditions: list[ColumnElement[bool]] = []
    if q.environment is not None:
        conditions.append(Environment.name == q.environment)
    if q.status is not None:
        conditions.append(effective_status() == q.status)
    if q.feature is not None:
        by_id = (
            Feature.id == int(q.feature)
            if q.feature.isdigit() and len(q.feature) < 19
            else literal(False)
        )
        conditions.append(or_(Feature.external_id == q.feature, by_id))
    session = db_session()
    total = (
        session.scalar(_joined(select(func.count()).select_from(Deployment)).where(*conditions))
        or 0
    )
    rows = session.execute(
        _joined(select(*_columns()).select_from(Deployment))
        .where(*conditions)
        .order_by(Deployment.id.desc())
        .offset((q.page - 1) * q.page_size)
        .limit(q.page_size)
    ).all()
    filters = {
        k: v
        for k, v in {"environment": q.environment, "status": q.status, "feature": q.feature}.items()
        if v is not None
    }

    def page_link(page: int) -> str:
        return link("deployments.list_deployments", **filters, page=page, page_size=q.page_size)

    body = page_body([deployment_body(row) for row in rows], q.page, q.page_size, total, page_link)
    return _no_store(body)


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    environment: str | None = None
    period: Literal["24h", "7d", "30d"] = "24h"


def compute_stats(session: Session, environment_id: int | None, period: str) -> dict[str, Any]:
    """Outcomes and durations of the deployments that finished within ``period``.

    Success rate: succeeded / (succeeded + failed + rolled_back); cancelled ones are not
    counted against it. Durations run from taking the environment to letting it go, over
    every deployment that took it; percentiles interpolate (``percentile_cont``).
    """
    now = datetime.now(UTC)
    since = now - STATS_PERIODS[period]
    status = effective_status()
    ended = func.coalesce(Deployment.finished_at, Job.finished_at)
    conditions: list[ColumnElement[bool]] = [status.in_(DEPLOYMENT_FINAL), ended >= since]
    if environment_id is not None:
        conditions.append(Deployment.environment_id == environment_id)
    counts = dict.fromkeys(DEPLOYMENT_FINAL, 0)
    for outcome, n in session.execute(
        select(status, func.count())
        .select_from(Deployment)
        .join(Job, Job.id == Deployment.job_id)
        .where(*conditions)
        .group_by(status)
    ).all():
        counts[outcome] = n
    seconds = func.extract("epoch", Deployment.finished_at - Deployment.started_at)
    p50, p95, timed = session.execute(
        select(
            func.percentile_cont(0.5).within_group(seconds),
            func.percentile_cont(0.95).within_group(seconds),
            func.count(seconds),
        )
        .select_from(Deployment)
        .join(Job, Job.id == Deployment.job_id)
        .where(*conditions, Deployment.started_at.is_not(None), Deployment.finished_at.is_not(None))
    ).one()
    judged = counts["succeeded"] + counts["failed"] + counts["rolled_back"]
    return {
        "period": period,
        "since": iso(since),
        "generated_at": iso(now),
        "total": sum(counts.values()),
        "counts": counts,
        "success_rate": round(counts["succeeded"] / judged, 4) if judged else None,
        "duration_s": {
            "count": timed,
            "p50": None if p50 is None else round(float(p50), 3),
            "p95": None if p95 is None else round(float(p95), 3),
        },
    }


@bp.get("/stats")
@requires(TokenScope.READ)
def deployment_stats() -> Response:
    """Counts by outcome, success rate and p50/p95 duration over 24h, 7d or 30d, cached in
    Redis (``deployments:stats:{environment}:{period}``) until a deployment there ends."""
    q = query(StatsQuery)
    session = db_session()
    environment_id = None
    if q.environment is not None:
        environment_id = session.scalar(
            select(Environment.id).where(Environment.name == q.environment)
        )
        if environment_id is None:
            raise NotFound(f"no environment {q.environment!r}", problem="environment-not-found")
    key = stats_key(q.environment, q.period)
    try:
        cached = _cache().get(key)
    except redis.RedisError:
        log.warning("stats cache unavailable", exc_info=True)
        cached = None
    if cached is not None:
        body = json.loads(cached)
        body["cached"] = True
    else:
        body = {"environment": q.environment, **compute_stats(session, environment_id, q.period)}
        try:
            _cache().set(key, json.dumps(body), ex=conveyor().settings.deploy_stats_ttl_s)
        except redis.RedisError:
            log.warning("stats cache unavailable", exc_info=True)
        body["cached"] = False
    return _no_store(body)
