"""Deployments core, shared by web and worker: the contract and the environment's lock.

* **Contract.** What an environment's driver config may hold (``command``: an argument
  list with ``{feature}``, ``{version}``, ``{environment}`` placeholders and a timeout,
  never a shell string; ``webhook``: a URL and a timeout), what a version looks like, and
  the ``deployments:stats:{environment}:{period}`` cache keys.
* **One at a time per environment.** A deployment holds its environment while its status
  is ``running`` or ``rolling_back``; a partial unique index makes a second holder a
  constraint violation, whatever any process believes. Taking and releasing both lock the
  environment's row first, so a deployment that parks itself as ``waiting`` and the holder
  that releases see each other: the releaser always finds, and publishes, the next one.
  Waiting deployments start in submission order (deployment id).
* **Fencing.** The holder writes only in transactions that also renew its job's lease
  (``shared.jobs``), so a delivery whose lease lapsed cannot finish or release anything.
  A holder whose worker died keeps the environment until its job is delivered again and
  ends it (rolled back), or until the reaper fails the job and ``reconcile_finished``
  releases it.
"""

from __future__ import annotations

import re
import string
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, case, func, insert, select, update
from sqlalchemy.orm import Session

from shared.models import (
    ACTIVE_STATES,
    DEPLOYMENT_FINAL,
    DEPLOYMENT_HOLDING,
    DEPLOYMENT_WAITING,
    FINISHED_STATES,
    Deployment,
    DeploymentEvent,
    Environment,
    Feature,
    Job,
    JobState,
    TestCase,
    TestCaseStatus,
)
from shared.settings import Settings

DRIVERS = ("record", "command", "webhook")
PLACEHOLDERS = frozenset({"feature", "version", "environment"})
# A version is a label, not a command line: it starts with a letter or digit (so it can
# never turn into an option such as --kubeconfig in an argument list) and holds no spaces.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+:@/-]{0,127}$"
# Names appear in URLs, cache keys and argument lists.
ENVIRONMENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
STATS_PERIODS: dict[str, timedelta] = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
ALL_ENVIRONMENTS = "_all"  # the stats key for every environment; not a valid name
STEPS = 4  # validate, deploy, verify, record: the job's progress counts these


class CommandConfig(BaseModel):
    """``command`` driver: run ``argv`` (placeholders filled in), fail on non-zero exit."""

    model_config = ConfigDict(extra="forbid")

    argv: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 60.0

    @field_validator("argv")
    @classmethod
    def _known_placeholders(cls, argv: list[str]) -> list[str]:
        if len(argv) > 256:
            raise ValueError("at most 256 arguments")
        for arg in argv:
            try:
                fields = list(string.Formatter().parse(arg))
            except ValueError as exc:
                raise ValueError(
                    f"{arg!r}: {exc} (write a literal brace as {{{{ or }}}})"
                ) from None
            for _, name, spec, conversion in fields:
                if name is None:
                    continue
                if name not in PLACEHOLDERS or spec or conversion:
                    raise ValueError(
                        f"{arg!r}: unknown placeholder {{{name}}}; use "
                        + ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
                    )
        return argv


class WebhookConfig(BaseModel):
    """``webhook`` driver: a signed JSON POST; the signing secret comes from settings."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2048)]
    timeout_s: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 10.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url(url)


class RecordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


CONFIGS: dict[str, type[BaseModel]] = {
    "record": RecordConfig,
    "command": CommandConfig,
    "webhook": WebhookConfig,
}


def http_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ValueError otherwise."""
    if not re.match(r"^https?://[^/\s?#]+(?:[/?#]\S*)?$", url):
        raise ValueError("must be an absolute http:// or https:// URL")
    return url


def render_argv(argv: list[str], *, feature: str, version: str, environment: str) -> list[str]:
    """The argument list with its placeholders filled in; each stays one argument."""
    return [arg.format(feature=feature, version=version, environment=environment) for arg in argv]


# --- cache keys --------------------------------------------------------------------------


def stats_cache(settings: Settings) -> redis.Redis:
    """A Redis client for the stats cache, with the broker's bounded socket waits."""
    return redis.Redis.from_url(
        settings.redis_url or "",
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
    )


