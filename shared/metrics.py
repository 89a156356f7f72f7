"""Every Prometheus metric Conveyor exposes, defined once, and how processes share them.

Two families, two registries:

* ``REGISTRY``: ``conveyor_*`` figures that web and worker processes record themselves
  (requests, submissions, job waits and durations, import rows, deployments, the pool).
  gunicorn workers and Celery prefork children write them through prometheus-client's
  multiprocess mode (``use_multiprocess_dir``): one directory per server (the gunicorn
  master, the Celery main process), wiped when it starts, files of exited children marked
  dead, so the figures of every child add up when ``collect_dirs`` reads them.
* ``CELERY_REGISTRY``: celery-exporter's names and labels (``celery_task_*_total``,
  ``celery_task_runtime``, ``celery_worker_up`` ...), kept by the one ``conveyor exporter``
  process from Celery events, so existing dashboards and alerts keep working.

Figures read at scrape time (queue lengths, reserved messages, worker liveness, jobs by
state, cache hits) are the exporter's collectors (``worker/exporter.py``), named here.

Labels stay bounded: task and job kinds, queues, routes (the URL rule, never the path),
methods, statuses, outcomes, worker host names. Never a job id, a pid or a URL path.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event

# --- Conveyor's own figures (recorded in web and worker processes) -------------------------

REGISTRY = CollectorRegistry(auto_describe=True)

# Seconds. 0.5 is a bucket edge: the p95 latency alert compares with it.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

HTTP_REQUEST_DURATION = Histogram(
    "conveyor_http_request_duration_seconds",
    "HTTP requests by method, route (the URL rule) and status.",
    ["method", "route", "status"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "conveyor_jobs_submitted",
    "Jobs created through the API (replays of an Idempotency-Key not counted).",
    ["kind"],
    registry=REGISTRY,
)
JOB_QUEUE_WAIT = Histogram(
    "conveyor_job_queue_wait_seconds",
    "From a job's publish (or creation) to its first start, from the job row.",
    ["kind"],
    buckets=WAIT_BUCKETS,
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "conveyor_job_duration_seconds",
    "From a job's first start to its end, by how it ended.",
    ["kind", "outcome"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)
IMPORT_ROWS = Counter(
    "conveyor_import_rows",
    "Rows of finished imports by target table and outcome (inserted, updated, rejected).",
    ["target", "outcome"],
    registry=REGISTRY,
)
DEPLOYMENTS = Counter(
    "conveyor_deployments",
    "Finished deployments by environment and outcome.",
    ["environment", "outcome"],
    registry=REGISTRY,
)
DB_POOL_CONNECTIONS = Gauge(
    "conveyor_db_pool_connections",
    "Pooled database connections of live processes: checked_out or idle.",
    ["state"],
    multiprocess_mode="livesum",  # a dead process's connections are gone with it
    registry=REGISTRY,
)

# --- Scraped by the exporter (names only; values come from its collectors) -----------------

JOBS = "conveyor_jobs"  # {kind,state} gauge: the job table, grouped
QUEUE_RESERVED = "conveyor_queue_reserved"  # {queue_name}: delivered to a worker, unacked
CACHE_REQUESTS = "conveyor_cache_requests"  # {layer,result} counter: shared/cache.py stats
QUEUE_LENGTH = "celery_queue_length"  # {queue_name}: waiting, every priority sub-list
WORKER_UP = "celery_worker_up"  # {hostname}
WORKER_TASKS_ACTIVE = "celery_worker_tasks_active"  # {hostname}
ACTIVE_WORKER_COUNT = "celery_active_worker_count"  # {queue_name}

# --- celery-exporter's task figures (the exporter process, from events) --------------------

CELERY_REGISTRY = CollectorRegistry(auto_describe=True)
TASK_LABELS = ("name", "hostname", "queue_name")
# Event type → counter, as celery-exporter names them (task-failed adds ``exception``).
TASK_EVENT_COUNTERS: dict[str, Counter] = {
    f"task-{what}": Counter(
        f"celery_task_{what}",
        f"Tasks {what}, from the task-{what} event.",
        [*TASK_LABELS, "exception"] if what == "failed" else list(TASK_LABELS),
        registry=CELERY_REGISTRY,
    )
    for what in (
        "sent",
        "received",
        "started",
        "succeeded",
        "failed",
        "retried",
        "revoked",
        "rejected",
    )
}
TASK_RUNTIME = Histogram(
    "celery_task_runtime",
    "Task run time in seconds, from task-succeeded events.",
    list(TASK_LABELS),
    buckets=RUN_BUCKETS,
    registry=CELERY_REGISTRY,
)
TASK_QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_time",
    "Seconds from a task's publish (task-sent, else task-received) to its start.",
    list(TASK_LABELS),
    buckets=WAIT_BUCKETS,
    registry=CELERY_REGISTRY,
)

# --- recording helpers -------------------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """One finished HTTP request (unknown methods are counted as ``other``)."""
    HTTP_REQUEST_DURATION.labels(
        method if method in _METHODS else "other", route, str(status)
    ).observe(seconds)


def record_import_rows(target: str, counts: dict[str, Any]) -> None:
    """A finished import's committed totals (``worker.imports.summary`` keys)."""
    for outcome in ("inserted", "updated", "rejected"):
        n = counts.get(f"rows_{outcome}") or 0
        if n:
            IMPORT_ROWS.labels(target, outcome).inc(n)


