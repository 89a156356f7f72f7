"""The bulk-import pipeline: stream the upload, validate each row, write 1000-row chunks.

``run_import(ctx)`` reads the file from its large object starting at the import's last
checkpoint, so a redelivered, reaped or continued job resumes exactly where the last
committed chunk ended. Each chunk is ONE transaction holding:

1. the lease check (``jobs.checkpoint``: fencing token still ours, job not cancelled),
2. the rows: a plain ``COPY`` into the table when none of them exists yet (the common
   case, close to COPY speed), else ``COPY`` into a staging table and an
   ``INSERT … ON CONFLICT (external_id) DO UPDATE`` that only touches rows that changed,
3. the chunk's rejected rows (``import_errors``, with line, column, reason, excerpt),
4. the checkpoint (byte offset, line) and counters in ``imports``, and the job's progress.

So a chunk lands exactly once: a crash before COMMIT leaves nothing of it, a crash after
leaves it and its checkpoint together. Rows are de-duplicated inside a chunk (the last
occurrence of an ``external_id`` wins) so the upsert cannot hit a cardinality error.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from celery import Task
from psycopg2.extras import Json, execute_values
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from shared import jobs, storage
from shared.importspec import CHUNK_ROWS, TARGETS
from shared.models import ImportRun, Upload
from worker.readers import CsvReader, NdjsonReader, Record, excerpt
from worker.rows import VALIDATORS, Refused, Row, compile_csv_validator
from worker.tasks import JobContext, execute_job, job_task

log = logging.getLogger(__name__)

ErrorRow = tuple[int, str | None, str, str]  # (line, column, reason, excerpt)
# After a chunk needed the upsert, try plain COPY again only every few chunks: a file
# re-imported over existing rows would otherwise pay for a failed COPY on every chunk.
FAST_PATH_RETRY_EVERY = 8

_FEATURE_COLUMNS = "external_id, name, description, status, complexity_points, created_at"
_TEST_CASE_COLUMNS = "external_id, feature_id, name, status"

_STAGE_DDL = {
    "features": (
        "CREATE TEMP TABLE IF NOT EXISTS import_stage_features (external_id text, "
        "name text, description text, status text, complexity_points integer, "
        "created_at timestamptz) ON COMMIT DELETE ROWS"
    ),
    "test_cases": (
        "CREATE TEMP TABLE IF NOT EXISTS import_stage_test_cases (external_id text, "
        "feature_id bigint, name text, status text) ON COMMIT DELETE ROWS"
    ),
}

# Insert new rows, update changed ones, leave identical ones alone (the table does not
# change when the same file comes again). `seen` counts rows an earlier chunk of this
# same import already wrote: duplicates across chunks.
_UPSERT = {
    "features": """
WITH src AS (
    SELECT s.*, f.created_at AS old_created_at,
           f.last_import_job_id IS NOT DISTINCT FROM %(job)s::uuid AS seen
    FROM import_stage_features s LEFT JOIN features f USING (external_id)
), up AS (
    INSERT INTO features AS f (external_id, name, description, status, complexity_points,
                               created_at)
    SELECT external_id, name, description, status, complexity_points,
           COALESCE(created_at, old_created_at, now())
    FROM src
    ON CONFLICT (external_id) DO UPDATE SET
        name = EXCLUDED.name, description = EXCLUDED.description, status = EXCLUDED.status,
        complexity_points = EXCLUDED.complexity_points, created_at = EXCLUDED.created_at,
        updated_at = now(), last_import_job_id = EXCLUDED.last_import_job_id
    WHERE (f.name, f.description, f.status, f.complexity_points, f.created_at)
          IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.description, EXCLUDED.status,
                            EXCLUDED.complexity_points, EXCLUDED.created_at)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
       (SELECT count(*) FROM src WHERE seen)
FROM up
""",
    "test_cases": """
