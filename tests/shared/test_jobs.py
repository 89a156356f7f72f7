"""Jobs core against real PostgreSQL and Redis: submit, lease fencing, attempts, reaper."""

from __future__ import annotations

import uuid
from dataclasses import fields
from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.models import Job, JobState
from shared.queue import Publisher, PublishError
from shared.settings import Settings

EXPIRED = func.clock_timestamp() - timedelta(seconds=1)


@pytest.fixture
def publisher(settings: Settings) -> Publisher:
    return Publisher(settings)


def _queue_ids(settings: Settings, queue: str = "default") -> list[str]:
    import json

    client = redis.Redis.from_url(settings.redis_url or "")
    return [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]


def test_submit_commits_then_publishes_with_job_id_as_task_id(
    session: Session, publisher: Publisher, settings: Settings
) -> None:
    sub = jobs.submit(session, publisher, "canary", {}, owner="o1")
    assert sub.created
    assert sub.job.state == JobState.PENDING
    assert sub.job.published_at is not None
    assert sub.job.publish_count == 1
    assert str(sub.job.id) in _queue_ids(settings)


def test_job_record_is_the_row_the_statements_return(
    session: Session, publisher: Publisher
) -> None:
    # JobRecord(*row) takes RETURNING's columns by position: its fields are the table's.
    assert [f.name for f in fields(jobs.JobRecord)] == [c.name for c in Job.__table__.columns]
    sub = jobs.submit(session, publisher, "canary", {"sleep_s": 1}, owner="o1")
    lease = jobs.acquire_lease(session, sub.job.id, "w1", ttl_s=60)
    assert lease is not None
    row = session.get_one(Job, sub.job.id)
    session.refresh(row)
    assert lease.job == jobs.JobRecord.of(row)
    assert lease.job.params == {"sleep_s": 1}
    assert lease.job.state == JobState.STARTED
    assert sub.job.state == JobState.PENDING
    assert sub.job.created_at == row.created_at


def test_idempotency_key_replays_and_mismatches(session: Session, publisher: Publisher) -> None:
    first = jobs.submit(
        session, publisher, "canary", {"sleep_s": 1}, owner="o1", idempotency_key="k"
    )
    again = jobs.submit(
        session, publisher, "canary", {"sleep_s": 1}, owner="o1", idempotency_key="k"
    )
    assert again.job.id == first.job.id
    assert not again.created
    with pytest.raises(jobs.IdempotencyMismatch):
        jobs.submit(session, publisher, "canary", {"sleep_s": 2}, owner="o1", idempotency_key="k")
    # Keys are per owner: another owner's identical key is a different job.
    other = jobs.submit(
        session, publisher, "canary", {"sleep_s": 1}, owner="o2", idempotency_key="k"
    )
    assert other.job.id != first.job.id


def test_publish_failure_keeps_row_and_replay_publishes(
    session: Session, publisher: Publisher, settings: Settings
) -> None:
    dead = Publisher(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    with pytest.raises(PublishError):
        jobs.submit(session, dead, "canary", {}, owner="o1", idempotency_key="retry-me")
    row = session.scalar(select(Job).where(Job.idempotency_key == "retry-me"))
    assert row is not None
    assert row.state == JobState.PENDING
    assert row.published_at is None
    # The client retries with the same key once Redis is back: the same job gets published.
    replay = jobs.submit(session, publisher, "canary", {}, owner="o1", idempotency_key="retry-me")
    assert replay.job.id == row.id
    assert replay.job.published_at is not None


def test_a_submitter_dying_before_its_publish_loses_no_job(
    session: Session, settings: Settings, publisher: Publisher
) -> None:
    """The insert marks the job published; a process that dies before the publish leaves
    it marked but unqueued, and the reaper republishes it as it does a lost message."""

    class DiesBeforePublishing(Publisher):
        def publish(self, kind: str, job_id: str, headers: dict[str, str] | None = None) -> None:
            raise SystemExit("killed between the commit and the publish")

    redis.Redis.from_url(settings.redis_url or "").delete("default")
    with pytest.raises(SystemExit):
        jobs.submit(session, DiesBeforePublishing(settings), "canary", {}, owner="o1")
    row = session.scalar(select(Job).where(Job.owner == "o1"))
    assert row is not None
    assert row.state == JobState.PENDING
    assert row.published_at is not None
    assert _queue_ids(settings) == []
    # Not before the mark is pending_republish_after_s old: it may still be on its way.
    assert jobs.reap_stale_jobs(session, publisher, republish_after_s=3600)["republished"] == 0
    counts = jobs.reap_stale_jobs(session, publisher, republish_after_s=0)
    assert counts["republished"] == 1
    assert _queue_ids(settings) == [str(row.id)]


def test_second_lease_is_refused_while_first_is_live(
    session: Session, publisher: Publisher
) -> None:
    job = jobs.submit(session, publisher, "canary", {}, owner="o").job
    first = jobs.acquire_lease(session, job.id, "w1", ttl_s=60)
    assert first is not None
    assert jobs.acquire_lease(session, job.id, "w2", ttl_s=60) is None


def test_expired_lease_is_taken_over_and_old_holder_is_fenced(
    session: Session, publisher: Publisher
) -> None:
    job = jobs.submit(session, publisher, "canary", {}, owner="o").job
    old = jobs.acquire_lease(session, job.id, "w1", ttl_s=60)
    assert old is not None
    session.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=EXPIRED))
    new = jobs.acquire_lease(session, job.id, "w2", ttl_s=60)
    assert new is not None
    assert new.token == old.token + 1
    assert new.attempt == 2
    with pytest.raises(jobs.LeaseLost):
        jobs.checkpoint(session, old, 60, jobs.progress_payload(1, 2, None))
    assert not jobs.finish(session, old, JobState.SUCCESS, result={"by": "old"})
    assert jobs.finish(session, new, JobState.SUCCESS, result={"by": "new"})
    assert session.get_one(Job, job.id).result == {"by": "new"}