def stats_key(environment: str | None, period: str) -> str:
    return f"deployments:stats:{environment or ALL_ENVIRONMENTS}:{period}"


def invalidate_stats(client: redis.Redis, environments: set[str]) -> None:
    """Drop the cached stats of ``environments`` (and of all environments together)."""
    if not environments:
        return
    keys = [stats_key(env, p) for env in environments for p in STATS_PERIODS]
    client.delete(*keys, *(stats_key(None, p) for p in STATS_PERIODS))


# --- rows ------------------------------------------------------------------------------


def effective_status() -> ColumnElement[str]:
    """The deployment's status, or how its job ended when the row has not caught up yet.

    A waiting deployment cancelled over ``DELETE /api/v1/jobs/<id>`` is REVOKED at once,
    and a job whose workers all died is failed by the reaper; the deployment row follows
    at the reaper's next ``reconcile_finished``. Reads use this in the meantime.
    """
    finished = [s.value for s in FINISHED_STATES]
    return case(
        (
            Deployment.status.not_in(DEPLOYMENT_FINAL) & Job.state.in_(finished),
            case((Job.state == JobState.REVOKED.value, "cancelled"), else_="failed"),
        ),
        else_=Deployment.status,
    )


def insert_deployment(
    session: Session,
    job_id: uuid.UUID,
    *,
    feature_id: int,
    environment_id: int,
    version: str,
    force: bool,
    queued_by: str,
) -> int:
    """The deployment row of a job being submitted, in the job's inserting transaction."""
    deployment_id: int = session.execute(
        insert(Deployment)
        .values(
            job_id=job_id,
            feature_id=feature_id,
            environment_id=environment_id,
            version=version,
            status="queued",
            force=force,
            created_at=func.clock_timestamp(),
        )
        .returning(Deployment.id)
    ).scalar_one()
    add_event(session, deployment_id, "queued", "info", f"queued by {queued_by}")
    return deployment_id


def add_event(session: Session, deployment_id: int, step: str, status: str, message: str) -> None:
    """Record a step. clock_timestamp(): now() would be the transaction's start, which for
    a deployment that waited on the environment's row lock is before the holder let go."""
    session.execute(
        insert(DeploymentEvent).values(
            deployment_id=deployment_id,
            step=step,
            status=status,
            message=message,
            created_at=func.clock_timestamp(),
        )
    )


@dataclass(frozen=True)
class Blocker:
    """Why a deployment cannot take its environment yet."""

    job_id: uuid.UUID
    holds: bool  # True: it holds the environment; False: it is ahead in the line

    def describe(self, environment: str) -> str:
        relation = "held by" if self.holds else "queued behind"
        return f"waiting for environment {environment} ({relation} job {self.job_id})"


def lock_environment(session: Session, environment_id: int) -> Environment:
    """The environment's row, locked until the caller's transaction ends."""
    return session.execute(
        select(Environment)
        .where(Environment.id == environment_id)
        .with_for_update()
        # The row may have changed while we waited for its lock: reload what we hold.
        .execution_options(populate_existing=True)
    ).scalar_one()


def take_environment(session: Session, deployment: Deployment) -> Blocker | None:
    """Take the environment for ``deployment`` in the caller's transaction, or say who blocks.

    Taking sets the deployment ``running`` (step ``validate``) and remembers the version
    that ran before, for a rollback. The caller commits (with its lease renewed).
    """
    environment = lock_environment(session, deployment.environment_id)
    holder = session.execute(
        select(Deployment.job_id).where(
            Deployment.environment_id == deployment.environment_id,
            Deployment.status.in_(DEPLOYMENT_HOLDING),
            Deployment.id != deployment.id,
        )
    ).scalar_one_or_none()
    if holder is not None:
        return Blocker(holder, holds=True)
    ahead = session.execute(
        _waiting(deployment.environment_id).where(Deployment.id < deployment.id).limit(1)
    ).scalar_one_or_none()
    if ahead is not None:
        return Blocker(ahead, holds=False)
    session.execute(
        update(Deployment)
        .where(Deployment.id == deployment.id)
        .values(
            status="running",
            step="validate",
            started_at=func.clock_timestamp(),
            previous_version=environment.current_version,
        )
    )
    session.refresh(deployment)
    return None


