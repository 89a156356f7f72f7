"""An import end to end: HTTP upload → a real worker process → the report over HTTP."""

from __future__ import annotations

import csv
import gzip
import io

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from shared.db import Database
from shared.models import Feature
from tests.conftest import WorkerProcess, wait_until
from tests.web.conftest import Tokens

pytestmark = pytest.mark.worker


def test_upload_runs_and_reports(
    client: FlaskClient, tokens: Tokens, committed_db: Database, worker: WorkerProcess
) -> None:
    rows = [
        f"E-{i},Feature {i},,in_progress,{i % 5},2024-03-0{1 + i % 9}T08:00:00Z"
        for i in range(2300)
    ]
    rows[100] = "E-100,,,in_progress,1,"  # line 102: no name
    body = gzip.compress(
        (
            "external_id,name,description,status,complexity_points,created_at\n"
            + "\n".join(rows)
            + "\n"
        ).encode()
    )
    posted = client.post(
        "/api/v1/imports?target=features",
        data=body,
        headers={**tokens.write.headers, "Content-Type": "text/csv", "Content-Encoding": "gzip"},
    )
    assert posted.status_code == 202, posted.get_data(as_text=True)
    job_id = posted.get_json()["id"]

    def done() -> dict[str, object] | None:
        report = client.get(f"/api/v1/imports/{job_id}", headers=tokens.write.headers).get_json()
        return report if report["state"] in {"SUCCESS", "FAILURE", "REVOKED"} else None

    report = wait_until(done, timeout=60)
    assert isinstance(report, dict)
    assert report["state"] == "SUCCESS"
    assert report["rows_read"] == 2300
    assert report["rows_inserted"] == 2299
    assert report["rows_rejected"] == 1
    with committed_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Feature)) == 2299
    errors = client.get(
        f"/api/v1/imports/{job_id}/errors",
        headers={**tokens.write.headers, "Accept": "text/csv"},
    )
    assert errors.status_code == 200
    table = list(csv.reader(io.StringIO(errors.get_data(as_text=True))))
    assert table[0] == ["line", "column", "reason", "excerpt"]
    assert table[1][:3] == ["102", "name", "is required"]
    job = client.get(f"/api/v1/jobs/{job_id}", headers=tokens.write.headers).get_json()
    assert job["progress"]["percent"] == 100.0
    assert job["progress"]["rows"] == 2300
