"""SQLAlchemy 2 typed models for the whole data model.

Alembic migrations under ``shared/migrations`` create these tables; a test checks the two
agree, so a model change without a migration fails the suite.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, uuid.UUID: UUID(as_uuid=True)}


IMPORT_JOB_DEFAULT = text("NULLIF(current_setting('conveyor.import_job', true), '')::uuid")


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class JobState(enum.StrEnum):
    """Celery's state names, so users and Flower speak the same words."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    PROGRESS = "PROGRESS"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


ACTIVE_STATES = frozenset({JobState.PENDING, JobState.STARTED, JobState.PROGRESS, JobState.RETRY})
FINISHED_STATES = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.REVOKED})


class TokenScope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class FeatureStatus(enum.StrEnum):
    """The seed's statuses (``in_progress`` among them)."""

    PLANNED = "planned"
    IN_PROGRESS = "in_progress"
    TESTING = "testing"
    DONE = "done"
    CANCELLED = "cancelled"


class TestCaseStatus(enum.StrEnum):
    __test__ = False  # not a pytest test class

    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


class Job(Base):
    """One unit of asynchronous work; the row is the source of truth for its status."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_state_created_at", "state", "created_at"),
        Index("ix_jobs_owner_created_at", "owner", "created_at"),
        CheckConstraint("attempts >= 0", name="ck_jobs_attempts"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    owner: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Lease: the worker that runs the job, a fencing token bumped on every acquisition,
    # and when the lease lapses unless renewed (the reaper looks at this).
    locked_by: Mapped[str | None] = mapped_column(String(255))
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class ApiToken(Base):
    """A bearer token; only HMAC-SHA256(pepper, token) is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = _now()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Feature(Base):
    __tablename__ = "features"
    __table_args__ = (
        # The seed's index: list by status, newest first.
        Index("ix_features_status_created_at", "status", text("created_at DESC")),
        Index("ix_features_created_at", text("created_at DESC")),
        CheckConstraint("complexity_points >= 0", name="ck_features_complexity_points"),
    )
    # An UPDATE brings back ``updated_at`` (its onupdate now()) with RETURNING: a PATCH
    # answers without reading the row again after its commit.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default=FeatureStatus.PLANNED)
    complexity_points: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _now()
    # The import that last wrote this row (NULL for API writes): filled by the column
    # default from the chunk transaction's ``SET LOCAL conveyor.import_job``, so COPY needs
    # no extra column.
    last_import_job_id: Mapped[uuid.UUID | None] = mapped_column(server_default=IMPORT_JOB_DEFAULT)
    # The file line that import last wrote this row from: chunks commit in parallel, and
    # an earlier line never overwrites a later one of the same import (the last one wins).
    last_import_line: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    test_cases: Mapped[list[TestCase]] = relationship(back_populates="feature")


class TestCase(Base):
    __tablename__ = "test_cases"
    __test__ = False
    __table_args__ = (Index("ix_test_cases_feature_id", "feature_id"),)
    __mapper_args__ = {"eager_defaults": True}  # as Feature's

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), default=TestCaseStatus.PENDING)
    created_at: Mapped[datetime] = _now()
    last_import_job_id: Mapped[uuid.UUID | None] = mapped_column(server_default=IMPORT_JOB_DEFAULT)
    # The file line that import last wrote this row from: chunks commit in parallel, and
    # an earlier line never overwrites a later one of the same import (the last one wins).
    last_import_line: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    feature: Mapped[Feature] = relationship(back_populates="test_cases")


def _counts_table(name: str) -> Table:
    # Delta rows, written only by the counted table's triggers (migration 0006), folded by
    # shared.counts.compact; sum(n) by status is the exact count (shared.counts.total).
    return Table(
        name,
        Base.metadata,
        Column("status", String(32), nullable=False),
        Column("n", BigInteger, nullable=False),
    )


feature_counts = _counts_table("feature_counts")
test_case_counts = _counts_table("test_case_counts")