def _waiting(environment_id: int) -> Any:
    """Job ids of the environment's deployments still in line, oldest first."""
    return (
        select(Deployment.job_id)
        .join(Job, Job.id == Deployment.job_id)
        .where(
            Deployment.environment_id == environment_id,
            Deployment.status.in_(DEPLOYMENT_WAITING),
            Job.state.in_([s.value for s in ACTIVE_STATES]),
            Job.cancel_requested.is_(False),
        )
        .order_by(Deployment.id)
    )


def next_in_line(session: Session, environment_id: int) -> uuid.UUID | None:
    """The job of the oldest deployment waiting for the environment."""
    job_id: uuid.UUID | None = session.execute(
        _waiting(environment_id).limit(1)
    ).scalar_one_or_none()
    return job_id


def close_deployment(
    session: Session,
    deployment: Deployment,
    status: Literal["succeeded", "failed", "rolled_back", "cancelled"],
    *,
    error: dict[str, Any] | None = None,
    record_version: bool = False,
) -> uuid.UUID | None:
    """End ``deployment`` and release its environment, in the caller's transaction.

    With ``record_version`` the environment's current version becomes the deployment's.
    Returns the job to publish next (the oldest waiting deployment), after the commit.
    """
    environment = lock_environment(session, deployment.environment_id)
    session.execute(
        update(Deployment)
        .where(Deployment.id == deployment.id)
        .values(status=status, step=None, error=error, finished_at=func.clock_timestamp())
    )
    if record_version:
        environment.current_version = deployment.version
        environment.current_feature_id = deployment.feature_id
    session.flush()
    session.refresh(deployment)
    return next_in_line(session, deployment.environment_id)


def reconcile_finished(session: Session) -> tuple[int, list[uuid.UUID], set[str]]:
    """Close deployments whose job ended without them (cancelled while waiting, or failed
    by the reaper after its workers kept dying); commits.

    Returns how many it closed, the jobs to publish next and the environments whose stats
    changed.
    """
    rows = session.execute(
        select(Deployment, Job.state, Job.error)
        .join(Job, Job.id == Deployment.job_id)
        .where(
            Deployment.status.not_in(DEPLOYMENT_FINAL),
            Job.state.in_([s.value for s in FINISHED_STATES]),
        )
        .order_by(Deployment.id)
        .limit(500)
    ).all()
    wake: list[uuid.UUID] = []
    environments: set[str] = set()
    for deployment, state, job_error in rows:
        held = deployment.status in DEPLOYMENT_HOLDING
        if state == JobState.REVOKED.value:
            status: Literal["failed", "cancelled"] = "cancelled"
            message = "cancelled before it started" if not held else "cancelled"
        else:
            status = "failed"
            reason = (job_error or {}).get("message") or state
            message = f"the job ended without it ({reason})"
            if held:
                message += f"; it stopped during {deployment.step}, nothing was rolled back"
        add_event(
            session, deployment.id, "cancel" if status == "cancelled" else "fail", "info", message
        )
        error = job_error or {"code": status, "message": message}
        next_job = close_deployment(session, deployment, status, error=error)
        session.commit()
        environments.add(session.get_one(Environment, deployment.environment_id).name)
        if next_job is not None:
            wake.append(next_job)
    return len(rows), wake, environments


def unpassed_test_cases(session: Session, feature_id: int, limit: int = 100) -> list[TestCase]:
    """The feature's test cases whose status is not ``passed`` (at most ``limit``)."""
    return list(
        session.scalars(
            select(TestCase)
            .where(
                TestCase.feature_id == feature_id, TestCase.status != TestCaseStatus.PASSED.value
            )
            .order_by(TestCase.id)
            .limit(limit)
        )
    )


def feature_label(feature: Feature) -> str:
    """How a feature is named to drivers and people: its external id, else its id."""
    return feature.external_id or str(feature.id)
