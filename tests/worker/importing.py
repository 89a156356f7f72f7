"""Helpers for import tests: store a file and an import job, run the pipeline directly."""

from __future__ import annotations

import gzip
import time
import uuid
from typing import Any

from sqlalchemy import func, select, text

from shared import jobs, storage
from shared.db import Database
from shared.models import Feature, ImportError_, ImportRun, Job, JobState, TestCase, Upload
from shared.queue import Publisher
from shared.settings import Settings


def create_import(
    db: Database,
    settings: Settings,
    data: bytes,
    *,
    target: str = "features",
    fmt: str = "csv",
    max_errors: int = 1000,
    key: str | None = None,
) -> uuid.UUID:
    """Store ``data`` as an upload and submit an import job for it (published)."""
    with db.session() as s:
        stored = storage.write_stream(s, [data], 1 << 34)
        upload = Upload(
            id=uuid.uuid4(),
            oid=stored.oid,
            size_bytes=stored.size,
            sha256=stored.sha256,
            compression=stored.compression,
            content_type="text/csv",
            owner="tests",
        )
        s.add(upload)

        def on_insert(sess: Any, job_id: uuid.UUID) -> None:
            sess.add(
                ImportRun(
                    job_id=job_id,
                    upload_id=upload.id,
                    target=target,
                    format=fmt,
                    max_errors=max_errors,
                    size_bytes=stored.size,
                    sha256=stored.sha256,
                )
            )

        params = {
            "target": target,
            "format": fmt,
            "max_errors": max_errors,
            "sha256": stored.sha256,
        }
        sub = jobs.submit(
            s,
            Publisher(settings),
            "import",
            params,
            owner="tests",
            idempotency_key=key,
            on_insert=on_insert,
        )
        return sub.job.id


def run_directly(db: Database, settings: Settings, job_id: uuid.UUID) -> Job:
    """Run the import in this process, as the task would, and return the finished job."""
    from worker.imports import run_import
    from worker.tasks import JobContext

    with db.session() as s:
        lease = jobs.acquire_lease(s, job_id, f"tests/{uuid.uuid4().hex[:6]}", 60)
        assert lease is not None
        job = s.get_one(Job, job_id)
        ctx = JobContext(s, lease, job, settings, time.monotonic())
        try:
            result = run_import(ctx)
        except jobs.JobFailed as exc:
            s.rollback()
            jobs.finish(
                s,
                lease,
                JobState.FAILURE,
                result=ctx.partial_result,
                error={"code": exc.code, "message": exc.message},
            )
        else:
            jobs.finish(s, lease, JobState.SUCCESS, result=result)
        s.expire_all()
        return s.get_one(Job, job_id)


def errors_of(db: Database, job_id: uuid.UUID) -> list[tuple[int, str | None, str]]:
    with db.session() as s:
        rows = s.execute(
            select(ImportError_.line, ImportError_.column, ImportError_.reason)
            .where(ImportError_.job_id == job_id)
            .order_by(ImportError_.line)
        ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]


def count(db: Database, model: type[Feature] | type[TestCase] = Feature) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def run_record(db: Database, job_id: uuid.UUID) -> ImportRun:
    with db.session() as s:
        return s.get_one(ImportRun, job_id)


def stored_file(db: Database, job_id: str) -> tuple[Job, ImportRun, Upload, bytes]:
    """The job, its import row, its upload row and the file as uploaded.

    The large object's bytes are read in SQL and inflated here with the standard library,
    not through ``shared.storage``: the test checks what is really stored.
    """
    with db.session() as s:
        job = s.get_one(Job, uuid.UUID(job_id))
        run = s.get_one(ImportRun, job.id)
        upload = s.get_one(Upload, run.upload_id)
        data = bytes(s.execute(text("SELECT lo_get(:oid)"), {"oid": upload.oid}).scalar_one())
    assert upload.compression == "gzip"
    return job, run, upload, gzip.decompress(data)
