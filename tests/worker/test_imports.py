"""The import pipeline driven directly against real PostgreSQL: rows, errors, exact counts."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from shared import counts, jobs
from shared.db import Database
from shared.models import Feature, ImportRun, Job, TestCase
from shared.settings import Settings
from tests.worker.importing import count, create_import, errors_of, run_directly, run_record

HEADER = b"external_id,name,description,status,complexity_points,created_at\n"


def feature_rows(n: int, start: int = 0, name: str = "Feature {i}") -> bytes:
    return b"".join(
        f"F-{i},{name.format(i=i)},,planned,{i % 7},\n".encode() for i in range(start, start + n)
    )


def snapshot(db: Database) -> list[tuple[object, ...]]:
    with db.session() as s:
        rows = s.execute(
            select(
                Feature.external_id,
                Feature.name,
                Feature.description,
                Feature.status,
                Feature.complexity_points,
                Feature.created_at,
                Feature.updated_at,
            ).order_by(Feature.external_id)
        ).all()
        return [tuple(r) for r in rows]


def test_import_writes_every_row_in_1000_row_chunks(
    settings: Settings, committed_db: Database
) -> None:
    job = run_directly(
        committed_db, settings, create_import(committed_db, settings, HEADER + feature_rows(2500))
    )
    assert job.state == "SUCCESS", job.error
    assert job.result is not None
    assert job.result["rows_read"] == 2500
    assert job.result["rows_inserted"] == 2500
    assert job.result["chunks"] == 3
    assert count(committed_db) == 2500
    run = run_record(committed_db, job.id)
    assert run.byte_offset == len(HEADER + feature_rows(2500))
    assert run.line == 2501
    assert job.progress is not None
    assert job.progress["percent"] == 100.0
    assert job.progress["rows"] == 2500
    with committed_db.session() as s:
        writers = s.scalars(select(Feature.last_import_job_id).distinct()).all()
    assert writers == [job.id]


def test_hostile_values_are_stored_verbatim(settings: Settings, committed_db: Database) -> None:
    values = {
        "H-1": "'); DROP TABLE features;--",
        "H-2": "line one\n\\.\nline three",
        "H-3": "\\N",
        "H-4": "back\\slash and \\\\ double",
        "H-5": "tab\there",
        "H-6": "emoji 🚀 and ünïcödé",
        "H-7": 'quote " and ""double""',
        "H-8": "=1+1",
        'H-9, "quoted"': "carriage\r\nreturn, comma",
    }

    def quoted(value: str) -> str:
        return '"' + value.replace('"', '""') + '"'

    body = HEADER + b"".join(
        f"{quoted(k)},{quoted(v)},{quoted(v)},done,3,\n".encode() for k, v in values.items()
    )
    job = run_directly(committed_db, settings, create_import(committed_db, settings, body))
    assert job.state == "SUCCESS", job.error
    assert job.result is not None
    assert job.result["rows_inserted"] == len(values)
    with committed_db.session() as s:
        stored = dict(s.execute(select(Feature.external_id, Feature.name)).all())
        descriptions = dict(s.execute(select(Feature.external_id, Feature.description)).all())
    assert stored == values
    assert descriptions == values
    assert count(committed_db) == len(values)  # the table is still there


def test_same_file_again_changes_nothing(settings: Settings, committed_db: Database) -> None:
    body = HEADER + feature_rows(1500)
    first = run_directly(committed_db, settings, create_import(committed_db, settings, body))
    assert first.state == "SUCCESS"
    before = snapshot(committed_db)
    again = run_directly(
        committed_db, settings, create_import(committed_db, settings, body, key="k2")
    )
    assert again.state == "SUCCESS"
    assert again.result is not None
    assert again.result["rows_inserted"] == 0
    assert again.result["rows_updated"] == 0
    assert again.result["rows_unchanged"] == 1500
    assert again.result["changed_table"] is False
    assert snapshot(committed_db) == before


def test_changed_rows_are_updated_others_untouched(
    settings: Settings, committed_db: Database
) -> None:
    run_directly(
        committed_db, settings, create_import(committed_db, settings, HEADER + feature_rows(1200))
    )
    before = {r[0]: r for r in snapshot(committed_db)}
    changed = (
        HEADER
        + feature_rows(600)
        + feature_rows(600, start=600, name="Renamed {i}")
        + feature_rows(10, start=1200)
    )
    job = run_directly(committed_db, settings, create_import(committed_db, settings, changed))
    assert job.result is not None
    assert (
        job.result["rows_inserted"],
        job.result["rows_updated"],
        job.result["rows_unchanged"],
    ) == (10, 600, 600)
    after = {r[0]: r for r in snapshot(committed_db)}
    assert after["F-1"] == before["F-1"]
    assert after["F-700"][1] == "Renamed 700"
    assert after["F-700"][5] == before["F-700"][5]  # created_at kept when the file has none


def test_duplicates_inside_a_chunk_and_across_chunks(
    settings: Settings, committed_db: Database
) -> None:
    lines = [f"F-{i},Feature {i},,planned,1,\n" for i in range(2500)]
    lines[10] = "F-5,Later five,,planned,1,\n"  # same chunk as F-5 (line 7)
    lines[1500] = "F-3,Later three,,planned,1,\n"  # a later chunk than F-3
    job = run_directly(
        committed_db,
        settings,
        create_import(committed_db, settings, HEADER + "".join(lines).encode()),
    )
    assert job.state == "SUCCESS", job.error
    r = job.result
    assert r is not None
    assert r["rows_read"] == 2500
    assert r["rows_duplicate"] == 2
    assert r["rows_inserted"] == 2498
    # F-3's later line lands whichever writer commits first: as an update of the earlier
    # one, or as the row the earlier one may no longer overwrite (then "unchanged").
    assert r["rows_updated"] + r["rows_unchanged"] == 1
    assert count(committed_db) == 2498
    with committed_db.session() as s:
        names = dict(
            s.execute(
                select(Feature.external_id, Feature.name).where(
                    Feature.external_id.in_(["F-3", "F-5"])
                )
            ).all()
        )
    assert names == {"F-3": "Later three", "F-5": "Later five"}  # the last occurrence wins


def test_bad_rows_are_reported_with_lines_and_good_rows_land(
    settings: Settings, committed_db: Database
) -> None:
    body = (
        b"\xef\xbb\xbf"
        + HEADER  # line 1, with a BOM
        + b"G-2,Good two,,planned,1,\n"  # 2
        + b"B-3,Too few,planned,1\n"  # 3 wrong column count
        + b"B-4,Bad \xff\xfe utf8,,planned,1,\n"  # 4 invalid UTF-8
        + b"B-5,Points,,planned,abc,\n"  # 5 wrong type
        + b"B-6,Negative,,planned,-1,\n"  # 6
        + b"B-7,Status,,bogus,1,\n"  # 7 enum
        + b"B-8,When,,planned,1,yesterday\n"  # 8 date
        + b"B-9,,,planned,1,\n"  # 9 missing name
        + b"B-10,Nul\x00byte,,planned,1,\n"  # 10 NUL
        + b'G-11,"Spans\nthree\nlines",,done,2,2024-05-01T12:00:00Z\n'  # 11-13
        + b"B-14,Extra,,planned,1,,surplus\n"  # 14
        + b"G-15,Good fifteen,,"
        + b"x" * (10 * 1024 * 1024)
        + b",1,\n"  # 15: 10 MiB field
        + b"G-16,Good sixteen,,testing,5,2024-01-01\n"  # 16
        + b'B-17,"Unterminated,,planned,1,\n'  # 17: the quote swallows 18 and 19
        + b"G-18,Eighteen,,planned,1,\n"
        + b'G-19,"Nineteen",,planned,1,\n'
        + b"G-20,Twenty,,planned,1,\n"  # 20: parsing resumes here
    )
    job = run_directly(committed_db, settings, create_import(committed_db, settings, body))
    assert job.state == "SUCCESS", job.error
    errors = errors_of(committed_db, job.id)
    assert [(line, column) for line, column, _ in errors] == [
        (3, None),
        (4, None),
        (5, "complexity_points"),
        (6, "complexity_points"),
        (7, "status"),
        (8, "created_at"),
        (9, "name"),
        (10, "name"),
        (14, None),
        (15, None),
        (17, None),
    ]
    reasons = {line: reason for line, _, reason in errors}
    assert reasons[3] == "expected 6 fields, found 4"
    assert reasons[4] == "invalid UTF-8"
    assert reasons[10] == "contains a NUL byte"
    assert reasons[15] == "line too long"
    assert reasons[17].startswith("malformed CSV")
    with committed_db.session() as s:
        landed = sorted(s.scalars(select(Feature.external_id)))
        spans = s.scalar(select(Feature.name).where(Feature.external_id == "G-11"))
    assert landed == ["G-11", "G-16", "G-2", "G-20"]
    assert spans == "Spans\nthree\nlines"
    r = job.result
    assert r is not None
    assert (r["rows_read"], r["rows_inserted"], r["rows_rejected"]) == (15, 4, 11)


def test_unterminated_quote_at_the_end_is_one_error(
    settings: Settings, committed_db: Database
) -> None:
    body = (
        HEADER + b"G-2,Two,,planned,1,\n" + b'B-3,"never closed,,planned,1,\n' + b"more text\n" * 5
    )
    job = run_directly(committed_db, settings, create_import(committed_db, settings, body))
    assert job.state == "SUCCESS"
    assert [(line, reason) for line, _, reason in errors_of(committed_db, job.id)] == [
        (3, "malformed CSV: unexpected end of data")
    ]
    assert count(committed_db) == 1


def test_header_only_is_an_empty_import(settings: Settings, committed_db: Database) -> None:
    job = run_directly(committed_db, settings, create_import(committed_db, settings, HEADER))
    assert job.state == "SUCCESS"
    assert job.result is not None
    assert job.result["rows_read"] == 0
    assert count(committed_db) == 0


def test_columns_in_any_order_and_optional_ones_left_out(
    settings: Settings, committed_db: Database
) -> None:
    body = b"name,external_id\nFirst,O-1\nSecond,O-2\n"
    job = run_directly(committed_db, settings, create_import(committed_db, settings, body))
    assert job.state == "SUCCESS", job.error
    with committed_db.session() as s:
        row = s.execute(select(Feature).where(Feature.external_id == "O-2")).scalar_one()
    assert (row.name, row.status, row.complexity_points, row.description) == (
        "Second",
        "planned",
        0,
        None,
    )
    assert abs((datetime.now(UTC) - row.created_at).total_seconds()) < 600


def test_ndjson_rows_and_refusals(settings: Settings, committed_db: Database) -> None:
    lines = [
        {"external_id": "N-1", "name": "One", "complexity_points": 3, "status": "done"},
        [1, 2],
        "a string",
        {"external_id": "N-4", "name": 123},
        {"external_id": "N-5", "name": "Five", "complexity_points": 5.5},
        {"external_id": "N-6", "name": "Six", "surprise": True},
        None,
        {
            "external_id": "N-8",
            "name": "Eight",
            "created_at": "2024-02-03T04:05:06+02:00",
            "description": None,
        },
    ]
    body = "".join(json.dumps(x) + "\n" for x in lines).encode() + b"{not json\n" + b"\n"
    job = run_directly(
        committed_db, settings, create_import(committed_db, settings, body, fmt="ndjson")
    )
    assert job.state == "SUCCESS", job.error
    errors = errors_of(committed_db, job.id)
    assert [(line, column) for line, column, _ in errors] == [
        (2, None),
        (3, None),
        (4, "name"),
        (5, "complexity_points"),
        (6, "surprise"),
        (7, None),
        (9, None),
    ]
    assert errors[0][2] == "expected a JSON object, found list"
    with committed_db.session() as s:
        landed = dict(s.execute(select(Feature.external_id, Feature.complexity_points)).all())
    assert landed == {"N-1": 3, "N-8": 0}


def test_test_cases_need_an_existing_feature(settings: Settings, committed_db: Database) -> None:
    run_directly(
        committed_db, settings, create_import(committed_db, settings, HEADER + feature_rows(2))
    )
    body = (
        b"external_id,feature_external_id,name,status\n"
        b"T-1,F-0,Login works,passed\n"
        b"T-2,F-404,Ghost,passed\n"
        b"T-3,F-1,Logout works,\n"
        b"T-4,F-1,Bad status,flaky\n"
    )
    job = run_directly(
        committed_db, settings, create_import(committed_db, settings, body, target="test_cases")
    )
    assert job.state == "SUCCESS", job.error
    assert [(line, column) for line, column, _ in errors_of(committed_db, job.id)] == [
        (3, "feature_external_id"),
        (5, "status"),
    ]
    with committed_db.session() as s:
        cases = {
            ext: (fid, status)
            for ext, fid, status in s.execute(
                select(TestCase.external_id, Feature.external_id, TestCase.status).join(Feature)
            )
        }
    assert cases == {"T-1": ("F-0", "passed"), "T-3": ("F-1", "pending")}
    assert count(committed_db, TestCase) == 2


def test_too_many_errors_fails_and_keeps_what_landed(
    settings: Settings, committed_db: Database
) -> None:
    body = (
        HEADER
        + feature_rows(1000)
        + b"".join(f"B-{i},,,planned,1,\n".encode() for i in range(8))
        + feature_rows(5, start=5000)
    )
    job = run_directly(
        committed_db, settings, create_import(committed_db, settings, body, max_errors=5)
    )
    assert job.state == "FAILURE"
    assert job.error is not None
    assert job.error["code"] == "too_many_errors"
    assert job.result is not None
    assert job.result["rows_inserted"] == 1005  # the chunk that went over committed whole
    assert job.result["rows_rejected"] == 8
    assert count(committed_db) == 1005
    assert len(errors_of(committed_db, job.id)) == 8


def test_a_stale_lease_holder_cannot_commit_a_chunk(
    settings: Settings, committed_db: Database
) -> None:
    from worker.imports import Chunk, ChunkWriter, Counters, Frame
    from worker.readers import Record
    from worker.rows import validate_feature
    from worker.tasks import JobContext

    job_id = create_import(committed_db, settings, HEADER + feature_rows(3))
    with committed_db.session() as s:
        stale = jobs.acquire_lease(s, job_id, "old/1", 60)
        assert stale is not None
        run = s.get_one(ImportRun, job_id)
        ctx = JobContext(s, stale, s.get_one(Job, job_id), settings, time.monotonic())
        writer = ChunkWriter(ctx, run, Counters(), committed_db.engine)
        writer.connect()
        # Another delivery takes over (the old one's lease lapsed while it was stalled).
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=func.clock_timestamp())
        )
        s.commit()
        assert jobs.acquire_lease(s, job_id, "new/2", 60) is not None
        chunk = Chunk()
        chunk.add(Record(2, 10, {"external_id": "X-1", "name": "x"}), validate_feature, None)
        try:
            with pytest.raises(jobs.LeaseLost):
                writer.write(Frame.parse(chunk.encode("features", 1, 10, 2)))
        finally:
            writer.close()
        assert s.get_one(ImportRun, job_id).chunks == 0
    assert count(committed_db) == 0


def test_an_unknown_job_id_has_no_import(settings: Settings, committed_db: Database) -> None:
    with committed_db.session() as s:
        assert s.get(ImportRun, uuid.uuid4()) is None


def test_finished_imports_files_are_deleted_after_the_grace(
    settings: Settings, committed_db: Database
) -> None:
    from shared.models import Upload
    from worker.maintenance import delete_finished_uploads

    done = run_directly(committed_db, settings, create_import(committed_db, settings, HEADER))
    pending = create_import(committed_db, settings, HEADER)  # not run: its file must stay
    with committed_db.session() as s:
        assert delete_finished_uploads(s, retention_s=3600) == 0  # still within the grace
        s.execute(
            update(Job)
            .where(Job.id == done.id)
            .values(finished_at=Job.created_at - timedelta(hours=2))
        )
        s.commit()
        assert delete_finished_uploads(s, retention_s=3600) == 1
        uploads = {
            run.job_id: s.get_one(Upload, run.upload_id) for run in s.scalars(select(ImportRun))
        }
        lo_count = (
            s.connection()
            .exec_driver_sql(
                "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = %(oid)s",
                {"oid": uploads[done.id].oid},
            )
            .scalar()
        )
    assert uploads[done.id].deleted_at is not None
    assert uploads[pending].deleted_at is None
    assert lo_count == 0


def test_list_totals_follow_an_import_on_its_copy_and_upsert_paths(
    settings: Settings, committed_db: Database
) -> None:
    """The row counts' triggers (shared/counts.py) see what both write paths do."""

    def totals() -> dict[str | None, tuple[int, int]]:
        with committed_db.session() as s:
            real = dict(
                s.execute(select(Feature.status, func.count()).group_by(Feature.status)).all()
            )
            real[None] = sum(real.values())
            return {
                status: (counts.total(s, "features", status), real.get(status, 0))
                for status in (None, "planned", "done", "testing")
            }

    first = run_directly(
        committed_db, settings, create_import(committed_db, settings, HEADER + feature_rows(1200))
    )
    assert first.state == "SUCCESS", first.error
    assert totals()[None] == (1200, 1200)
    moved = b"".join(f"F-{i},Feature {i},,done,{i % 7},\n".encode() for i in range(600))
    changed = HEADER + moved + feature_rows(10, start=1200)
    second = run_directly(committed_db, settings, create_import(committed_db, settings, changed))
    assert second.state == "SUCCESS", second.error
    assert second.result is not None
    assert (second.result["rows_inserted"], second.result["rows_updated"]) == (10, 600)
    assert totals() == {
        None: (1210, 1210),
        "planned": (610, 610),
        "done": (600, 600),
        "testing": (0, 0),
    }
