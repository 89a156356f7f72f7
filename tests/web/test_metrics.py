"""Prometheus figures through real processes: gunicorn workers, Celery workers, the exporter.

What is proven: the exposition parses (prometheus-client's parser) and passes ``promtool
check metrics``; ``celery_queue_length`` equals the sum of every Redis list of a queue,
priority sub-lists included; ``celery_worker_up`` drops to 0 after the worker is
SIGKILLed; counters from three gunicorn workers add up exactly; a SIGKILLed web
worker's pool connections leave ``conveyor_db_pool_connections`` (granian and gunicorn);
label sets stay bounded after 1000 jobs, and the queue wait of every one of them is
counted once across prefork children; ``/metrics`` answers loopback or the token only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests
from flask import Flask
from prometheus_client import generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from shared.db import Database
from shared.queue import QUEUES, Publisher, priority_lists
from shared.settings import Settings
from tests.conftest import ROOT, WorkerProcess, child_env, wait_until
from tests.web.conftest import (
    WEB_SERVERS,
    Tokens,
    build_app,
    close_app,
    run_web,
    unused_port,
)
from worker.exporter import Exporter, build_registry

pytestmark = pytest.mark.worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float:
    """The sum of ``metric`` over the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


# celery-exporter's name, kept for its dashboards although promtool's lint dislikes a gauge
# ending in _count. Its only finding we accept; anything else fails.
CELERY_EXPORTER_LINT = (
    "celery_active_worker_count non-histogram and non-summary metrics "
    'should not have "_count" suffix'
)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # `make lint`/`make test` install Debian's prometheus package
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert all(line == CELERY_EXPORTER_LINT for line in findings), findings
    # 3 is promtool's "lint problems" status; 1 would be a text it could not parse.
    assert result.returncode in ((3,) if findings else (0,)), result.returncode


@pytest.fixture
def metrics_settings(
    settings: Settings, services: tuple[str, str], tmp_path: Path
) -> Iterator[Settings]:
    """The test settings with a metrics directory and a Redis database of this test's own.

    Celery events travel on the Redis database's channels: in the session's database, a
    concurrent session that drew the same index would add its workers and tasks.
    """
    url = f"{services[1]}/{1 + os.getpid() % 9}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield settings.model_copy(update={"metrics_dir": tmp_path / "metrics", "redis_url": url})
    client.flushdb()
    client.close()


@pytest.fixture
def exporter(metrics_settings: Settings) -> Iterator[Exporter]:
    """An in-process exporter, receiving real Celery events from the test Redis."""
    exp = Exporter(metrics_settings)
    threading.Thread(target=exp.consume, daemon=True).start()
    threading.Thread(target=exp.refresh_queues, daemon=True).start()
    yield exp
    exp.close()


def scrape(exp: Exporter, settings: Settings) -> str:
    return generate_latest(build_registry(exp, settings)).decode()


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.delete(*(name for q in QUEUES for name in priority_lists(q)))
    client.close()