WITH src AS (
    SELECT s.*, t.last_import_job_id IS NOT DISTINCT FROM %(job)s::uuid AS seen
    FROM import_stage_test_cases s LEFT JOIN test_cases t USING (external_id)
), up AS (
    INSERT INTO test_cases AS t (external_id, feature_id, name, status)
    SELECT external_id, feature_id, name, status FROM src
    ON CONFLICT (external_id) DO UPDATE SET
        feature_id = EXCLUDED.feature_id, name = EXCLUDED.name, status = EXCLUDED.status,
        updated_at = now(), last_import_job_id = EXCLUDED.last_import_job_id
    WHERE (t.feature_id, t.name, t.status)
          IS DISTINCT FROM (EXCLUDED.feature_id, EXCLUDED.name, EXCLUDED.status)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
       (SELECT count(*) FROM src WHERE seen)
FROM up
""",
}

# The chunk's last statement: renew the lease (the fencing check: this transaction writes
# only if the token is still ours) and record the checkpoint and counters with it.
_CHECKPOINT = f"""
WITH lease AS ({jobs.RENEW_LEASE_SQL}), checkpoint AS (
    UPDATE imports SET byte_offset = %(offset)s, line = %(line)s, chunks = %(c_chunks)s,
        rows_read = %(c_read)s, rows_inserted = %(c_inserted)s, rows_updated = %(c_updated)s,
        rows_unchanged = %(c_unchanged)s, rows_rejected = %(c_rejected)s,
        rows_duplicate = %(c_duplicate)s, busy_s = %(c_busy_s)s
    WHERE job_id = %(job)s AND EXISTS (SELECT FROM lease WHERE NOT cancel_requested)
)
SELECT cancel_requested FROM lease
"""  # noqa: S608 - composed of constants only; every value is a bound parameter


@dataclass
class Counters:
    """What the import has committed so far (mirrors the ``imports`` row)."""

    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    duplicate: int = 0
    chunks: int = 0
    busy_s: float = 0.0

    @classmethod
    def of(cls, run: ImportRun) -> Counters:
        return cls(
            run.rows_read,
            run.rows_inserted,
            run.rows_updated,
            run.rows_unchanged,
            run.rows_rejected,
            run.rows_duplicate,
            run.chunks,
            run.busy_s,
        )


@dataclass
class Chunk:
    """Records collected since the last commit."""

    rows: dict[str, Row] = field(default_factory=dict)  # external_id → last occurrence
    lines: dict[str, int] = field(default_factory=dict)  # external_id → its line
    errors: list[ErrorRow] = field(default_factory=list)
    read: int = 0
    duplicate: int = 0  # occurrences replaced by a later one inside this chunk

    def add(self, record: Record, validate: Any, reader: Any) -> None:
        self.read += 1
        if record.error is not None:
            column, reason = record.error
            self.errors.append((record.line, column, reason, record.excerpt))
            return
        try:
            row = validate(record.values)
        except Refused as exc:
            value = reader.value(record.values, exc.column)
            shown = excerpt(str(value)) if value is not None else ""
            self.errors.append((record.line, exc.column, exc.reason, shown))
            return
        key = row[0]
        if key in self.rows:
            self.duplicate += 1
            del self.rows[key]  # keep file order: the last occurrence goes to the end
        self.rows[key] = row
        self.lines[key] = record.line

    @property
    def full(self) -> bool:
        return len(self.rows) + self.duplicate >= CHUNK_ROWS or len(self.errors) >= CHUNK_ROWS


def _copy(cursor: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """COPY ``rows`` as CSV; None becomes an unquoted empty field, which COPY reads as NULL."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    # One read of the whole buffer: each read re-takes the GIL from the reading thread.
    cursor.copy_expert(sql, io.BytesIO(data), size=len(data) or 1)


class ChunkWriter:
    """Writes one chunk per transaction on a connection of its own (see module docstring).

    A raw psycopg2 connection held for the whole import: four round trips a chunk (set-up
    and savepoint, COPY, checkpoint with the lease check, COMMIT), no pool checkout or
    pre-ping per chunk. That is what keeps a 1000-row transaction close to COPY's speed.
    """

    def __init__(self, ctx: JobContext, run: ImportRun, counters: Counters, engine: Engine) -> None:
        self.ctx = ctx
        self.run = run
        self.target = run.target
        self.counters = counters
        self.job_id = str(run.job_id)
        self.fast_path_cooldown = 0
        self.fault = Fault.from_settings(ctx)
        self.connection = engine.raw_connection()
        # Busy time runs from the start of this delivery: reading and validating count.
        self.mark = time.perf_counter()

    def close(self) -> None:
        """Roll back anything unfinished and give the connection back to the pool."""
        with contextlib.suppress(Exception):
            self.connection.rollback()
        self.connection.close()

    def write(self, chunk: Chunk, offset: int, line: int) -> None:
        """Commit ``chunk`` with the checkpoint (offset, line); raises LeaseLost/JobCancelled."""
        conn = self.connection
        try:
            self._write(conn.cursor(), chunk, offset, line)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        if self.fault:
            self.fault.maybe_crash("after_commit", self.counters.chunks)

    def _write(self, cursor: Any, chunk: Chunk, offset: int, line: int) -> None:
        c = self.counters
        # SET LOCAL, all three: the job id fills last_import_job_id by column default;
        # naive timestamps mean UTC as in validation; and COMMIT need not wait for the
        # WAL flush. That last one is safe because a chunk and its checkpoint are one
        # transaction: a chunk lost in a server crash is lost with its checkpoint and is
        # simply read again; never half of it, never twice.
        cursor.execute(
            "SELECT set_config('conveyor.import_job', %s, true),"
            " set_config('TimeZone', 'UTC', true),"
            " set_config('synchronous_commit', 'off', true)",
            (self.job_id,),
        )
        rows = list(chunk.rows.values())
        errors = chunk.errors
        if self.target == "test_cases":
            rows, refused = self._resolve_features(cursor, rows, chunk.lines)
            errors = errors + refused
        inserted, updated, seen = self._write_rows(cursor, rows)
        if errors:
            execute_values(
                cursor,
                'INSERT INTO import_errors (job_id, line, "column", reason, excerpt) VALUES %s',
                [(self.job_id, *e) for e in errors],
                page_size=len(errors),
            )
        number = c.chunks + 1
        if self.fault:
            self.fault.maybe_crash("after_copy", number)
        now = time.perf_counter()
        after = Counters(
            read=c.read + chunk.read,
            inserted=c.inserted + inserted,
            updated=c.updated + updated,
            unchanged=c.unchanged + len(rows) - inserted - updated,
            rejected=c.rejected + len(errors),
            duplicate=c.duplicate + chunk.duplicate + seen,
            chunks=number,
            busy_s=c.busy_s + (now - self.mark),
        )
        progress = jobs.progress_payload(
            offset, self.run.size_bytes or None, self.ctx.job.started_at, f"{after.read} rows"
        )
        progress.update(
            rows=after.read,
            rows_per_s=round(after.read / after.busy_s) if after.busy_s > 0 else None,
        )
        lease = self.ctx.lease
        cursor.execute(
            _CHECKPOINT,
            {
                "job": self.job_id,
                "token": lease.token,
                "holder": lease.holder,
                "ttl": self.ctx.settings.job_lease_s,
                "progress": Json(progress),
                "offset": offset,
                "line": line,
                **{f"c_{k}": v for k, v in vars(after).items()},
            },
        )
        jobs.raise_for_lease(lease, cursor.fetchone())
        # Only now, with the lease confirmed in this transaction, do the counters move.
        vars(c).update(vars(after))
        self.mark = now

    def _resolve_features(
        self, cursor: Any, rows: list[Row], lines: dict[str, int]
    ) -> tuple[list[Row], list[ErrorRow]]:
        """Swap feature_external_id for feature_id; rows naming no feature are refused."""
        wanted = list({r[1] for r in rows})
        cursor.execute(
            "SELECT external_id, id FROM features WHERE external_id = ANY(%s)", (wanted,)
        )
        ids = dict(cursor.fetchall())
        resolved: list[Row] = []
        refused: list[ErrorRow] = []
        for external_id, feature_external_id, name, status in rows:
            feature_id = ids.get(feature_external_id)
            if feature_id is None:
                refused.append(
                    (
                        lines[external_id],
                        "feature_external_id",
                        f"no feature has external_id {feature_external_id!r:.80}",
                        excerpt(str(feature_external_id)),
                    )
                )
            else:
                resolved.append((external_id, feature_id, name, status))
        return resolved, refused

    def _write_rows(self, cursor: Any, rows: list[Row]) -> tuple[int, int, int]:
        """(inserted, updated, seen-earlier-in-this-import) for the chunk's rows."""
        if not rows:
            return 0, 0, 0
        table, columns = (
            ("features", _FEATURE_COLUMNS)
            if self.target == "features"
            else ("test_cases", _TEST_CASE_COLUMNS)
        )
        if self.fast_path_cooldown == 0:
            cursor.execute("SAVEPOINT conveyor_fast")
            try:
                _copy(
                    cursor,
                    f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)",
                    self._with_defaults(rows),
                )
            except psycopg2.errors.UniqueViolation:
                cursor.execute("ROLLBACK TO SAVEPOINT conveyor_fast")
                self.fast_path_cooldown = FAST_PATH_RETRY_EVERY
            else:
                cursor.execute("RELEASE SAVEPOINT conveyor_fast")
                return len(rows), 0, 0
        else:
            self.fast_path_cooldown -= 1
        cursor.execute(_STAGE_DDL[table])
        _copy(cursor, f"COPY import_stage_{table} ({columns}) FROM STDIN WITH (FORMAT csv)", rows)
        cursor.execute(_UPSERT[table], {"job": self.job_id})
        inserted, updated, seen = cursor.fetchone()
        return int(inserted), int(updated), int(seen)

    def _with_defaults(self, rows: list[Row]) -> list[Row]:
        """Plain COPY bypasses column defaults for the columns it names: fill created_at."""
        if self.target != "features":
            return rows
        now = datetime.now(UTC).isoformat()
        return [r if r[5] is not None else (*r[:5], now) for r in rows]


