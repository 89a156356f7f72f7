"""POST /api/v1/imports, GET /api/v1/imports/<id> and its errors, without a worker.

What a request leaves behind is read back from PostgreSQL: the large object's bytes, the
``uploads`` and ``imports`` rows, the PENDING job and its message in the ``imports``
queue. Refused requests must leave no large object and no row: counted before and after.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text, update
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from shared.db import Database
from shared.models import ImportError_, ImportRun, Job, Upload
from shared.settings import Settings
from tests.conftest import ROOT
from tests.web.conftest import (
    WEB_SERVERS,
    Token,
    Tokens,
    build_app,
    close_app,
    insert_job,
    problem,
    queued_message,
    run_web,
    set_job,
)
from tests.worker.importing import stored_file

URL = "/api/v1/imports"
SMALL_LIMIT = 1000
HEADER = "external_id,name,description,status,complexity_points,created_at"
FEATURES_CSV = (
    f"{HEADER}\r\n"
    'F-1,Login,"two lines\nand a comma, here",planned,3,2024-01-02T03:04:05Z\r\n'
    "F-2,Logout,,done,0,\r\n"
).encode()
TEST_CASES_NDJSON = (
    b'{"external_id": "T-1", "feature_external_id": "F-1", "name": "logs in"}\n'
    b'{"external_id": "T-2", "feature_external_id": "F-1", "name": "logs out"}\n'
)


# --- helpers ---------------------------------------------------------------------------------


def post_import(
    client: FlaskClient,
    token: Token,
    body: bytes | None = None,
    *,
    content_type: str | None = "text/csv",
    headers: dict[str, str] | None = None,
    **params: Any,
) -> TestResponse:
    params.setdefault("target", "features")
    query = {k: v for k, v in params.items() if v is not None}
    return client.post(
        URL,
        query_string=query,
        data=body,
        content_type=content_type,
        headers={**token.headers, **(headers or {})},
    )


def counts(db: Database) -> dict[str, int]:
    """What is stored: large objects, uploads, imports and jobs."""
    with db.engine.connect() as conn:
        return {
            "large_objects": conn.scalar(text("SELECT count(*) FROM pg_largeobject_metadata")),
            "uploads": conn.scalar(text("SELECT count(*) FROM uploads")),
            "imports": conn.scalar(text("SELECT count(*) FROM imports")),
            "jobs": conn.scalar(text("SELECT count(*) FROM jobs")),
        }


def assert_accepted(
    response: TestResponse,
    db: Database,
    broker: redis.Redis,
    content: bytes,
    *,
    target: str = "features",
    fmt: str = "csv",
    max_errors: int = 1000,
) -> tuple[Job, ImportRun, Upload]:
    """202 with the job and its import; the file stored verbatim; the job queued."""
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    job_id = body["id"]
    assert response.headers["Location"] == f"/api/v1/jobs/{job_id}"
    assert body["kind"] == "import"
    assert body["state"] == "PENDING"
    digest = hashlib.sha256(content).hexdigest()
    assert body["params"] == {
        "target": target,
        "format": fmt,
        "max_errors": max_errors,
        "sha256": digest,
        "size_bytes": len(content),
    }
    assert body["links"] == {
        "self": f"/api/v1/jobs/{job_id}",
        "import": f"/api/v1/imports/{job_id}",
    }
    assert body["import"]["target"] == target
    assert body["import"]["format"] == fmt
    assert body["import"]["sha256"] == digest
    assert body["import"]["rows_read"] == 0

    job, run, upload, data = stored_file(db, job_id)
    assert data == content
    assert upload.sha256 == digest
    assert upload.size_bytes == len(content)
    assert upload.owner == job.owner
    assert job.state == "PENDING"
    assert job.published_at is not None
    assert (run.target, run.format, run.max_errors) == (target, fmt, max_errors)
    assert (run.size_bytes, run.sha256) == (len(content), digest)
    assert run.rows_read == 0
    assert run.byte_offset == 0
    message = queued_message(broker, job_id, queue="imports")
    assert message["headers"]["task"] == "conveyor.imports.run"
    return job, run, upload


class CountingStream(io.BytesIO):
    """A request body that counts how many bytes the app read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def post_chunked(
    client: FlaskClient,
    token: Token,
    body: bytes,
    *,
    target: str = "features",
    encoding: str | None = None,
) -> tuple[TestResponse, CountingStream]:
    """A body without Content-Length, as gunicorn hands a chunked request to the app."""
    stream = CountingStream(body)
    headers = {**token.headers, **({"Content-Encoding": encoding} if encoding else {})}
    response = client.post(
        URL,
        query_string={"target": target},
        content_type="text/csv",
        headers=headers,
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    return response, stream


@pytest.fixture
def small_app(settings: Settings, committed_db: Database) -> Iterator[Flask]:
    """The app with a 1000-byte upload limit."""
    app = build_app(settings.model_copy(update={"import_max_bytes": SMALL_LIMIT}))
    yield app
    close_app(app)


@pytest.fixture
def small_client(small_app: Flask) -> FlaskClient:
    return small_app.test_client()


def multipart_body(
    content: bytes, *, filename: str, part_type: str, boundary: str = "conveyor-test-b0undary"
) -> tuple[bytes, str]:
    """A multipart/form-data body with ``content`` as its ``file`` part; and its type."""
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {part_type}\r\n\r\n"
    ).encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def features_csv(rows: int) -> bytes:
    lines = [HEADER] + [f"F-{i},Feature {i},,planned,{i % 8}," for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


# --- accepted uploads ------------------------------------------------------------------------


def test_raw_csv_is_stored_recorded_and_queued(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    response = post_import(client, tokens.write, FEATURES_CSV, max_errors=5)
    job, run, upload = assert_accepted(response, committed_db, broker, FEATURES_CSV, max_errors=5)
    assert job.owner == tokens.write.id
    assert run.upload_id == upload.id
    assert run.header == {"columns": HEADER.split(",")}
    assert upload.content_type == "text/csv"
    assert upload.filename is None
    assert response.get_json()["import"]["columns"] == HEADER.split(",")


@pytest.mark.parametrize(
    "content_type",
    ["application/x-ndjson", "application/ndjson", "application/x-ndjson; charset=utf-8"],
)
def test_raw_ndjson_is_accepted(
    client: FlaskClient,
    tokens: Tokens,
    committed_db: Database,
    broker: redis.Redis,
    content_type: str,
) -> None:
    response = post_import(
        client, tokens.write, TEST_CASES_NDJSON, content_type=content_type, target="test_cases"
    )
    _, run, _ = assert_accepted(
        response, committed_db, broker, TEST_CASES_NDJSON, target="test_cases", fmt="ndjson"
    )
    assert run.header is None  # NDJSON has no header; every line names its fields


def test_csv_with_charset_and_bom_is_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = b"\xef\xbb\xbf" + FEATURES_CSV
    response = post_import(client, tokens.write, content, content_type="text/csv; charset=UTF-8")
    _, run, _ = assert_accepted(response, committed_db, broker, content)
    assert run.header == {"columns": HEADER.split(",")}  # the BOM is not part of a name


def test_header_only_csv_is_a_valid_empty_import(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    for content in (b"external_id,name", b"external_id,name\r\n"):
        response = post_import(client, tokens.write, content)
        assert_accepted(response, committed_db, broker, content)


def test_header_names_are_trimmed(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = b" external_id , name\t\nF-1,x\n"
    response = post_import(client, tokens.write, content)
    _, run, _ = assert_accepted(response, committed_db, broker, content)
    assert run.header == {"columns": ["external_id", "name"]}


def test_quoted_header_with_a_newline_in_a_later_field(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = b'"external_id","name"\n"F-1","a\nb"\n'
    response = post_import(client, tokens.write, content)
    _, run, _ = assert_accepted(response, committed_db, broker, content)
    assert run.header == {"columns": ["external_id", "name"]}


def test_multipart_file_is_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    # curl -F file=@features.csv sends application/octet-stream: the extension decides.
    response = client.post(
        URL,
        query_string={"target": "features"},
        data={
            "note": "ignored",
            "file": (io.BytesIO(FEATURES_CSV), "features.csv", "application/octet-stream"),
        },
        headers=tokens.write.headers,
    )
    _, run, upload = assert_accepted(response, committed_db, broker, FEATURES_CSV)
    assert upload.filename == "features.csv"
    assert upload.content_type == "text/csv"
    assert run.header == {"columns": HEADER.split(",")}
    assert response.get_json()["import"]["filename"] == "features.csv"


def test_multipart_part_type_decides_the_format(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    response = client.post(
        URL,
        query_string={"target": "test_cases"},
        data={
            "file": (
                io.BytesIO(TEST_CASES_NDJSON),
                "uploads/2024/cases.txt",
                "application/x-ndjson",
            )
        },
        headers=tokens.write.headers,
    )
    _, _, upload = assert_accepted(
        response, committed_db, broker, TEST_CASES_NDJSON, target="test_cases", fmt="ndjson"
    )
    assert upload.filename == "cases.txt"  # the client's folder is not kept


def test_multipart_jsonl_extension_is_ndjson(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    response = client.post(
        URL,
        query_string={"target": "test_cases"},
        data={"file": (io.BytesIO(TEST_CASES_NDJSON), "cases.jsonl", "application/octet-stream")},
        headers=tokens.write.headers,
    )
    assert_accepted(
        response, committed_db, broker, TEST_CASES_NDJSON, target="test_cases", fmt="ndjson"
    )


def test_multipart_larger_than_a_piece_is_stored_verbatim(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = features_csv(20_000)  # ~0.6 MB: many pieces, boundaries split across them
    # Built here: the test client spools a large form to a temporary file it never closes.
    body, content_type = multipart_body(content, filename="big.csv", part_type="text/csv")
    response = post_import(client, tokens.write, body, content_type=content_type)
    assert_accepted(response, committed_db, broker, content)


def test_gzip_body_is_stored_decompressed(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = features_csv(30_000)  # compresses well: one input piece, many output pieces
    response = post_import(
        client, tokens.write, gzip.compress(content), headers={"Content-Encoding": "gzip"}
    )
    _, _, upload = assert_accepted(response, committed_db, broker, content)
    assert upload.size_bytes == len(content)


def test_concatenated_gzip_members_decode_as_one_file(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    first, second = FEATURES_CSV, b"F-3,Search,,testing,5,\r\n"
    body = gzip.compress(first) + gzip.compress(second)
    response = post_import(client, tokens.write, body, headers={"Content-Encoding": "gzip"})
    assert_accepted(response, committed_db, broker, first + second)


def test_gzip_multipart_is_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    boundary = "conveyor-test-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="f.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + FEATURES_CSV
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = post_import(
        client,
        tokens.write,
        gzip.compress(body),
        content_type=f"multipart/form-data; boundary={boundary}",
        headers={"Content-Encoding": "gzip"},
    )
    assert_accepted(response, committed_db, broker, FEATURES_CSV)


def test_identity_encoding_is_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    response = post_import(
        client, tokens.write, FEATURES_CSV, headers={"Content-Encoding": "identity"}
    )
    assert_accepted(response, committed_db, broker, FEATURES_CSV)


def test_chunked_body_within_the_limit_is_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = features_csv(5000)
    response, stream = post_chunked(client, tokens.write, content)
    assert_accepted(response, committed_db, broker, content)
    assert stream.bytes_read == len(content)


# --- refused uploads leave nothing behind ---------------------------------------------------


@pytest.fixture
def nothing_left(committed_db: Database) -> Iterator[None]:
    """Fails the test if it leaves a large object, an upload, an import or a job."""
    before = counts(committed_db)
    yield
    assert counts(committed_db) == before


@pytest.mark.usefixtures("nothing_left")
def test_oversized_content_length_is_413_before_reading(
    small_client: FlaskClient, tokens: Tokens
) -> None:
    stream = CountingStream(features_csv(200))
    assert len(stream.getvalue()) > SMALL_LIMIT
    response = small_client.post(
        URL,
        query_string={"target": "features"},
        input_stream=stream,
        content_type="text/csv",
        headers=tokens.write.headers,
    )
    body = problem(response, 413)
    assert body["limit_bytes"] == SMALL_LIMIT
    assert stream.bytes_read == 0


@pytest.mark.usefixtures("nothing_left")
def test_oversized_chunked_body_is_413_mid_stream(
    small_client: FlaskClient, tokens: Tokens
) -> None:
    content = features_csv(200_000)  # ~6 MB, without Content-Length
    response, stream = post_chunked(small_client, tokens.write, content)
    problem(response, 413)
    # Stopped soon after the limit, not after the whole body.
    assert stream.bytes_read < 256 * 1024


@pytest.mark.usefixtures("nothing_left")
def test_gzip_bomb_is_413(small_client: FlaskClient, tokens: Tokens) -> None:
    # 36 MB of rows in ~100 kB of gzip: the limit is on what the body decompresses to.
    body = gzip.compress(HEADER.encode() + b"\n" + b"F-1,x,,planned,0,\n" * 2_000_000)
    response, stream = post_chunked(small_client, tokens.write, body, encoding="gzip")
    problem(response, 413)
    assert stream.bytes_read < len(body)  # stopped early, not after inflating it all


@pytest.mark.usefixtures("nothing_left")
def test_oversized_multipart_file_is_413(small_client: FlaskClient, tokens: Tokens) -> None:
    response = small_client.post(
        URL,
        query_string={"target": "features"},
        data={"file": (io.BytesIO(features_csv(100)), "f.csv", "text/csv")},
        headers=tokens.write.headers,
    )
    problem(response, 413)


def test_file_exactly_at_the_limit_is_accepted(
    small_client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    head = (HEADER + "\n").encode()
    content = head + b"F-1," + b"x" * (SMALL_LIMIT - len(head) - 5) + b"\n"
    assert len(content) == SMALL_LIMIT
    assert_accepted(post_import(small_client, tokens.write, content), committed_db, broker, content)
    before = counts(committed_db)
    problem(post_import(small_client, tokens.write, content + b"\n"), 413)
    response, _ = post_chunked(small_client, tokens.write, content + b"\n")
    problem(response, 413)
    assert counts(committed_db) == before


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize("encoding", ["br", "deflate", "gzip, br", "compress"])
def test_unsupported_content_encoding_is_415(
    client: FlaskClient, tokens: Tokens, encoding: str
) -> None:
    response = post_import(
        client, tokens.write, FEATURES_CSV, headers={"Content-Encoding": encoding}
    )
    body = problem(response, 415)
    assert body["type"].endswith(":unsupported-content-encoding")


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", None, "text/csv; charset=iso-8859-1"]
)
def test_unsupported_content_type_is_415(
    client: FlaskClient, tokens: Tokens, content_type: str | None
) -> None:
    response = post_import(client, tokens.write, FEATURES_CSV, content_type=content_type)
    problem(response, 415)


@pytest.mark.usefixtures("nothing_left")
def test_multipart_with_an_unknown_file_type_is_415(client: FlaskClient, tokens: Tokens) -> None:
    response = client.post(
        URL,
        query_string={"target": "features"},
        data={"file": (io.BytesIO(FEATURES_CSV), "features.xlsx", "application/octet-stream")},
        headers=tokens.write.headers,
    )
    problem(response, 415)


@pytest.mark.usefixtures("nothing_left")
def test_multipart_without_a_file_part_is_422(client: FlaskClient, tokens: Tokens) -> None:
    response = client.post(
        URL,
        query_string={"target": "features"},
        data={"upload": (io.BytesIO(FEATURES_CSV), "features.csv", "text/csv")},
        headers=tokens.write.headers,
    )
    body = problem(response, 422)
    assert body["errors"][0]["field"] == "file"


@pytest.mark.usefixtures("nothing_left")
def test_malformed_multipart_is_400(client: FlaskClient, tokens: Tokens) -> None:
    boundary = "b0undary"
    truncated = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.csv"\r\n\r\n'
    ).encode() + FEATURES_CSV  # no closing boundary
    response = post_import(
        client,
        tokens.write,
        truncated,
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    problem(response, 400)


@pytest.mark.usefixtures("nothing_left")
def test_invalid_gzip_is_400(client: FlaskClient, tokens: Tokens) -> None:
    for body in (b"not gzip at all", gzip.compress(FEATURES_CSV)[:-10]):
        response = post_import(client, tokens.write, body, headers={"Content-Encoding": "gzip"})
        body_json = problem(response, 400)
        assert body_json["type"].endswith(":invalid-gzip")


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    ("content", "content_type", "encoding"),
    [
        (b"", "text/csv", None),
        (b"\xef\xbb\xbf", "text/csv", None),
        (b"", "application/x-ndjson", None),
        (gzip.compress(b""), "text/csv", "gzip"),
        (gzip.compress(b""), "application/x-ndjson", "gzip"),
    ],
)
def test_empty_body_is_422(
    client: FlaskClient, tokens: Tokens, content: bytes, content_type: str, encoding: str | None
) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    response = post_import(
        client, tokens.write, content, content_type=content_type, headers=headers
    )
    body = problem(response, 422)
    assert body["type"].endswith(":empty-file")


@pytest.mark.usefixtures("nothing_left")
def test_empty_chunked_body_is_422(client: FlaskClient, tokens: Tokens) -> None:
    response, _ = post_chunked(client, tokens.write, b"")
    problem(response, 422)


@pytest.mark.usefixtures("nothing_left")
def test_bad_header_names_each_column(client: FlaskClient, tokens: Tokens) -> None:
    content = b"external_id,colour,status,status,size\nF-1,red,done,done,3\n"
    response = post_import(client, tokens.write, content)
    body = problem(response, 422)
    assert body["type"].endswith(":invalid-csv-header")
    by_field = {(e["field"], e["message"].split(" ")[0]) for e in body["errors"]}
    assert by_field == {
        ("colour", "unknown"),
        ("size", "unknown"),
        ("name", "required"),
        ("status", "column"),
    }
    assert len(body["errors"]) == 4
    assert "'colour'" in body["detail"]
    assert "'name'" in body["detail"]


@pytest.mark.usefixtures("nothing_left")
def test_test_cases_header_needs_its_own_columns(client: FlaskClient, tokens: Tokens) -> None:
    response = post_import(client, tokens.write, FEATURES_CSV, target="test_cases")
    body = problem(response, 422)
    fields = {e["field"] for e in body["errors"]}
    assert {"feature_external_id", "description", "complexity_points"} <= fields


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "content",
    [
        b'"external_id,name\nF-1,x\n',  # unterminated quote: never swallows the file
        b"\xff\xfeexternal_id,name\n",  # not UTF-8
        b"external_id,name" + b"x" * 70_000,  # no line break within the header's budget
    ],
)
def test_unreadable_header_is_422(client: FlaskClient, tokens: Tokens, content: bytes) -> None:
    response = post_import(client, tokens.write, content)
    body = problem(response, 422)
    assert body["errors"][0]["field"] == "header"


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"target": "deployments"}, "target"),
        ({"target": None}, "target"),
        ({"max_errors": "-1"}, "max_errors"),
        ({"max_errors": "10000001"}, "max_errors"),
        ({"max_errors": "many"}, "max_errors"),
        ({"max_errors": "1.5"}, "max_errors"),
    ],
)
def test_bad_query_is_422(
    client: FlaskClient, tokens: Tokens, params: dict[str, Any], field: str
) -> None:
    response = post_import(client, tokens.write, FEATURES_CSV, **params)
    body = problem(response, 422)
    assert [e["field"] for e in body["errors"]] == [field]


def test_max_errors_bounds_are_accepted(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    for value in (0, 10_000_000):
        response = post_import(client, tokens.write, FEATURES_CSV, max_errors=str(value))
        assert_accepted(response, committed_db, broker, FEATURES_CSV, max_errors=value)


@pytest.mark.usefixtures("nothing_left")
def test_read_scope_cannot_import(client: FlaskClient, tokens: Tokens) -> None:
    problem(post_import(client, tokens.read, FEATURES_CSV), 403)


@pytest.mark.usefixtures("nothing_left")
def test_no_token_is_401(client: FlaskClient) -> None:
    response = client.post(URL, query_string={"target": "features"}, data=FEATURES_CSV)
    problem(response, 401)


# --- Idempotency-Key -------------------------------------------------------------------------


def test_idempotency_key_replay_returns_the_job_and_keeps_no_second_file(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    key = {"Idempotency-Key": "import-1"}
    first = post_import(client, tokens.write, FEATURES_CSV, headers=key)
    assert_accepted(first, committed_db, broker, FEATURES_CSV)
    after_first = counts(committed_db)

    # The same file, multipart this time: same digest and size, so the same request.
    second = client.post(
        URL,
        query_string={"target": "features"},
        data={"file": (io.BytesIO(FEATURES_CSV), "f.csv", "text/csv")},
        headers={**tokens.write.headers, **key},
    )
    assert second.status_code == 200
    assert second.headers["Location"] == first.headers["Location"]
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.get_json()["import"] == first.get_json()["import"]
    assert counts(committed_db) == after_first
    assert broker.llen("imports") == 1


def test_idempotency_key_with_another_file_is_422_and_keeps_nothing(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    key = {"Idempotency-Key": "import-2"}
    assert_accepted(
        post_import(client, tokens.write, FEATURES_CSV, headers=key),
        committed_db,
        broker,
        FEATURES_CSV,
    )
    after_first = counts(committed_db)
    for other in (
        {"body": FEATURES_CSV + b"F-9,More,,planned,1,\r\n"},
        {"body": FEATURES_CSV, "max_errors": "7"},
    ):
        response = post_import(client, tokens.write, headers=key, **other)
        body = problem(response, 422)
        assert body["type"].endswith(":idempotency-key-reused")
        assert counts(committed_db) == after_first


@pytest.mark.usefixtures("nothing_left")
def test_invalid_idempotency_key_keeps_nothing(client: FlaskClient, tokens: Tokens) -> None:
    response = post_import(client, tokens.write, FEATURES_CSV, headers={"Idempotency-Key": " "})
    problem(response, 422)


def test_another_owner_may_reuse_the_key(
    client: FlaskClient, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    key = {"Idempotency-Key": "shared-key"}
    a = post_import(client, tokens.write, FEATURES_CSV, headers=key)
    b = post_import(client, tokens.other, FEATURES_CSV, headers=key)
    assert_accepted(a, committed_db, broker, FEATURES_CSV)
    assert_accepted(b, committed_db, broker, FEATURES_CSV)
    assert a.get_json()["id"] != b.get_json()["id"]


@pytest.mark.parametrize("dead_redis_url", ["refused"], indirect=True)
def test_broker_down_keeps_the_file_for_the_job_and_a_retry_stores_no_second(
    dead_redis_app: Flask,
    client: FlaskClient,
    tokens: Tokens,
    committed_db: Database,
    broker: redis.Redis,
) -> None:
    headers = {"Idempotency-Key": "import-during-outage"}
    before = counts(committed_db)
    down = dead_redis_app.test_client()
    first = problem(post_import(down, tokens.write, FEATURES_CSV, headers=headers), 503)
    # The job is recorded (the reaper will queue it): its file and import row stay with it.
    job, run, _, data = stored_file(committed_db, first["job_id"])
    assert job.state == "PENDING"
    assert job.published_at is None
    assert data == FEATURES_CSV
    assert run.target == "features"
    recorded = counts(committed_db)
    assert recorded == {k: v + 1 for k, v in before.items()}

    again = problem(post_import(down, tokens.write, FEATURES_CSV, headers=headers), 503)
    assert again["job_id"] == first["job_id"]
    assert counts(committed_db) == recorded  # the retry's own copy was discarded

    recovered = post_import(client, tokens.write, FEATURES_CSV, headers=headers)
    assert recovered.status_code == 200
    assert recovered.get_json()["id"] == first["job_id"]
    assert counts(committed_db) == recorded
    queued_message(broker, first["job_id"], queue="imports")


# --- through a real HTTP server ----------------------------------------------------------------


@pytest.fixture
def small_live_server(small_app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, small_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _generate(content: bytes, size: int = 100) -> Iterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


def test_chunked_transfer_encoding_over_http(
    small_live_server: str, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    content = features_csv(20)
    assert len(content) < SMALL_LIMIT
    before = counts(committed_db)
    # requests sends a generator body with Transfer-Encoding: chunked, no Content-Length.
    response = requests.post(
        f"{small_live_server}{URL}?target=features",
        data=_generate(content),
        headers={**tokens.write.headers, "Content-Type": "text/csv"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    _, _, _, data = stored_file(committed_db, response.json()["id"])
    assert data == content
    accepted = counts(committed_db)
    assert accepted["uploads"] == before["uploads"] + 1

    too_big = features_csv(100)
    assert len(too_big) > SMALL_LIMIT
    response = requests.post(
        f"{small_live_server}{URL}?target=features",
        data=_generate(too_big),
        headers={**tokens.write.headers, "Content-Type": "text/csv"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert counts(committed_db) == accepted


@pytest.fixture(params=WEB_SERVERS)
def small_server(
    request: pytest.FixtureRequest, settings: Settings, committed_db: Database, tmp_path: Path
) -> Iterator[str]:
    """The real server (each de-chunks request bodies itself) with a 1000-byte upload limit."""
    with run_web(
        settings,
        tmp_path / "web.log",
        request.param,
        workers=1,
        CONVEYOR_IMPORT_MAX_BYTES=str(SMALL_LIMIT),
    ) as url:
        yield url


def test_chunked_and_sized_uploads_under_each_server(
    small_server: str, tokens: Tokens, committed_db: Database, broker: redis.Redis
) -> None:
    url = f"{small_server}{URL}?target=features"
    headers = {**tokens.write.headers, "Content-Type": "text/csv"}
    content = features_csv(20)
    response = requests.post(url, data=_generate(content), headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    assert stored_file(committed_db, response.json()["id"])[3] == content
    accepted = counts(committed_db)

    too_big = features_csv(100)
    for body in (_generate(too_big), too_big):  # chunked, then with Content-Length
        response = requests.post(url, data=body, headers=headers, timeout=30)
        assert response.status_code == 413
        assert response.headers["Content-Type"] == "application/problem+json"
    gzipped = requests.post(
        url,
        data=_generate(gzip.compress(too_big)),
        headers={**headers, "Content-Encoding": "gzip"},
        timeout=30,
    )
    assert gzipped.status_code == 413
    assert counts(committed_db) == accepted


# --- the report ------------------------------------------------------------------------------


def _submit(client: FlaskClient, token: Token) -> str:
    response = post_import(client, token, FEATURES_CSV)
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id: str = response.get_json()["id"]
    return job_id


def _fill_run(db: Database, job_id: str, **values: Any) -> None:
    with db.session() as s:
        s.execute(update(ImportRun).where(ImportRun.job_id == uuid.UUID(job_id)).values(**values))
        s.commit()


def _add_errors(
    db: Database, job_id: str, rows: list[tuple[int, str | None, str, str | None]]
) -> None:
    with db.session() as s:
        s.add_all(
            ImportError_(
                job_id=uuid.UUID(job_id), line=line, column=column, reason=reason, excerpt=excerpt
            )
            for line, column, reason, excerpt in rows
        )
        s.commit()


def test_summary_reports_the_committed_counters(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    _fill_run(
        committed_db,
        job_id,
        rows_read=3000,
        rows_inserted=2000,
        rows_updated=500,
        rows_unchanged=400,
        rows_rejected=90,
        rows_duplicate=10,
        chunks=3,
        byte_offset=123_456,
        line=3001,
        busy_s=1.5,
    )
    progress = {
        "done": 123_456,
        "total": len(FEATURES_CSV),
        "percent": 50.0,
        "eta_seconds": 1.5,
        "message": "3000 rows",
        "rows_per_s": 2000.0,
        "internal": "not shown",
    }
    set_job(committed_db, job_id, state="PROGRESS", progress=progress, started_at=func.now())

    response = client.get(f"{URL}/{job_id}", headers=tokens.write.headers)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["id"] == job_id
    assert body["kind"] == "import"
    assert body["state"] == "PROGRESS"
    assert body["progress"] == {k: v for k, v in progress.items() if k != "internal"}
    assert "params" not in body
    assert {
        k: body[k]
        for k in (
            "rows_read",
            "rows_inserted",
            "rows_updated",
            "rows_unchanged",
            "rows_rejected",
            "rows_duplicate",
            "chunks",
            "byte_offset",
            "line",
            "duration_s",
            "rows_per_s",
        )
    } == {
        "rows_read": 3000,
        "rows_inserted": 2000,
        "rows_updated": 500,
        "rows_unchanged": 400,
        "rows_rejected": 90,
        "rows_duplicate": 10,
        "chunks": 3,
        "byte_offset": 123_456,
        "line": 3001,
        "duration_s": 1.5,
        "rows_per_s": 2000.0,
    }
    assert body["target"] == "features"
    assert body["format"] == "csv"
    assert body["max_errors"] == 1000
    assert body["size_bytes"] == len(FEATURES_CSV)
    assert body["sha256"] == hashlib.sha256(FEATURES_CSV).hexdigest()
    assert body["columns"] == HEADER.split(",")
    assert body["links"] == {
        "self": f"/api/v1/imports/{job_id}",
        "job": f"/api/v1/jobs/{job_id}",
        "errors": f"/api/v1/imports/{job_id}/errors",
    }


def test_summary_before_any_work_has_no_rate(client: FlaskClient, tokens: Tokens) -> None:
    job_id = _submit(client, tokens.write)
    body = client.get(f"{URL}/{job_id}", headers=tokens.read.headers)
    assert body.status_code == 404  # the read token is another owner
    body = client.get(f"{URL}/{job_id}", headers=tokens.write.headers).get_json()
    assert body["state"] == "PENDING"
    assert body["rows_read"] == 0
    assert body["duration_s"] == 0
    assert body["rows_per_s"] is None


def test_imports_are_visible_to_their_owner_and_admin_only(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    _add_errors(committed_db, job_id, [(2, "name", "required", "")])
    for path in (f"{URL}/{job_id}", f"{URL}/{job_id}/errors"):
        problem(client.get(path, headers=tokens.other.headers), 404)
        problem(client.get(path, headers={**tokens.other.headers, "Accept": "text/csv"}), 404)
        assert client.get(path, headers=tokens.admin.headers).status_code == 200
        assert client.get(path, headers=tokens.write.headers).status_code == 200


def test_unknown_and_non_import_ids_are_404(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    canary = insert_job(committed_db, owner=tokens.write.id)
    for job_id in (canary, uuid.uuid4()):
        problem(client.get(f"{URL}/{job_id}", headers=tokens.write.headers), 404)
        problem(client.get(f"{URL}/{job_id}/errors", headers=tokens.write.headers), 404)
    problem(client.get(f"{URL}/not-a-uuid", headers=tokens.write.headers), 400)


def test_errors_are_paginated_in_line_order(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    _add_errors(
        committed_db,
        job_id,
        [
            (9, "status", "must be one of: planned, …", "shipped"),
            (3, "name", "required", None),
            (5, None, "wrong number of columns: 9, expected 6", "a,b,c"),
            (4, "complexity_points", "must be an integer ≥ 0", "-1"),
            (7, "external_id", "repeated in this file", "F-1"),
        ],
    )
    path = f"{URL}/{job_id}/errors"
    first = client.get(path, query_string={"page_size": 2}, headers=tokens.write.headers)
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    body = first.get_json()
    assert body["total"] == 5
    assert (body["page"], body["page_size"]) == (1, 2)
    assert body["items"] == [
        {"line": 3, "column": "name", "reason": "required", "excerpt": None},
        {
            "line": 4,
            "column": "complexity_points",
            "reason": "must be an integer ≥ 0",
            "excerpt": "-1",
        },
    ]
    assert body["links"]["self"] == f"{path}?page=1&page_size=2"
    assert body["links"]["next"] == f"{path}?page=2&page_size=2"
    assert body["links"]["prev"] is None
    assert body["links"]["import"] == f"{URL}/{job_id}"

    last = client.get(
        body["links"]["next"].replace("page=2", "page=3"), headers=tokens.write.headers
    )
    body = last.get_json()
    assert [e["line"] for e in body["items"]] == [9]
    assert body["links"]["next"] is None
    assert body["links"]["prev"] == f"{path}?page=2&page_size=2"

    for bad in ({"page": "0"}, {"page_size": "1001"}, {"page_size": "x"}):
        problem(client.get(path, query_string=bad, headers=tokens.write.headers), 422)


HOSTILE = [
    "=cmd|' /C calc'!A0",
    "+1",
    "-1",
    "@SUM(1)",
    "\tx",
    "\rx",
    'plain "quoted", with comma\nand newline',
    "'; DROP TABLE features;--",
]


def test_errors_as_csv_are_escaped_against_formulas(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    _add_errors(
        committed_db,
        job_id,
        [(line, value, value, value) for line, value in enumerate(HOSTILE, start=2)]
        + [(100, None, "no column", None)],
    )
    response = client.get(
        f"{URL}/{job_id}/errors", headers={**tokens.write.headers, "Accept": "text/csv"}
    )
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="import-{job_id}-errors.csv"'
    )
    assert response.headers["Vary"] == "Accept"
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True), newline="")))
    assert rows[0] == ["line", "column", "reason", "excerpt"]
    expected = []
    for line, value in enumerate(HOSTILE, start=2):
        escaped = "'" + value if value[0] in "=+-@\t\r" else value
        expected.append([str(line), escaped, escaped, escaped])
    expected.append(["100", "", "no column", ""])
    assert rows[1:] == expected


def test_errors_csv_streams_every_row(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    count = 5000
    _add_errors(
        committed_db,
        job_id,
        [(line, "name", f"reason {line}", "x" * 40) for line in range(count + 1, 1, -1)],
    )
    response = client.get(
        f"{URL}/{job_id}/errors",
        headers={**tokens.write.headers, "Accept": "text/csv, application/json;q=0.5"},
    )
    assert response.status_code == 200
    assert response.is_streamed
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True), newline="")))
    assert len(rows) == count + 1
    assert [int(r[0]) for r in rows[1:]] == list(range(2, count + 2))


def test_errors_default_to_json(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    for accept in ("*/*", "application/json", "text/csv;q=0.1, application/json"):
        response = client.get(
            f"{URL}/{job_id}/errors", headers={**tokens.write.headers, "Accept": accept}
        )
        assert response.mimetype == "application/json"
        assert response.get_json()["total"] == 0


def test_import_progress_is_readable_through_the_job(
    client: FlaskClient, tokens: Tokens, committed_db: Database
) -> None:
    job_id = _submit(client, tokens.write)
    with committed_db.session() as s:
        job = s.get_one(Job, uuid.UUID(job_id))
        upload_id = s.scalar(select(ImportRun.upload_id).where(ImportRun.job_id == job.id))
    assert upload_id is not None
    body = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers).get_json()
    assert body["kind"] == "import"
    assert body["params"]["target"] == "features"


# --- the API description ---------------------------------------------------------------------


def test_openapi_documents_every_route(app: Flask) -> None:
    """docs/openapi.yaml lists exactly the routes and methods the app serves."""
    documented: dict[str, set[str]] = {}
    path = None
    for line in (ROOT / "docs" / "openapi.yaml").read_text().splitlines():
        if match := re.fullmatch(r"  (/\S*):", line):
            path = match.group(1)
            documented[path] = set()
        elif line and not line.startswith(" "):
            path = None
        elif path and (match := re.fullmatch(r"    (get|put|post|patch|delete):", line)):
            documented[path].add(match.group(1).upper())
    served: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        route = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served.setdefault(route, set()).update((rule.methods or set()) - {"HEAD", "OPTIONS"})
    assert documented == served
