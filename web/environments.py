"""``/api/v1/environments``: where deployments go, through which driver, and what runs there.

Creating one needs an admin token (it decides what commands workers run, or where they
POST); reading needs ``read``. Each environment shows its current version, which only a
recorded deployment changes, and its last deployment.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import distinct_on, insert

from shared.deployments import CONFIGS, ENVIRONMENT_NAME_PATTERN, effective_status, http_url
from shared.models import Deployment, Environment, Feature, Job, TokenScope
from web.auth import requires
from web.errors import Conflict, NotFound, Unprocessable
from web.extension import db_session
from web.jobs import iso
from web.links import link
from web.validation import field_errors, json_object, validate

bp = Blueprint("environments", __name__, url_prefix="/api/v1/environments")


class EnvironmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=ENVIRONMENT_NAME_PATTERN)]
    driver: Literal["record", "command", "webhook"] = "record"
    config: dict[str, Any] = Field(default_factory=dict)
    health_check_url: Annotated[str, Field(max_length=2048)] | None = None
    require_passing_tests: StrictBool = True

    @field_validator("health_check_url")
    @classmethod
    def _http(cls, url: str | None) -> str | None:
        return None if url is None else http_url(url)


def environment_url(name: str) -> str:
    return link("environments.get_environment", name=name)


def environment_body(
    env: Environment, feature: Feature | None, last: dict[str, Any] | None
) -> dict[str, Any]:
    """The API's representation of an environment."""
    return {
        "name": env.name,
        "driver": env.driver,
        "config": env.config,
        "health_check_url": env.health_check_url,
        "require_passing_tests": env.require_passing_tests,
        "current_version": env.current_version,
        "current_feature": None
        if feature is None
        else {"id": feature.id, "external_id": feature.external_id, "name": feature.name},
        "last_deployment": last,
        "created_at": iso(env.created_at),
        "updated_at": iso(env.updated_at),
        "links": {
            "self": environment_url(env.name),
            "deployments": link("deployments.list_deployments", environment=env.name),
        },
    }


def _described(environments: list[Environment]) -> list[dict[str, Any]]:
    """Bodies for ``environments``, with their last deployments read in one query."""
    session = db_session()
    ids = [env.id for env in environments]
    last: dict[int, dict[str, Any]] = {}
    if ids:
        rows = session.execute(
            select(
                Deployment.environment_id,
                Deployment.job_id,
                Deployment.version,
                effective_status().label("status"),
                Deployment.created_at,
                Deployment.finished_at,
            )
            .join(Job, Job.id == Deployment.job_id)
            .where(Deployment.environment_id.in_(ids))
            .ext(distinct_on(Deployment.environment_id))
            .order_by(Deployment.environment_id, Deployment.id.desc())
        ).all()
        for row in rows:
            last[row.environment_id] = {
                "id": str(row.job_id),
                "version": row.version,
                "status": row.status,
                "created_at": iso(row.created_at),
                "finished_at": iso(row.finished_at),
                "links": {"self": link("deployments.get_deployment", job_id=str(row.job_id))},
            }
    feature_ids = {env.current_feature_id for env in environments if env.current_feature_id}
    features = {
        f.id: f for f in session.scalars(select(Feature).where(Feature.id.in_(feature_ids)))
    }
    return [
        environment_body(
            env,
            features.get(env.current_feature_id) if env.current_feature_id else None,
            last.get(env.id),
        )
        for env in environments
    ]


@bp.post("")
@requires(TokenScope.ADMIN)
def create_environment() -> tuple[Response, int, dict[str, str]]:
    """Create an environment (admin): 201, 409 if the name is taken, 422 if invalid."""
    data = validate(EnvironmentIn, json_object())
    try:
        config = CONFIGS[data.driver].model_validate(data.config).model_dump()
    except ValidationError as exc:
        errors = [
            {
                "field": "config" if e["field"] == "body" else f"config.{e['field']}",
                "message": e["message"],
            }
            for e in field_errors(exc)
        ]
        raise Unprocessable(errors, f"config is not valid for the {data.driver} driver") from None
    session = db_session()
    created = session.execute(
        insert(Environment)
        .values(
            name=data.name,
            driver=data.driver,
            config=config,
            health_check_url=data.health_check_url,
            require_passing_tests=data.require_passing_tests,
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(Environment.id)
    ).scalar_one_or_none()
    if created is None:
        session.rollback()
        raise Conflict(f"an environment named {data.name!r} exists", problem="environment-exists")
    session.commit()
    env = session.get_one(Environment, created)
    body = _described([env])[0]
    return jsonify(body), 201, {"Location": environment_url(env.name)}


@bp.get("")
@requires(TokenScope.READ)
def list_environments() -> Response:
    """Every environment, by name, with its current version and last deployment."""
    environments = list(db_session().scalars(select(Environment).order_by(Environment.name)))
    return jsonify({"items": _described(environments)})


@bp.get("/<name>")
@requires(TokenScope.READ)
def get_environment(name: str) -> Response:
    """One environment."""
    env = db_session().scalar(select(Environment).where(Environment.name == name))
    if env is None:
        raise NotFound(f"no environment {name!r}", problem="environment-not-found")
    return jsonify(_described([env])[0])