class ChunkPipeline:
    """Writes chunks on a thread of its own while the caller reads the next one.

    Reading and validating are Python work; a chunk's COPY and COMMIT are mostly waiting
    on PostgreSQL (psycopg2 releases the GIL), so the two overlap. Order and the
    one-transaction-per-chunk rule are unchanged: one writer, chunks in file order, at
    most one chunk waiting (memory stays bounded). The writer has its own connection.
    Its first exception (lease lost, cancelled, too many errors, a database error) stops
    it and is raised in the caller at the next ``submit`` or at ``close``.
    """

    def __init__(self, write: Callable[[Chunk, int, int], None]) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[Chunk, int, int] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the caller learns of the error at its next call
            try:
                self._write(*item)
            except BaseException as exc:  # handed to the caller's thread, not lost
                self._error = exc

    def submit(self, chunk: Chunk, offset: int, line: int) -> None:
        self._raise()
        self._queue.put((chunk, offset, line))

    def close(self) -> None:
        """Wait for every submitted chunk to commit; raise the writer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


@dataclass(frozen=True)
class Fault:
    """A test-only crash point: ``CONVEYOR_FAULT=after_copy:3`` (or ``after_commit:3``,
    optionally ``:N`` times) SIGKILLs the worker process at that chunk, to prove a chunk
    lands exactly once. Honoured only when ``env`` is "test"; a marker file per job counts
    the crashes so the redelivered job can get past the point."""

    point: str
    chunk: int
    times: int
    marker: Path

    @classmethod
    def from_settings(cls, ctx: JobContext) -> Fault | None:
        spec = ctx.settings.fault
        if ctx.settings.env != "test" or not spec:
            return None
        point, chunk, *times = spec.split(":")
        marker = ctx.settings.state_dir / f"fault-{ctx.job.id}-{point}-{chunk}"
        return cls(point, int(chunk), int(times[0]) if times else 1, marker)

    def maybe_crash(self, point: str, chunk: int) -> None:
        if point != self.point or chunk != self.chunk:
            return
        fired = int(self.marker.read_text()) if self.marker.exists() else 0
        if fired < self.times:
            self.marker.write_text(str(fired + 1))
            os.kill(os.getpid(), signal.SIGKILL)


def summary(run: ImportRun, counters: Counters) -> dict[str, Any]:
    """The import's result: counts, duration and rate."""
    c = counters
    return {
        "target": run.target,
        "format": run.format,
        "rows_read": c.read,
        "rows_inserted": c.inserted,
        "rows_updated": c.updated,
        "rows_unchanged": c.unchanged,
        "rows_rejected": c.rejected,
        "rows_duplicate": c.duplicate,
        "chunks": c.chunks,
        "duration_s": round(c.busy_s, 3),
        "rows_per_s": round(c.read / c.busy_s) if c.busy_s > 0 else None,
        "changed_table": bool(c.inserted or c.updated),
    }


