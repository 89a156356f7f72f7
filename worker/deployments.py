"""Deployment jobs: wait for the environment, validate, deploy, verify, record; roll back.

A delivery first looks at its deployment row:

* still in line (``queued``/``waiting``): take the environment, or record whom it waits
  for, give the job back as PENDING (``jobs.park``) and end the delivery. No worker
  process sleeps on a busy environment: the holder publishes the oldest waiting
  deployment when it lets go, and the reaper republishes a waiting one whose wake-up was
  lost.
* holding (``running``/``rolling_back``): an earlier delivery died holding it (its lease
  lapsed and the reaper republished the job, or its pool process was killed). This one
  rolls back what that one may have deployed and ends the job ``worker_lost``.
* finished: the job row missed the end (the worker died between the two commits); the
  outcome recorded on the deployment is the job's.

Every write renews the job's lease in the same transaction (a fenced write), so a
delivery that lost its lease cannot record, release or roll back anything. A cancel is
honoured before each step; one that lands after deploy rolls back.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Literal, NoReturn

import redis
from celery import Task
from sqlalchemy import select, update

from shared import jobs, metrics
from shared.deployments import (
    STEPS,
    add_event,
    close_deployment,
    feature_label,
    invalidate_stats,
    stats_cache,
    take_environment,
    unpassed_test_cases,
)
from shared.models import (
    DEPLOYMENT_FINAL,
    DEPLOYMENT_HOLDING,
    Deployment,
    DeploymentEvent,
    Environment,
    Feature,
)
from shared.queue import PublishError
from worker import runtime
from worker.drivers import DeployError, Driver, Target, check_health, driver_for
from worker.tasks import JobContext, execute_job, job_task

log = logging.getLogger(__name__)

Outcome = Literal["succeeded", "failed", "rolled_back", "cancelled"]
_ROLLING_BACK = {"status": "rolling_back", "step": "rollback"}


@functools.cache
def _cache_client() -> redis.Redis:
    return stats_cache(runtime.settings())


def after_release(next_job: Any, environments: set[str]) -> None:
    """After a release committed: wake the next deployment and drop stale stats.

    Both are best effort. A lost wake-up is found by the reaper (a PENDING job not picked
    up), and stale stats expire after ``deploy_stats_ttl_s``.
    """
    if next_job is not None:
        try:
            runtime.publisher().publish("deployment", str(next_job))
        except PublishError:
            log.warning("could not publish the next deployment", extra={"next_job": str(next_job)})
    try:
        invalidate_stats(_cache_client(), environments)
    except redis.RedisError:
        log.warning("could not invalidate deployment stats", exc_info=True)


class Deployer:
    """One delivery of one deployment job."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.session = ctx.session
        self.settings = ctx.settings
        deployment = self.session.scalar(select(Deployment).where(Deployment.job_id == ctx.job.id))
        if deployment is None:
            raise jobs.JobFailed("deployment_missing", "the job has no deployment row")
        self.deployment = deployment
        self.environment = self.session.get_one(Environment, deployment.environment_id)
        self.feature = self.session.get_one(Feature, deployment.feature_id)
        self.deployed = False  # whether the new version may have reached the environment
        self._last_beat = time.monotonic()
        # Ends the read-only transaction: holding it open would pin a snapshot for nothing.
        self.session.commit()

    # --- fenced writes ---------------------------------------------------------------

    def _renew(self) -> bool:
        """Renew the lease in the open transaction; returns whether a cancel was asked.

        Raises LeaseLost (after rolling back) when another delivery holds the job now.
        """
        lease = self.ctx.lease
        row = (
            self.session.connection()
            .exec_driver_sql(
                jobs.renew_lease_sql(progress="jobs.progress"),
                {
                    "job": str(lease.job_id),
                    "token": lease.token,
                    "holder": lease.holder,
                    "ttl": self.settings.job_lease_s,
                },
            )
            .one_or_none()
        )
        if row is None:
            self.session.rollback()
            raise jobs.LeaseLost(f"job {lease.job_id}: lease {lease.token} is no longer current")
        return bool(row[0])

    def heartbeat(self) -> None:
        """Keep the lease while a driver waits (a cancel waits for the step to end)."""
        if time.monotonic() - self._last_beat < max(0.2, self.settings.job_lease_s / 4):
            return
        self._renew()
        self.session.commit()
        self._last_beat = time.monotonic()

    def event(
        self, step: str, status: str, message: str, columns: dict[str, Any] | None = None
    ) -> None:
        """A fenced write: the event (and any deployment ``columns``), committed."""
        self._renew()
        add_event(self.session, self.deployment.id, step, status, message)
        if columns:
            self.session.execute(
                update(Deployment).where(Deployment.id == self.deployment.id).values(**columns)
            )
        self.session.commit()
        log.info("deployment step", extra={"step": step, "status": status})

    def begin(self, step: str, done: int, message: str) -> None:
        """Start a step: a checkpoint (raises JobCancelled if asked), its event, committed."""
        payload = jobs.progress_payload(done, STEPS, self.ctx.job.started_at, message)
        jobs.checkpoint(
            self.session, self.ctx.lease, self.settings.job_lease_s, payload, commit=False
        )
        add_event(self.session, self.deployment.id, step, "started", message)
        self.session.execute(
            update(Deployment).where(Deployment.id == self.deployment.id).values(step=step)
        )
        self.session.commit()
        self._last_beat = time.monotonic()

    def close(
        self,
        outcome: Outcome,
        event: tuple[str, str, str],
        *,
        error: dict[str, str] | None = None,
        record_version: bool = False,
    ) -> None:
        """End the deployment and release the environment (fenced), then wake the next."""
        self._renew()
        add_event(self.session, self.deployment.id, *event)
        next_job = close_deployment(
            self.session, self.deployment, outcome, error=error, record_version=record_version
        )
        self.session.commit()
        self.ctx.partial_result = self.summary()
        log.info("deployment ended", extra={"outcome": outcome})
        metrics.DEPLOYMENTS.labels(self.environment.name, outcome).inc()
        after_release(next_job, {self.environment.name})

    # --- the delivery ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        status = self.deployment.status
        if status in DEPLOYMENT_FINAL:
            return self.replay()
        if status in DEPLOYMENT_HOLDING:
            return self.recover()
        self.take_or_wait()
        try:
            return self.steps()
        except jobs.JobCancelled:
            self.cancelled()
            raise

    def take_or_wait(self) -> None:
        """Hold the environment, or park the job as waiting (raises JobWaiting)."""
        try:
            jobs.checkpoint(self.session, self.ctx.lease, self.settings.job_lease_s, commit=False)
        except jobs.JobCancelled:
            self.close("cancelled", ("cancel", "info", "cancelled before it started"))
            raise
        blocker = take_environment(self.session, self.deployment)
        if blocker is None:
            self.session.commit()
            return
        message = blocker.describe(self.environment.name)
        last = self.session.scalar(
            select(DeploymentEvent.message)
            .where(DeploymentEvent.deployment_id == self.deployment.id)
            .order_by(DeploymentEvent.id.desc())
            .limit(1)
        )
        if last != message:  # one event per change of blocker, not one per wake-up
            add_event(self.session, self.deployment.id, "waiting", "info", message)
        self.session.execute(
            update(Deployment).where(Deployment.id == self.deployment.id).values(status="waiting")
        )
        jobs.park(self.session, self.ctx.lease, jobs.progress_payload(0, STEPS, None, message))
        if not blocker.holds:
            # Free, but an older deployment is in line: make sure it is on its way.
            after_release(blocker.job_id, set())
        raise jobs.JobWaiting(message)

    def target(self, version: str, action: str) -> Target:
        return Target(
            deployment_id=self.deployment.id,
            job_id=str(self.deployment.job_id),
            feature=feature_label(self.feature),
            environment=self.environment.name,
            version=version,
            previous_version=self.deployment.previous_version,
            action=action,
        )

    def steps(self) -> dict[str, Any]:
        d, env = self.deployment, self.environment
        label = feature_label(self.feature)
        self.begin("validate", 0, f"validate: feature {label}, version {d.version}")
        if d.force or not env.require_passing_tests:
            why = "forced" if d.force else f"{env.name} does not require passing tests"
            self.event("validate", "succeeded", f"test cases not checked ({why})")
        else:
            unpassed = unpassed_test_cases(self.session, self.feature.id)
            if unpassed:
                listed = ", ".join(f"{tc.external_id or tc.id} ({tc.status})" for tc in unpassed)
                message = f"test cases not passed: {listed}"
                self.close(
                    "failed",
                    ("validate", "failed", message),
                    error=_error("validation_failed", message),
                )
                raise jobs.JobFailed("validation_failed", message)
            self.event("validate", "succeeded", f"feature {label}: every test case passed")

        driver = driver_for(env.driver, env.config, self.settings)
        was = d.previous_version or "nothing"
        self.begin("deploy", 1, f"deploy: {d.version} to {env.name} ({env.driver}; was {was})")
        self.deployed = True  # from here on, something may have changed out there
        try:
            report = driver.deploy(self.target(d.version, "deploy"), self.heartbeat)
        except DeployError as exc:
            self.roll_back(driver, "deploy", "deploy_failed", str(exc))
        self.event("deploy", "succeeded", report)

        self.begin("verify", 2, f"verify: {env.health_check_url or 'no health check'}")
        if env.health_check_url:
            try:
                report = check_health(env.health_check_url, self.settings, self.heartbeat)
            except DeployError as exc:
                self.roll_back(driver, "verify", "verify_failed", str(exc))
            self.event("verify", "succeeded", report)
        else:
            self.event("verify", "skipped", "the environment has no health-check URL")

        self.begin("record", 3, f"record: {env.name} runs {d.version}")
        self.close(
            "succeeded",
            ("record", "succeeded", f"{env.name} now runs {d.version} (was {was})"),
            record_version=True,
        )
        return self.summary()

    def roll_back(self, driver: Driver, step: str, code: str, failure: str) -> NoReturn:
        """``step`` failed: put the previous version back, end the job FAILURE (raises)."""
        self.event(step, "failed", failure, _ROLLING_BACK)
        code, message = self.rollback_outcome(driver, f"{step} failed: {_headline(failure)}", code)
        raise jobs.JobFailed(code, message)

    def rollback_outcome(
        self, driver: Driver, reason: str, code: str, ended: Outcome = "rolled_back"
    ) -> tuple[str, str]:
        """Re-deploy the previous version through ``driver`` and close the deployment as
        ``ended`` (``failed`` if it cannot be rolled back); returns (code, message)."""
        previous = self.deployment.previous_version
        if previous is None:
            message = f"{reason}; nothing to roll back to (no previous version)"
            self.close(
                "cancelled" if ended == "cancelled" else "failed",
                ("rollback", "skipped", "no previous version"),
                error=_error(code, message),
            )
            return code, message
        self.event("rollback", "started", f"rolling back to {previous}")
        try:
            report = driver.deploy(self.target(previous, "rollback"), self.heartbeat)
        except DeployError as exc:
            message = f"{reason}; rollback to {previous} failed: {_headline(str(exc))}"
            self.close(
                "failed", ("rollback", "failed", str(exc)), error=_error("rollback_failed", message)
            )
            return "rollback_failed", message
        message = f"{reason}; rolled back to {previous}"
        self.close(ended, ("rollback", "succeeded", report), error=_error(code, message))
        return code, message

    def cancelled(self) -> None:
        """A cancel landed before a step: roll back what was deployed, then close."""
        if self.deployment.status in DEPLOYMENT_FINAL:
            return
        if not self.deployed:
            self.close("cancelled", ("cancel", "info", "cancelled before anything was deployed"))
            return
        self.event("cancel", "info", "cancelled after deploy", _ROLLING_BACK)
        driver = driver_for(self.environment.driver, self.environment.config, self.settings)
        code, message = self.rollback_outcome(driver, "cancelled", "cancelled", "cancelled")
        if code == "rollback_failed":
            raise jobs.JobFailed(code, message)

    def recover(self) -> dict[str, Any]:
        """The delivery that held the environment died; end what it left (raises)."""
        d = self.deployment
        step = d.step or "deploy"
        reason = f"the worker running this deployment stopped during {step}"
        if step == "validate":
            message = f"{reason}; nothing was deployed"
            self.close("failed", ("recover", "info", message), error=_error("worker_lost", message))
            raise jobs.JobFailed("worker_lost", message)
        self.event("recover", "info", reason, _ROLLING_BACK)
        driver = driver_for(self.environment.driver, self.environment.config, self.settings)
        code, message = self.rollback_outcome(driver, reason, "worker_lost")
        raise jobs.JobFailed(code, message)

    def replay(self) -> dict[str, Any]:
        """The deployment ended but its job did not hear of it: report the same outcome."""
        d = self.deployment
        if d.status == "succeeded":
            return self.summary()
        if d.status == "cancelled":
            raise jobs.JobCancelled(f"deployment {d.id} was cancelled")
        error = d.error or {}
        raise jobs.JobFailed(str(error.get("code", "failed")), str(error.get("message", d.status)))

    def summary(self) -> dict[str, Any]:
        d = self.deployment
        duration = None
        if d.started_at is not None and d.finished_at is not None:
            duration = round((d.finished_at - d.started_at).total_seconds(), 3)
        return {
            "deployment_id": d.id,
            "environment": self.environment.name,
            "feature": feature_label(self.feature),
            "version": d.version,
            "previous_version": d.previous_version,
            "status": d.status,
            "duration_s": duration,
        }


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _headline(text: str) -> str:
    """The first line of a driver's report (the rest, its output, is in the event)."""
    return text.strip().splitlines()[0] if text.strip() else text


def run_deployment(ctx: JobContext) -> dict[str, Any]:
    """The deployment job's body (see the module docstring)."""
    return Deployer(ctx).run()


# Long enough for a command's deploy and its rollback (each at most an hour) and verify.
@job_task("conveyor.deployments.run", soft_time_limit=3 * 3600, time_limit=3 * 3600 + 60)
def deployment(self: Task, job_id: str) -> None:
    execute_job(self, job_id, run_deployment)
