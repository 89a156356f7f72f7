"""A real Prometheus (Debian's package) scraping a running stack: gunicorn, exporter, worker.

Jobs are submitted while no worker runs, so the default queue backs up: PromQL must read
that depth. Then a worker starts and runs them: PromQL must read the p95 of their queue
wait, and the request id sent over HTTP must appear in the worker's JSON log lines.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.web.conftest import Tokens, run_gunicorn, unused_port
from tests.web.test_metrics import (  # noqa: F401 - fixtures shared with the metrics tests
    exporter_process,
    metrics_settings,
)

pytestmark = [pytest.mark.worker, pytest.mark.slow]

JOBS = 5


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """A function starting Prometheus on the given targets; its query URL."""
    binary = shutil.which("prometheus")
    if binary is None:  # `make test` installs Debian's prometheus package when it can
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(targets: dict[str, str]) -> str:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        port = unused_port()
        with (tmp_path / "prometheus.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        binary,
                        f"--config.file={path}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=60)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)


def query(url: str, promql: str) -> list[float]:
    """The values of an instant PromQL query."""
    answer = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    return [float(r["value"][1]) for r in answer["data"]["result"]]


def test_prometheus_reads_queue_depth_and_queue_wait_p95(
    metrics_settings: Settings,  # noqa: F811
    tokens: Tokens,
    tmp_path: Path,
    exporter_process: Any,  # noqa: F811
    prometheus: Any,
) -> None:
    metrics_dir = str(metrics_settings.metrics_path)
    exporter_url, _ = exporter_process()
    with run_gunicorn(
        metrics_settings,
        tmp_path / "web.log",
        "--workers",
        "2",
        "--config",
        "python:web.metrics",
        "--logger-class",
        "web.gunicorn_logging.JsonLogger",
        CONVEYOR_METRICS_DIR=metrics_dir,
    ) as web:
        prom = prometheus(
            {
                "conveyor-web": web.removeprefix("http://"),
                "conveyor-exporter": exporter_url.removeprefix("http://").removesuffix("/metrics"),
            }
        )
        request_id = f"e2e-{uuid.uuid4().hex}"
        headers = {**tokens.write.headers, "X-Request-ID": request_id}
        ids = []
        for _ in range(JOBS):
            response = requests.post(f"{web}/api/v1/canaries", json={}, headers=headers, timeout=10)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        # No worker yet: the queue is backed up, and Prometheus sees exactly that.
        depth = 'celery_queue_length{queue_name="default"}'
        wait_until(lambda: query(prom, depth) == [float(JOBS)], timeout=60, interval=0.5)
        assert query(prom, 'sum(conveyor_jobs{kind="canary",state="PENDING"})') == [JOBS]

        worker = WorkerProcess(
            metrics_settings,
            tmp_path / "worker.log",
            extra_env={"CONVEYOR_METRICS_DIR": metrics_dir},
        )
        try:
            worker.wait_ready()

            def finished() -> bool:
                states = [
                    requests.get(
                        f"{web}/api/v1/jobs/{job_id}", headers=tokens.write.headers, timeout=5
                    ).json()["state"]
                    for job_id in ids
                ]
                return all(state == "SUCCESS" for state in states)

            wait_until(finished, timeout=120, interval=0.5)
            p95 = "histogram_quantile(0.95, sum by (le) (conveyor_job_queue_wait_seconds_bucket))"
            waits = "sum(conveyor_job_queue_wait_seconds_count)"
            wait_until(lambda: query(prom, waits) == [JOBS], timeout=60, interval=0.5)
            # They waited for the worker to start: more than nothing, less than forever.
            (value,) = query(prom, p95)
            assert 0 < value < 3600
            wait_until(lambda: query(prom, depth) == [0.0], timeout=60, interval=0.5)
            assert query(prom, "sum(celery_worker_up)") == [1.0]
            submitted = 'sum(conveyor_jobs_submitted_total{kind="canary"})'
            assert query(prom, submitted) == [JOBS]
        finally:
            worker.stop()

    # The request id travelled from HTTP into the task: the worker's JSON lines carry it.
    lines = [
        json.loads(line)
        for line in (tmp_path / "worker.log").read_text().splitlines()
        if line.startswith("{")
    ]
    tagged = [line for line in lines if line.get("request_id") == request_id]
    assert {line["job_id"] for line in tagged} == set(ids)
    assert all(line["task_id"] == line["job_id"] for line in tagged)
    web_lines = (tmp_path / "web.log").read_text()
    assert request_id in web_lines
    assert tokens.write.plain not in web_lines
    assert tokens.write.plain not in (tmp_path / "worker.log").read_text()