def run_import(ctx: JobContext) -> dict[str, Any]:
    """Import the job's file from its last checkpoint to the end (or the slice's end)."""
    session = ctx.session
    job_id = ctx.job.id
    run = session.get(ImportRun, job_id)
    if run is None:
        raise jobs.JobFailed("import_missing", "the job has no import record")
    upload = session.get(Upload, run.upload_id) if run.upload_id else None
    if upload is None or upload.deleted_at is not None:
        raise jobs.JobFailed("upload_missing", "the uploaded file is no longer stored")
    counters = Counters.of(run)
    ctx.partial_result = summary(run, counters)
    max_errors = run.max_errors
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    writer = ChunkWriter(ctx, run, counters, engine)
    # Reads go through their own autocommit connection (lo_get per MiB), so the chunk
    # transactions on the session's connection commit independently of the stream.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lo_conn:
        stream = storage.open_reader(lo_conn, upload.oid, upload.size_bytes, run.byte_offset)
        reader = _open_reader(run, stream, session)
        validate = (
            compile_csv_validator(run.target, reader.header or [])
            if isinstance(reader, CsvReader)
            else VALIDATORS[run.target]
        )

        def commit(chunk: Chunk, offset: int, line: int) -> None:
            writer.write(chunk, offset, line)
            ctx.partial_result = summary(run, counters)
            if counters.rejected > max_errors:
                raise jobs.JobFailed(
                    "too_many_errors",
                    f"{counters.rejected} rows were rejected, more than "
                    f"max_errors={max_errors}; the rows and the error report so far are kept",
                )

        pipeline = ChunkPipeline(commit)
        try:
            chunk = Chunk()
            for record in reader:
                chunk.add(record, validate, reader)
                if chunk.full:
                    pipeline.submit(chunk, reader.offset, reader.line)
                    chunk = Chunk()
                    if ctx.slice_over():
                        pipeline.close()
                        raise jobs.SliceDone
            pipeline.submit(chunk, reader.offset, reader.line)
        finally:
            try:
                pipeline.close()
            finally:
                writer.close()
    session.execute(
        update(ImportRun).where(ImportRun.job_id == job_id).values(finished_at=datetime.now(UTC))
    )
    session.commit()
    result = summary(run, counters)
    log.info("import finished", extra={k: v for k, v in result.items() if k.startswith("rows")})
    return result


def _open_reader(run: ImportRun, stream: io.BufferedReader, session: Session) -> Any:
    if run.format == "ndjson":
        return NdjsonReader(stream, offset=run.byte_offset, line=run.line)
    if run.byte_offset > 0 and run.header:
        return CsvReader(
            stream, offset=run.byte_offset, line=run.line, header=list(run.header["columns"])
        )
    reader = CsvReader(stream)
    header = reader.read_header()
    unknown, missing, repeated = TARGETS[run.target].check_header(header)
    if unknown or missing or repeated or not header:
        problems = [f"unknown: {', '.join(unknown)}"] if unknown else []
        problems += [f"missing: {', '.join(missing)}"] if missing else []
        problems += [f"repeated: {', '.join(repeated)}"] if repeated else []
        raise jobs.JobFailed("invalid_header", "; ".join(problems) or "the file has no header")
    # The header is part of the checkpoint: a resume starts past it.
    session.execute(
        update(ImportRun)
        .where(ImportRun.job_id == run.job_id)
        .values(header={"columns": header}, byte_offset=reader.offset, line=reader.line)
    )
    session.commit()
    return reader


@job_task("conveyor.imports.run")
def import_task(self: Task, job_id: str) -> None:
    execute_job(self, job_id, run_import)
