"""Deployments through real worker processes, real commands and real HTTP servers."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from shared import jobs
from shared.db import Database
from shared.deployments import reconcile_finished
from shared.models import Job
from shared.queue import Publisher
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.worker.deploying import (
    Seen,
    current_version,
    finished,
    make_environment,
    make_feature,
    seen,
    submit,
)

pytestmark = pytest.mark.worker

SECRET = "whsec-" + uuid.uuid4().hex  # what the worker signs with; must leak nowhere
FAST = {
    "CONVEYOR_WEBHOOK_SECRET": SECRET,
    "CONVEYOR_DEPLOY_WEBHOOK_BACKOFF_S": "0.1",
    "CONVEYOR_DEPLOY_VERIFY_TIMEOUT_S": "2",
    "CONVEYOR_DEPLOY_VERIFY_INTERVAL_S": "0.2",
}
# A short lease, so a killed worker's deployment is reaped in seconds.
FAST_LEASE = {**FAST, "CONVEYOR_JOB_LEASE_S": "2"}

SCRIPT = """\
import sys, time
log, version, environment = sys.argv[1:4]
with open(log, "a") as f:
    f.write(f"start {environment} {version}\\n")
if version.startswith("sleep-"):
    time.sleep(float(version.split("-")[1]))
if version.startswith("fail"):
    print("partial output on stdout")
    print("boom: cannot reach the cluster", file=sys.stderr)
    sys.exit(3)
print(f"deployed {version} to {environment}")
with open(log, "a") as f:
    f.write(f"end {environment} {version}\\n")
"""


@pytest.fixture
def script(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A deploy script that logs what it deploys; (log path, command-driver config)."""
    path = tmp_path / "deploy.py"
    path.write_text(SCRIPT)
    log = tmp_path / "deployed.log"
    argv = [sys.executable, str(path), str(log), "{version}", "{environment}"]
    return log, {"argv": argv, "timeout_s": 30}


@pytest.fixture
def fast_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(concurrency=4, extra_env=FAST)


def done(db: Database, job_id: uuid.UUID, timeout: float = 60) -> Seen:
    result = wait_until(lambda: finished(db, job_id), timeout=timeout)
    assert isinstance(result, Seen)
    return result


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# --- the record driver, the steps -----------------------------------------------------------


def test_record_deployment_goes_through_every_step(
    settings: Settings, committed_db: Database, fast_worker: WorkerProcess, redis_url: str
) -> None:
    env = make_environment(committed_db, "staging", current_version="1.0")
    feature = make_feature(committed_db, "F-1", ("passed",))
    cache = redis.Redis.from_url(redis_url)
    cache.set("deployments:stats:staging:24h", "{}")
    cache.set("deployments:stats:prod:24h", "{}")
    job_id = submit(committed_db, settings, feature, env, "1.1")
    got = done(committed_db, job_id)
    assert got.job.state == "SUCCESS", got.job.error
    assert got.steps == [
        ("queued", "info"),
        ("validate", "started"),
        ("validate", "succeeded"),
        ("deploy", "started"),
        ("deploy", "succeeded"),
        ("verify", "started"),
        ("verify", "skipped"),
        ("record", "started"),
        ("record", "succeeded"),
    ]
    assert got.deployment.status == "succeeded"
    assert got.deployment.previous_version == "1.0"
    assert got.job.result is not None
    assert got.job.result["version"] == "1.1"
    assert current_version(committed_db, env) == "1.1"
    # Finishing invalidated that environment's stats, and only those.
    assert not cache.exists("deployments:stats:staging:24h")
    assert cache.exists("deployments:stats:prod:24h")
    cache.close()


def test_test_cases_that_stopped_passing_fail_validation(
    settings: Settings, committed_db: Database, fast_worker: WorkerProcess
) -> None:
    env = make_environment(committed_db, "staging", current_version="1.0")
    feature = make_feature(committed_db, "F-1", ("passed", "failed"))
    job_id = submit(committed_db, settings, feature, env, "1.1")
    got = done(committed_db, job_id)
    assert got.job.state == "FAILURE"
    assert got.job.error == {
        "code": "validation_failed",
        "message": "test cases not passed: F-1-T1 (failed)",
    }
    assert ("deploy", "started") not in got.steps
    assert current_version(committed_db, env) == "1.0"
    forced = done(committed_db, submit(committed_db, settings, feature, env, "1.2", force=True))
    assert forced.job.state == "SUCCESS"


# --- the command driver ------------------------------------------------------------------------