class Environment(Base):
    __tablename__ = "environments"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    driver: Mapped[str] = mapped_column(String(32), default="record")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    health_check_url: Mapped[str | None] = mapped_column(String(2048))
    require_passing_tests: Mapped[bool] = mapped_column(Boolean, default=True)
    current_version: Mapped[str | None] = mapped_column(String(255))
    current_feature_id: Mapped[int | None] = mapped_column(
        ForeignKey("features.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


# A deployment's status. Waiting ones queue for their environment; a holding one owns it
# (the partial unique index below lets the database, not a lock in some process, say that
# at most one does); final ones are history.
DEPLOYMENT_WAITING = ("queued", "waiting")
DEPLOYMENT_HOLDING = ("running", "rolling_back")
DEPLOYMENT_FINAL = ("succeeded", "failed", "rolled_back", "cancelled")
_HOLDING_SQL = text("status IN ('running', 'rolling_back')")


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        Index("ix_deployments_environment_created_at", "environment_id", "created_at"),
        Index("ix_deployments_feature_id", "feature_id"),
        Index(
            "uq_deployments_environment_holding",
            "environment_id",
            unique=True,
            postgresql_where=_HOLDING_SQL,
        ),
        Index("ix_deployments_environment_finished_at", "environment_id", "finished_at"),
        CheckConstraint(
            "status IN ('queued', 'waiting', 'running', 'rolling_back', "
            "'succeeded', 'failed', 'rolled_back', 'cancelled')",
            name="ck_deployments_status",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="RESTRICT"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id", ondelete="RESTRICT"))
    version: Mapped[str] = mapped_column(String(255))
    previous_version: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), default="queued")
    # The step a holding deployment is in (validate, deploy, verify, rollback): a delivery
    # that finds its predecessor died knows whether anything needs rolling back.
    step: Mapped[str | None] = mapped_column(String(32))
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    events: Mapped[list[DeploymentEvent]] = relationship(
        back_populates="deployment", order_by="DeploymentEvent.id"
    )


class DeploymentEvent(Base):
    __tablename__ = "deployment_events"
    __table_args__ = (Index("ix_deployment_events_deployment_id", "deployment_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = _now()

    deployment: Mapped[Deployment] = relationship(back_populates="events")


class ImportError_(Base):
    """A rejected import row: where it was and why."""

    __tablename__ = "import_errors"
    __table_args__ = (Index("ix_import_errors_job_id_line", "job_id", "line"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(BigInteger)
    column: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    excerpt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


class Upload(Base):
    """An uploaded file, kept in a PostgreSQL large object every worker host can read."""

    __tablename__ = "uploads"
    __table_args__ = (Index("ix_uploads_created_at", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    oid: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    # How the large object holds the file: "gzip" (the default since migration 0005) or "identity".
    compression: Mapped[str] = mapped_column(String(16), server_default="identity")
    filename: Mapped[str | None] = mapped_column(String(255))
    owner: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportRun(Base):
    """An import job's file, target, checkpoint and counters (one row per import job).

    The checkpoint (``byte_offset``, ``line``) and the counters are updated in the same
    transaction as each chunk's rows, so they always describe exactly what is committed.
    """

    __tablename__ = "imports"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    upload_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("uploads.id", ondelete="SET NULL")
    )
    target: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(16))
    max_errors: Mapped[int] = mapped_column(Integer, default=1000)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    header: Mapped[dict[str, Any] | None]  # CSV columns, kept so a resume can skip the header
    byte_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    line: Mapped[int] = mapped_column(BigInteger, default=0)
    # The last chunk of the unbroken run of committed chunks from the start: byte_offset
    # and line are where that run ends, so a resume starts there.
    head_chunk: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    rows_read: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_inserted: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_updated: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_unchanged: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_duplicate: Mapped[int] = mapped_column(BigInteger, default=0)
    busy_s: Mapped[float] = mapped_column(default=0.0)  # time spent working, over all slices
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportChunk(Base):
    """A committed chunk of an import: where it ends in the file.

    Chunks commit in parallel (several writers), so "everything up to here is in" is the
    end of the unbroken run of committed chunks; a resume re-reads from there and skips
    the chunks already listed here. Chunk 0 is the header.
    """

    __tablename__ = "import_chunks"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("imports.job_id", ondelete="CASCADE"), primary_key=True
    )
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    end_offset: Mapped[int] = mapped_column(BigInteger)
    end_line: Mapped[int] = mapped_column(BigInteger)