def instrument_pool(engine: Engine) -> None:
    """Keep ``conveyor_db_pool_connections`` in step with ``engine``'s pool."""
    gauges = (DB_POOL_CONNECTIONS.labels("checked_out"), DB_POOL_CONNECTIONS.labels("idle"))
    pool: Any = engine.pool
    # A process may hold several engines: each adds what changed in its own pool.
    last = [0, 0]

    def update(returning: int) -> None:
        # The checkin event fires before the connection is back in the pool.
        now = (pool.checkedout() - returning, pool.checkedin() + returning)
        for i, gauge in enumerate(gauges):
            if now[i] != last[i]:
                gauge.inc(now[i] - last[i])
                last[i] = now[i]

    event.listen(engine, "checkout", lambda *_: update(0))
    event.listen(engine, "checkin", lambda *_: update(1))


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (an IP, or ``localhost``) is this machine's loopback."""
    if address == "localhost":
        return True
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def authorize_scrape(token: str | None, authorization: str | None, peer: str | None) -> bool:
    """Whether a scrape may read figures: the metrics token when one is set, else loopback."""
    if token is None:
        return is_loopback(peer)
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


# --- multiprocess mode -------------------------------------------------------------------

_multiprocess_dir: Path | None = None


def multiprocess_dir() -> Path | None:
    """The directory this process writes its figures to, if in multiprocess mode."""
    return _multiprocess_dir


def reset_dir(path: Path) -> None:
    """Create ``path`` empty: a starting server must not add up a previous run's files."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def use_multiprocess_dir(path: Path) -> None:
    """From now on this process and its forks write figures to files in ``path``.

    Call before recording anything (gunicorn's ``post_fork``, Celery's ``worker_init``):
    a metric child made earlier stays in process memory. Forked children notice their new
    pid on their first write and start files of their own.
    """
    global _multiprocess_dir  # noqa: PLW0603 - one process-wide switch, set once at start
    path.mkdir(parents=True, exist_ok=True)
    # prometheus-client takes the directory from this variable when it opens a file (and
    # so do our children): it is the library's interface, not configuration read here.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # noqa: TID251
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _multiprocess_dir = path


def mark_dead(pid: int, path: Path | None = None) -> None:
    """A child exited: drop its live gauges (its counters and histograms still count)."""
    path = path or _multiprocess_dir
    if path is not None and path.is_dir():
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def forget_dead_processes(path: Path) -> None:
    """Drop the live gauges of every process in ``path`` that is gone.

    gunicorn's ``child_exit`` hook does it for the workers it sees exit; granian respawns
    a dead worker without a hook, so ``process_registry`` does it before each scrape.
    """
    for file in path.glob("gauge_live*_*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            mark_dead(int(pid), path)


def instance_dir(base: Path, role: str, pid: int | None = None) -> Path:
    """``base/<role>-<host>-<pid>``: one server's directory, unique on a shared volume."""
    return base / f"{role}-{socket.gethostname()}-{pid or os.getpid()}"


def prune_dead_dirs(base: Path, role: str) -> None:
    """Remove this host's ``role`` directories whose server process is gone."""
    prefix = f"{role}-{socket.gethostname()}-"
    if not base.is_dir():
        return
    for path in base.iterdir():
        pid = path.name.removeprefix(prefix)
        if path.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class DirsCollector(Collector):
    """The figures of every multiprocess directory matching ``base/<pattern>``, merged."""

    def __init__(self, base: Path, pattern: str) -> None:
        self.base = base
        self.pattern = pattern

    def collect(self) -> Iterable[Any]:
        files = [str(f) for d in sorted(self.base.glob(self.pattern)) for f in d.glob("*.db")]
        with contextlib.suppress(FileNotFoundError):  # a directory pruned mid-scrape
            merged: Iterable[Any] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            return merged
        return []


def process_registry() -> CollectorRegistry:
    """What this process's ``/metrics`` shows of its own figures (all children's, merged)."""
    path = _multiprocess_dir
    if path is None:
        return REGISTRY
    forget_dead_processes(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return registry