def test_attempts_cap_ends_in_worker_lost(session: Session, publisher: Publisher) -> None:
    job = jobs.submit(session, publisher, "canary", {}, owner="o", max_attempts=2).job
    for holder in ("w1", "w2"):
        assert jobs.acquire_lease(session, job.id, holder, ttl_s=60) is not None
        session.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=EXPIRED))
    assert jobs.acquire_lease(session, job.id, "w3", ttl_s=60) is None
    row = session.get_one(Job, job.id)
    session.refresh(row)
    assert row.state == JobState.FAILURE
    assert row.error is not None
    assert row.error["code"] == "worker_lost"


def test_reaper_fails_exhausted_and_republishes_lost(
    session: Session, publisher: Publisher, settings: Settings
) -> None:
    lost = jobs.submit(session, publisher, "canary", {}, owner="o").job
    exhausted = jobs.submit(session, publisher, "canary", {}, owner="o", max_attempts=1).job
    assert jobs.acquire_lease(session, exhausted.id, "w", ttl_s=60) is not None
    session.execute(update(Job).where(Job.id == exhausted.id).values(lease_expires_at=EXPIRED))
    # Simulate a Redis flush: the published message is gone, published_at is old.
    session.execute(update(Job).where(Job.id == lost.id).values(published_at=Job.created_at))
    redis.Redis.from_url(settings.redis_url or "").delete("default")
    counts = jobs.reap_stale_jobs(session, publisher, republish_after_s=0)
    assert counts["failed"] == 1
    assert counts["republished"] >= 1
    assert session.get_one(Job, exhausted.id).state == JobState.FAILURE
    assert str(lost.id) in _queue_ids(settings)


def test_cancel_finished_job_conflicts(session: Session, publisher: Publisher) -> None:
    job = jobs.submit(session, publisher, "canary", {}, owner="o").job
    lease = jobs.acquire_lease(session, job.id, "w", ttl_s=60)
    assert lease is not None
    jobs.finish(session, lease, JobState.SUCCESS, result={})
    with pytest.raises(jobs.JobFinished):
        jobs.cancel(session, publisher, job)


def test_progress_payload_percent_and_eta() -> None:
    assert jobs.progress_payload(0, None, None)["percent"] is None
    p = jobs.progress_payload(50, 200, None, "reading")
    assert p == {
        "done": 50,
        "total": 200,
        "percent": 25.0,
        "eta_seconds": None,
        "message": "reading",
    }


def test_unknown_kind_is_refused(session: Session, publisher: Publisher) -> None:
    with pytest.raises(ValueError, match="unknown job kind"):
        jobs.submit(session, publisher, "nope", {}, owner="o")
    assert session.scalar(select(Job).where(Job.id == uuid.uuid4())) is None


def test_reaper_does_not_duplicate_jobs_waiting_in_a_backlog(
    session: Session, publisher: Publisher, settings: Settings
) -> None:
    redis.Redis.from_url(settings.redis_url or "").delete("default")
    waiting = [jobs.submit(session, publisher, "canary", {}, owner="o").job for _ in range(3)]
    session.execute(
        update(Job).where(Job.id.in_([j.id for j in waiting])).values(published_at=Job.created_at)
    )
    counts = jobs.reap_stale_jobs(session, publisher, republish_after_s=0)
    assert counts["republished"] == 0
    assert sorted(_queue_ids(settings)) == sorted(str(j.id) for j in waiting)