@pytest.fixture
def own_broker(metrics_settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(metrics_settings.redis_url or "")


def test_web_metrics_parse_and_pass_promtool(
    settings: Settings, committed_db: Database, tokens: Tokens, broker: redis.Redis
) -> None:
    app = build_app(settings)
    try:
        client = app.test_client()
        client.get("/healthz")
        client.post("/api/v1/canaries", json={}, headers=tokens.write.headers)
        missing = str(uuid.uuid4())
        client.get(f"/api/v1/jobs/{missing}", headers=tokens.read.headers)
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.get_data(as_text=True)
    finally:
        close_app(app)
    samples = parse(text)
    assert value(samples, "conveyor_http_request_duration_seconds_count", route="/healthz") >= 1
    # The route is the URL rule: a job id never becomes a label value.
    assert value(samples, "conveyor_http_request_duration_seconds_count", status="404") >= 1
    assert missing not in text
    assert value(samples, "conveyor_jobs_submitted_total", kind="canary") >= 1
    assert value(samples, "conveyor_db_pool_connections", state="idle") >= 1
    promtool_check(text)


def test_metrics_answer_loopback_or_the_token(settings: Settings, committed_db: Database) -> None:
    app = build_app(settings)
    try:
        remote = app.test_client()
        remote.environ_base["REMOTE_ADDR"] = "203.0.113.7"
        assert remote.get("/metrics").status_code == 403
        assert app.test_client().get("/metrics").status_code == 200
    finally:
        close_app(app)
    token = SecretStr("scrape-token-0123456789")
    guarded = build_app(settings.model_copy(update={"metrics_token": token}))
    try:
        client = guarded.test_client()
        assert client.get("/metrics").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.get("/metrics", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer scrape-token-0123456789"}
        assert client.get("/metrics", headers=right).status_code == 200
    finally:
        close_app(guarded)
    off = build_app(settings.model_copy(update={"metrics_enabled": False}))
    try:
        assert off.test_client().get("/metrics").status_code == 404
    finally:
        close_app(off)


def test_queue_length_sums_every_priority_sublist(
    metrics_settings: Settings, own_broker: redis.Redis, committed_db: Database
) -> None:
    publisher = Publisher(metrics_settings)
    try:
        # No worker consumes: the messages wait, spread over kombu's priority lists.
        for n in range(12):
            publisher.app.send_task(
                "conveyor.canary.run",
                args=[str(uuid.uuid4())],
                queue="default",
                priority=n % 10,
            )
    finally:
        publisher.app.close()
    lists = {name: own_broker.llen(name) for name in priority_lists("default")}
    assert sum(1 for n in lists.values() if n) >= 2, lists  # sub-lists really are in play
    exp = Exporter(metrics_settings)
    try:
        text = scrape(exp, metrics_settings)
    finally:
        exp.close()
    samples = parse(text)
    assert value(samples, "celery_queue_length", queue_name="default") == sum(lists.values()) == 12
    assert value(samples, "conveyor_queue_reserved", queue_name="default") == 0
    promtool_check(text)


@pytest.fixture
def exporter_process(
    metrics_settings: Settings, tmp_path: Path
) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes]]]]:
    """Start ``python -m worker.exporter`` (the real process) on a free port."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = unused_port()
        with (tmp_path / f"exporter-{len(started)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.exporter"],
                cwd=ROOT,
                env=child_env(
                    metrics_settings,
                    CONVEYOR_EXPORTER_PORT=str(port),
                    CONVEYOR_METRICS_DIR=str(metrics_settings.metrics_path),
                    **env,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        url = f"http://127.0.0.1:{port}/metrics"

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "exporter-0.log").read_text()
            try:
                return requests.get(url, timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(up, timeout=30)
        return url, proc

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def test_worker_up_drops_to_zero_after_sigkill(
    metrics_settings: Settings,
    committed_db: Database,
    tmp_path: Path,
    exporter_process: Callable[..., tuple[str, subprocess.Popen[bytes]]],
) -> None:
    url, _ = exporter_process(CONVEYOR_WORKER_HEARTBEAT_TIMEOUT_S="4")
    worker = WorkerProcess(metrics_settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()

        def worker_up() -> float:
            return value(parse(requests.get(url, timeout=5).text), "celery_worker_up")

        wait_until(lambda: worker_up() == 1, timeout=30)
        worker.kill()  # SIGKILL: no worker-offline event is ever sent
        wait_until(lambda: worker_up() == 0, timeout=30)
    finally:
        if worker.proc.poll() is None:
            worker.stop()


@pytest.mark.parametrize("server", WEB_SERVERS)
def test_counters_of_every_worker_add_up_and_go_with_the_server(
    metrics_settings: Settings, committed_db: Database, tmp_path: Path, server: str
) -> None:
    """granian's launcher and gunicorn's hooks: one directory, every worker's files in it,
    sums on /metrics from any worker, the directory removed when the server stops."""
    metrics_dir = metrics_settings.metrics_path
    with run_web(
        metrics_settings,
        tmp_path / "web.log",
        server,
        workers=3,
        CONVEYOR_METRICS_DIR=str(metrics_dir),
    ) as url:
        sent = 0
        # Fresh connections until at least two workers have answered (their own files).
        while len({p.name for p in metrics_dir.glob("web-*/histogram_*.db")}) < 2 or sent < 60:
            requests.get(f"{url}/readyz", timeout=5, headers={"Connection": "close"})
            sent += 1
            assert sent < 3000, f"one {server} worker answered every request"
        samples = parse(requests.get(f"{url}/metrics", timeout=5).text)
        count = value(samples, "conveyor_http_request_duration_seconds_count", route="/readyz")
        assert count == sent
    assert not list(metrics_dir.glob("web-*"))


@pytest.mark.parametrize("server", WEB_SERVERS)
def test_a_killed_workers_pool_connections_stop_counting(
    metrics_settings: Settings, committed_db: Database, tokens: Tokens, tmp_path: Path, server: str
) -> None:
    """``conveyor_db_pool_connections`` sums live processes only: a SIGKILLed worker's
    connections leave the sum once the server has replaced it (gunicorn's hook; for
    granian, which has none, the scrape itself)."""
    metrics_dir = metrics_settings.metrics_path
    with run_web(
        metrics_settings,
        tmp_path / "web.log",
        server,
        workers=2,
        CONVEYOR_METRICS_DIR=str(metrics_dir),
    ) as url:

        def live_files() -> list[Path]:
            return sorted(metrics_dir.glob("web-*/gauge_livesum_*.db"))

        def held(file: Path) -> float:
            return sum(
                v
                for key, v, *_ in MmapedDict.read_all_values_from_file(str(file))
                if json.loads(key)[0] == "conveyor_db_pool_connections"
            )

        def pool_total() -> float:
            samples = parse(requests.get(f"{url}/metrics", timeout=5).text)
            return value(samples, "conveyor_db_pool_connections")

        sent = 0
        # Fresh connections until both workers hold a pooled connection. (A connection goes
        # back to the pool at the request's teardown, after the answer: hence the wait.)
        while len(live_files()) < 2 or not all(held(f) >= 1 for f in live_files()):
            response = requests.get(
                f"{url}/api/v1/jobs",
                timeout=5,
                headers={**tokens.read.headers, "Connection": "close"},
            )
            assert response.status_code == 200
            sent += 1
            assert sent < 3000, f"one {server} worker answered every request"
            time.sleep(0.01)
        victim = live_files()[0]
        pid = int(victim.stem.rpartition("_")[2])
        before, dead = pool_total(), held(victim)
        os.kill(pid, signal.SIGKILL)

        def settled() -> bool:
            # The scrape comes first: for granian it is what forgets the dead worker.
            try:
                total = pool_total()
            except requests.ConnectionError:  # a connection the dead worker had accepted
                return False
            return total == before - dead and not victim.exists()

        wait_until(settled, timeout=20)


@pytest.mark.slow
def test_label_sets_stay_bounded_after_1000_jobs(
    metrics_settings: Settings,
    committed_db: Database,
    tokens: Tokens,
    tmp_path: Path,
    exporter: Exporter,
) -> None:
    app: Flask = build_app(metrics_settings)
    # This process's own counters (web's, the event counters) may hold earlier tests' counts.
    web_before = parse(app.test_client().get("/metrics").get_data(as_text=True))
    events_before = parse(scrape(exporter, metrics_settings))
    worker = WorkerProcess(
        metrics_settings,
        tmp_path / "worker.log",
        extra_env={"CONVEYOR_METRICS_DIR": str(metrics_settings.metrics_path)},
    )
    try:
        worker.wait_ready()
        client = app.test_client()
        ids = []
        for _ in range(1000):
            response = client.post("/api/v1/canaries", json={}, headers=tokens.write.headers)
            assert response.status_code == 202
            ids.append(response.get_json()["id"])

        def all_counted() -> bool:
            samples = parse(scrape(exporter, metrics_settings))
            done = value(samples, "conveyor_job_duration_seconds_count", kind="canary")
            return done == 1000

        wait_until(all_counted, timeout=600, interval=1)
        web_text = app.test_client().get("/metrics").get_data(as_text=True)
    finally:
        worker.stop()
        close_app(app)
    exporter_text = scrape(exporter, metrics_settings)
    for text, before in ((web_text, web_before), (exporter_text, events_before)):
        samples = parse(text)
        label_values = {v for _, labels in samples for _, v in labels}
        assert not label_values & set(ids), "a job id became a label value"
        # A thousand jobs add a few series (a route, a kind, an outcome, their buckets),
        # never one per job. (Earlier tests in this process may have added others before.)
        assert len(set(samples) - set(before)) < 300, "series grew with the number of jobs"
        promtool_check(text)
    samples = parse(exporter_text)
    # Every job counted once, across the worker's two prefork children.
    assert value(samples, "conveyor_job_queue_wait_seconds_count", kind="canary") == 1000
    assert value(samples, "conveyor_job_duration_seconds_count", outcome="success") == 1000
    succeeded = "celery_task_succeeded_total"
    assert (
        value(samples, succeeded, name="conveyor.canary.run")
        - value(events_before, succeeded, name="conveyor.canary.run")
        == 1000
    )
    assert value(samples, "conveyor_jobs", kind="canary", state="SUCCESS") == 1000
    submitted = "conveyor_jobs_submitted_total"
    assert (
        value(parse(web_text), submitted, kind="canary")
        - value(web_before, submitted, kind="canary")
        == 1000
    )
