"""``conveyor import`` as a subprocess against a live API server (no worker).

The server is the real app in a threaded werkzeug server on the test services. With no
worker running, ``--wait`` tests play the worker's part: they fill in the import's
counters and errors and finish the job row, and the command must report them.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update
from werkzeug.serving import make_server

from shared.db import Database
from shared.models import ImportError_, ImportRun, Job, TokenScope, Upload
from shared.settings import Settings
from shared.tokens import create_token
from tests.conftest import ROOT, child_env, wait_until
from tests.web.conftest import build_app, close_app
from tests.worker.importing import stored_file

HEADER = "external_id,name,description,status,complexity_points,created_at"
JOB_LINE = re.compile(r"^import ([0-9a-f-]{36}): (\w+)", re.MULTILINE)


@pytest.fixture
def server(settings: Settings, committed_db: Database, redis_url: str) -> Iterator[str]:
    """The API on a free port; the imports queue emptied afterwards."""
    app = build_app(settings)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    http.server_close()
    thread.join(timeout=5)
    close_app(app)
    client = redis.Redis.from_url(redis_url)
    client.delete("imports")
    client.close()


@pytest.fixture
def token(settings: Settings, committed_db: Database) -> str:
    with committed_db.session() as s:
        _, plain = create_token(s, settings.secret("token_pepper"), "cli", TokenScope.WRITE)
    return plain


def command(settings: Settings, server: str, token: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", "import", *args, "--url", server, "--token", token]


def run(
    settings: Settings, server: str, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(settings, server, token, *args),
        cwd=ROOT,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def job_id_of(output: str) -> str:
    match = JOB_LINE.search(output)
    assert match, output
    return match.group(1)


def features_csv(path: Path, rows: int) -> bytes:
    lines = [HEADER] + [f"F-{i},Feature {i},some text,planned,{i % 8}," for i in range(rows)]
    content = ("\n".join(lines) + "\n").encode()
    path.write_bytes(content)
    return content


def test_import_uploads_the_file_and_prints_the_job(
    settings: Settings,
    server: str,
    token: str,
    committed_db: Database,
    redis_url: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "features.csv"
    content = features_csv(path, 60_000)  # ~2.5 MB: many blocks on the wire
    result = run(settings, server, token, str(path), "--target", "features", "--max-errors", "7")
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result.stdout)
    assert "PENDING" in result.stdout
    assert f"conveyor job show {job_id} --wait" in result.stdout

    job, run_row, upload, data = stored_file(committed_db, job_id)
    assert data == content
    assert upload.size_bytes == len(content)
    assert upload.content_type == "text/csv"
    assert job.kind == "import"
    assert job.state == "PENDING"
    assert job.params["max_errors"] == 7
    assert run_row.target == "features"
    assert run_row.header == {"columns": HEADER.split(",")}
    queued = redis.Redis.from_url(redis_url).lrange("imports", 0, -1)
    assert any(job_id.encode() in message for message in queued)


def test_import_gzip_ndjson_with_an_idempotency_key(
    settings: Settings, server: str, token: str, committed_db: Database, tmp_path: Path
) -> None:
    content = b'{"external_id": "T-1", "feature_external_id": "F-1", "name": "runs"}\n' * 500
    path = tmp_path / "cases.jsonl.gz"
    path.write_bytes(gzip.compress(content))
    args = (str(path), "--target", "test_cases", "--idempotency-key", "cli-import-1")
    first = run(settings, server, token, *args)
    assert first.returncode == 0, first.stderr
    second = run(settings, server, token, *args)
    assert second.returncode == 0, second.stderr
    assert job_id_of(first.stdout) == job_id_of(second.stdout)
    assert "earlier upload" in second.stdout

    _, run_row, upload, data = stored_file(committed_db, job_id_of(first.stdout))
    assert data == content  # stored decompressed
    assert run_row.format == "ndjson"
    assert upload.content_type == "application/x-ndjson"
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Upload)) == 1


def test_import_refusal_names_the_columns(
    settings: Settings, server: str, token: str, committed_db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("external_id,colour\nF-1,red\n")
    result = run(settings, server, token, str(path), "--target", "features")
    assert result.returncode == 1
    assert "HTTP 422" in result.stderr
    assert "colour: unknown column" in result.stderr
    assert "name: required column is missing" in result.stderr
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Upload)) == 0


def test_import_needs_a_known_extension_or_format(
    settings: Settings, server: str, token: str, tmp_path: Path
) -> None:
    path = tmp_path / "features.txt"
    path.write_text(HEADER + "\n")
    result = run(settings, server, token, str(path), "--target", "features")
    assert result.returncode == 1
    assert "--format" in result.stderr
    result = run(settings, server, token, str(path), "--target", "features", "--format", "csv")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("state", "exit_code"), [("SUCCESS", 0), ("FAILURE", 1), ("REVOKED", 1)])
def test_import_wait_prints_the_summary_and_first_errors(
    settings: Settings,
    server: str,
    token: str,
    committed_db: Database,
    tmp_path: Path,
    state: str,
    exit_code: int,
) -> None:
    path = tmp_path / "features.csv"
    features_csv(path, 100)
    proc = subprocess.Popen(
        command(settings, server, token, str(path), "--target", "features", "--wait"),
        cwd=ROOT,
        env=child_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def submitted() -> uuid.UUID | None:
            with committed_db.session() as s:
                return s.scalar(select(ImportRun.job_id))

        job_id = wait_until(submitted, timeout=60)
        # Play the worker: counters, rejected rows, the end of the job.
        with committed_db.session() as s:
            s.execute(
                update(ImportRun)
                .where(ImportRun.job_id == job_id)
                .values(
                    rows_read=100,
                    rows_inserted=80,
                    rows_updated=2,
                    rows_unchanged=4,
                    rows_rejected=12,
                    rows_duplicate=2,
                    chunks=1,
                    busy_s=0.5,
                )
            )
            s.add_all(
                ImportError_(
                    job_id=job_id,
                    line=line,
                    column="status",
                    reason="not a status",
                    # An excerpt is file content: markup and escape codes show literally.
                    excerpt=f"bad-{line}" + (" \x1b[2J[red]x[/]" if line == 2 else ""),
                )
                for line in range(2, 14)
            )
            error = None if state == "SUCCESS" else {"code": "too_many_errors", "message": "x"}
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state=state, error=error, finished_at=func.now())
            )
            s.commit()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == exit_code, stderr
    assert job_id_of(stdout) == str(job_id)
    assert re.search(rf"state\s+{state}", stdout), stdout
    for label, value in (
        ("rows read", "100"),
        ("inserted", "80"),
        ("rejected", "12"),
        ("duplicates in file", "2"),
        ("rows/s", "200"),
    ):
        assert re.search(rf"{label}\s+{value}\b", stdout), stdout
    # The first ten rejected rows, in line order, and how many more there are.
    assert "bad-2 \\x1b[2J[red]x[/]" in stdout
    assert "\x1b" not in stdout
    assert "bad-11" in stdout
    assert "bad-12" not in stdout
    assert "2 more" in stdout
    if state == "FAILURE":
        assert "too_many_errors" in stdout