def test_command_driver_runs_the_script_and_keeps_its_output(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(committed_db, "staging", "command", config)
    feature = make_feature(committed_db, "F-1")
    got = done(committed_db, submit(committed_db, settings, feature, env, "2.0"))
    assert got.job.state == "SUCCESS", got.job.error
    assert log_lines(log) == ["start staging 2.0", "end staging 2.0"]
    deploy = next(e for e in got.events if e.step == "deploy" and e.status == "succeeded")
    assert deploy.message == "exited 0\nstdout:\ndeployed 2.0 to staging"
    assert current_version(committed_db, env) == "2.0"


def test_command_failure_rolls_back_through_the_same_command(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(committed_db, "staging", "command", config, current_version="1.0")
    feature = make_feature(committed_db, "F-1")
    got = done(committed_db, submit(committed_db, settings, feature, env, "fail-2"))
    assert got.job.state == "FAILURE"
    assert got.job.error == {
        "code": "deploy_failed",
        "message": "deploy failed: exited with status 3; rolled back to 1.0",
    }
    failed = next(e for e in got.events if e.step == "deploy" and e.status == "failed")
    assert "stdout:\npartial output on stdout" in failed.message
    assert "stderr:\nboom: cannot reach the cluster" in failed.message
    assert got.steps[-2:] == [("rollback", "started"), ("rollback", "succeeded")]
    assert log_lines(log) == ["start staging fail-2", "start staging 1.0", "end staging 1.0"]
    assert got.deployment.status == "rolled_back"
    assert current_version(committed_db, env) == "1.0"


def test_command_timeout_kills_it_and_rolls_back(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    config = {**config, "timeout_s": 1}
    env = make_environment(committed_db, "staging", "command", config, current_version="1.0")
    feature = make_feature(committed_db, "F-1")
    got = done(committed_db, submit(committed_db, settings, feature, env, "sleep-30"))
    assert got.job.state == "FAILURE"
    assert got.job.error is not None
    assert got.job.error["code"] == "deploy_failed"
    assert got.job.error["message"] == (
        "deploy failed: timed out after 1 s and was killed; rolled back to 1.0"
    )
    assert "end staging sleep-30" not in log_lines(log)
    assert current_version(committed_db, env) == "1.0"


# --- webhooks and health checks -------------------------------------------------------------


class Receiver:
    """A real HTTP server: checks signatures, answers from a script of statuses."""

    def __init__(self) -> None:
        self.answers: dict[str, list[int]] = {}  # action → statuses to answer, in order
        self.healthy = True
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                timestamp = self.headers["X-Conveyor-Timestamp"]
                expected = hmac.new(
                    SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
                ).hexdigest()
                valid = hmac.compare_digest(
                    self.headers["X-Conveyor-Signature"], f"sha256={expected}"
                )
                payload = json.loads(body)
                receiver.calls.append(
                    {"payload": payload, "valid": valid, "headers": dict(self.headers)}
                )
                queue = receiver.answers.get(payload["action"], [])
                status = 401 if not valid else (queue.pop(0) if queue else 200)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"nope")

            def do_GET(self) -> None:
                self.send_response(200 if receiver.healthy else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_webhook_retries_5xx_then_succeeds_signed(
    settings: Settings, committed_db: Database, fast_worker: WorkerProcess, receiver: Receiver
) -> None:
    env = make_environment(
        committed_db, "staging", "webhook", {"url": f"{receiver.url}/deploy", "timeout_s": 5}
    )
    feature = make_feature(committed_db, "F-1")
    receiver.answers["deploy"] = [500, 502]
    job_id = submit(committed_db, settings, feature, env, "3.0")
    got = done(committed_db, job_id)
    assert got.job.state == "SUCCESS", got.job.error
    assert len(receiver.calls) == 3
    assert all(call["valid"] for call in receiver.calls)
    assert {call["headers"]["X-Conveyor-Delivery"] for call in receiver.calls} == {
        f"{job_id}:deploy:3.0"
    }
    assert receiver.calls[0]["payload"] == {
        "action": "deploy",
        "deployment_id": got.deployment.id,
        "job_id": str(job_id),
        "feature": "F-1",
        "environment": "staging",
        "version": "3.0",
        "previous_version": None,
    }
    deploy = next(e for e in got.events if e.step == "deploy" and e.status == "succeeded")
    assert deploy.message == "HTTP 200 after 3 attempts: ok"


def test_webhook_4xx_fails_at_once_and_rolls_back(
    settings: Settings, committed_db: Database, fast_worker: WorkerProcess, receiver: Receiver
) -> None:
    env = make_environment(
        committed_db, "staging", "webhook", {"url": receiver.url}, current_version="2.9"
    )
    feature = make_feature(committed_db, "F-1")
    receiver.answers["deploy"] = [400]
    got = done(committed_db, submit(committed_db, settings, feature, env, "3.0"))
    assert got.job.state == "FAILURE"
    assert got.job.error == {
        "code": "deploy_failed",
        "message": "deploy failed: webhook answered HTTP 400: nope; rolled back to 2.9",
    }
    assert [(c["payload"]["action"], c["payload"]["version"]) for c in receiver.calls] == [
        ("deploy", "3.0"),
        ("rollback", "2.9"),
    ]
    assert current_version(committed_db, env) == "2.9"


def test_failing_health_check_rolls_back_and_keeps_the_previous_version(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    receiver: Receiver,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(
        committed_db, "staging", "command", config, health_check_url=f"{receiver.url}/healthz"
    )
    feature = make_feature(committed_db, "F-1")
    first = done(committed_db, submit(committed_db, settings, feature, env, "1.0"))
    assert first.job.state == "SUCCESS", first.job.error
    receiver.healthy = False
    got = done(committed_db, submit(committed_db, settings, feature, env, "2.0"))
    assert got.job.state == "FAILURE"
    assert got.job.error is not None
    assert got.job.error["code"] == "verify_failed"
    assert got.job.error["message"].endswith("(last: HTTP 503); rolled back to 1.0")
    assert ("verify", "failed") in got.steps
    assert log_lines(log)[-2:] == ["start staging 1.0", "end staging 1.0"]
    assert current_version(committed_db, env) == "1.0"


def test_the_webhook_secret_is_nowhere_but_the_signature(
    settings: Settings,
    committed_db: Database,
    start_worker: Callable[..., WorkerProcess],
    receiver: Receiver,
    redis_url: str,
) -> None:
    env = make_environment(committed_db, "staging", "webhook", {"url": receiver.url})
    feature = make_feature(committed_db, "F-1")
    receiver.answers["deploy"] = [503]
    job_id = submit(committed_db, settings, feature, env, "1.0")
    client = redis.Redis.from_url(redis_url)
    # The message as published: what Flower lists as the task's args (argsrepr/kwargsrepr).
    raw = [m for m in client.lrange("deployments", 0, -1) if str(job_id).encode() in m]
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["argsrepr"] == repr([str(job_id)])
    assert message["headers"]["kwargsrepr"] == "{}"
    worker = start_worker(extra_env={**FAST, "CONVEYOR_LOG_LEVEL": "DEBUG"})
    got = done(committed_db, job_id)
    assert got.job.state == "SUCCESS", got.job.error
    assert all(call["valid"] for call in receiver.calls)

    everything: list[bytes] = [raw[0]]
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        everything.append(key)
        if kind == b"string":
            everything.append(client.get(key) or b"")
        elif kind == b"list":
            everything.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            everything.extend(v for pair in client.hgetall(key).items() for v in pair)
        elif kind == b"set":
            everything.extend(client.smembers(key))
        elif kind == b"zset":
            everything.extend(client.zrange(key, 0, -1))
    client.close()
    assert not [blob for blob in everything if SECRET.encode() in blob]
    with committed_db.session() as s:
        job = s.get_one(Job, job_id)
        row = json.dumps([job.params, job.result, job.error, job.progress], default=str)
    assert SECRET not in row
    assert all(SECRET not in e.message for e in got.events)
    text = worker.log_path.read_text()
    assert str(job_id) in text
    assert SECRET not in text


# --- one at a time per environment --------------------------------------------------------------


def test_ten_deployments_to_one_environment_never_overlap(
    settings: Settings,
    committed_db: Database,
    start_worker: Callable[..., WorkerProcess],
    script: tuple[Path, dict[str, Any]],
) -> None:
    _, config = script
    busy = make_environment(committed_db, "busy", "command", config)
    others = [
        make_environment(committed_db, name, "command", config) for name in ("side-a", "side-b")
    ]
    feature = make_feature(committed_db, "F-1")
    start_worker(concurrency=4, extra_env=FAST)
    queue = [submit(committed_db, settings, feature, busy, f"sleep-0.3-n{i}") for i in range(10)]
    side = [
        submit(committed_db, settings, feature, env, f"sleep-1.5-s{i}")
        for env in others
        for i in range(2)
    ]
    # While the first one runs, the others are visibly waiting, naming the holder.
    wait_until(lambda: any(("waiting", "info") in seen(committed_db, j).steps for j in queue[1:]))
    results = [done(committed_db, job_id, timeout=180) for job_id in queue + side]
    assert [r.job.state for r in results] == ["SUCCESS"] * len(results), [
        r.job.error for r in results
    ]
    busy_runs = results[: len(queue)]
    waited = [e.message for r in busy_runs for e in r.events if e.step == "waiting"]
    assert any(f"held by job {queue[0]}" in m for m in waited), waited

    intervals = sorted((r.holding(), r.deployment.version) for r in busy_runs)
    for (first, _), (second, _) in itertools.pairwise(intervals):
        assert first[1] < second[0], "two deployments held one environment at once"
    # Submission order is the order they ran in.
    assert [v for _, v in intervals] == [f"sleep-0.3-n{i}" for i in range(10)]
    last = max(busy_runs, key=lambda r: r.holding()[1])
    assert current_version(committed_db, busy) == last.deployment.version
    # Other environments ran alongside.
    for r in results[len(queue) :]:
        start, end = r.holding()
        assert any(s < end and start < e for (s, e), _ in intervals), r.deployment.version


def test_killed_worker_ends_its_deployment_and_the_next_one_runs(
    settings: Settings,
    committed_db: Database,
    start_worker: Callable[..., WorkerProcess],
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(committed_db, "prod", "command", config, current_version="1.0")
    feature = make_feature(committed_db, "F-1")
    first = start_worker(concurrency=2, extra_env=FAST_LEASE)
    doomed = submit(committed_db, settings, feature, env, "sleep-20")
    wait_until(lambda: ("deploy", "started") in seen(committed_db, doomed).steps)
    following = submit(committed_db, settings, feature, env, "2.0")
    wait_until(lambda: ("waiting", "info") in seen(committed_db, following).steps)
    first.kill()  # SIGKILL to every process of that worker: nothing acknowledges or cleans up

    # Its lease lapses; the reaper hands the job to the next worker, which rolls back.
    def reaped() -> bool:
        with committed_db.session() as s:
            return (
                jobs.reap_stale_jobs(s, Publisher(settings), republish_after_s=3600)["republished"]
                > 0
            )

    wait_until(reaped, timeout=30, interval=0.5)
    start_worker(concurrency=2, extra_env=FAST_LEASE)
    lost = done(committed_db, doomed)
    assert lost.job.state == "FAILURE"
    assert lost.job.error == {
        "code": "worker_lost",
        "message": "the worker running this deployment stopped during deploy; rolled back to 1.0",
    }
    assert lost.deployment.status == "rolled_back"
    nxt = done(committed_db, following)
    assert nxt.job.state == "SUCCESS", nxt.job.error
    assert nxt.deployment.previous_version == "1.0"
    assert current_version(committed_db, env) == "2.0"
    assert lost.holding()[1] < nxt.holding()[0]
    assert "start prod 1.0" in log_lines(log)


# --- cancel --------------------------------------------------------------------------------


def test_cancelled_waiting_deployment_never_starts(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(committed_db, "staging", "command", config)
    feature = make_feature(committed_db, "F-1")
    holder = submit(committed_db, settings, feature, env, "sleep-2")
    waiting = submit(committed_db, settings, feature, env, "never")
    after = submit(committed_db, settings, feature, env, "after")
    wait_until(lambda: seen(committed_db, waiting).job.progress is not None)
    with committed_db.session() as s:
        cancelled = jobs.cancel(s, Publisher(settings), s.get_one(Job, waiting))
    assert cancelled.state == "REVOKED"
    assert done(committed_db, holder).job.state == "SUCCESS"
    assert done(committed_db, after).job.state == "SUCCESS"
    got = seen(committed_db, waiting)
    assert got.job.state == "REVOKED"
    assert not any(step in ("validate", "deploy") for step, _ in got.steps)
    assert "start staging never" not in log_lines(log)
    with committed_db.session() as s:
        closed, _, environments = reconcile_finished(s)
    assert (closed, environments) == (1, {"staging"})
    assert seen(committed_db, waiting).deployment.status == "cancelled"
    assert current_version(committed_db, env) == "after"


def test_cancelled_running_deployment_stops_before_its_next_step_and_rolls_back(
    settings: Settings,
    committed_db: Database,
    fast_worker: WorkerProcess,
    script: tuple[Path, dict[str, Any]],
) -> None:
    log, config = script
    env = make_environment(committed_db, "staging", "command", config, current_version="1.0")
    feature = make_feature(committed_db, "F-1")
    job_id = submit(committed_db, settings, feature, env, "sleep-2")
    wait_until(lambda: ("deploy", "started") in seen(committed_db, job_id).steps)
    with committed_db.session() as s:
        jobs.cancel(s, Publisher(settings), s.get_one(Job, job_id))
    got = done(committed_db, job_id)
    assert got.job.state == "REVOKED"
    assert got.deployment.status == "cancelled"
    assert ("verify", "started") not in got.steps
    assert got.steps[-3:] == [
        ("cancel", "info"),
        ("rollback", "started"),
        ("rollback", "succeeded"),
    ]
    assert log_lines(log)[-2:] == ["start staging 1.0", "end staging 1.0"]
    assert current_version(committed_db, env) == "1.0"
