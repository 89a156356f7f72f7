"""Helpers for deployment tests: features, environments, submissions, and reading back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from shared import jobs
from shared.db import Database
from shared.deployments import insert_deployment
from shared.models import Deployment, DeploymentEvent, Environment, Feature, Job, TestCase
from shared.queue import Publisher
from shared.settings import Settings


def make_feature(db: Database, external_id: str, test_statuses: tuple[str, ...] = ()) -> int:
    """A committed feature with one test case per status given."""
    with db.session() as s:
        feature = Feature(external_id=external_id, name=f"Feature {external_id}")
        s.add(feature)
        s.flush()
        for i, status in enumerate(test_statuses):
            s.add(
                TestCase(
                    external_id=f"{external_id}-T{i}",
                    feature_id=feature.id,
                    name=f"case {i}",
                    status=status,
                )
            )
        s.commit()
        return feature.id


def make_environment(
    db: Database,
    name: str,
    driver: str = "record",
    config: dict[str, Any] | None = None,
    *,
    health_check_url: str | None = None,
    require_passing_tests: bool = True,
    current_version: str | None = None,
) -> int:
    with db.session() as s:
        env = Environment(
            name=name,
            driver=driver,
            config=config or {},
            health_check_url=health_check_url,
            require_passing_tests=require_passing_tests,
            current_version=current_version,
        )
        s.add(env)
        s.commit()
        return env.id


def submit(
    db: Database,
    settings: Settings,
    feature_id: int,
    environment_id: int,
    version: str,
    *,
    force: bool = False,
) -> uuid.UUID:
    """Submit a deployment job as the API does (row and job in one transaction), published."""

    def on_insert(session: Any, job_id: uuid.UUID) -> None:
        insert_deployment(
            session,
            job_id,
            feature_id=feature_id,
            environment_id=environment_id,
            version=version,
            force=force,
            queued_by="tests",
        )

    params = {"feature_id": feature_id, "environment_id": environment_id, "version": version}
    with db.session() as s:
        return jobs.submit(
            s, Publisher(settings), "deployment", params, owner="tests", on_insert=on_insert
        ).job.id


@dataclass
class Seen:
    job: Job
    deployment: Deployment
    events: list[DeploymentEvent]

    @property
    def steps(self) -> list[tuple[str, str]]:
        return [(e.step, e.status) for e in self.events]

    def holding(self) -> tuple[datetime, datetime]:
        """When it took the environment and when it let go (its event interval)."""
        held = [e.created_at for e in self.events if e.step not in ("queued", "waiting")]
        return min(held), max(held)


def seen(db: Database, job_id: uuid.UUID) -> Seen:
    with db.session() as s:
        job = s.get_one(Job, job_id)
        deployment = s.scalars(select(Deployment).where(Deployment.job_id == job_id)).one()
        events = list(
            s.scalars(
                select(DeploymentEvent)
                .where(DeploymentEvent.deployment_id == deployment.id)
                .order_by(DeploymentEvent.id)
            )
        )
        return Seen(job, deployment, events)


def finished(db: Database, job_id: uuid.UUID) -> Seen | None:
    got = seen(db, job_id)
    return got if got.job.state in {"SUCCESS", "FAILURE", "REVOKED"} else None


def current_version(db: Database, environment_id: int) -> str | None:
    with db.session() as s:
        return s.get_one(Environment, environment_id).current_version
