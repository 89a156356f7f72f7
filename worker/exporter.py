"""``conveyor exporter``: the pipeline's figures for Prometheus, on :9808 like celery-exporter.

One process (started by ``conveyor run``; run exactly one per broker) that

* receives Celery events and keeps celery-exporter's task counters and histograms
  (``celery_task_*_total``, ``celery_task_runtime``, ``celery_task_queue_wait_time``);
* reads at scrape time, from Redis: ``celery_queue_length`` (every priority sub-list of a
  queue summed, in one transaction), ``conveyor_queue_reserved`` (delivered, unacked) and
  the cache counters; from PostgreSQL: ``conveyor_jobs`` by kind and state;
* derives ``celery_worker_up`` from heartbeats as they arrive: a worker silent for
  ``worker_heartbeat_timeout_s`` is down, SIGKILLed or not (celery-exporter keeps a
  killed worker "up" for five minutes);
* serves the workers' own figures (job waits and durations, import rows, deployments,
  pool) from the multiprocess directories of the workers on this host.

It listens on ``exporter_host`` (loopback by default); anywhere else it requires
``metrics_token``.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import redis
from celery import Celery
from celery.events.state import State
from celery.utils import nodesplit
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from shared import metrics
from shared.cache import read_stats
from shared.db import make_engine
from shared.logs import configure_logging
from shared.models import JobState
from shared.queue import KINDS, QUEUES, make_celery, queue_depths, reserved_counts
from shared.settings import Settings, load_settings

log = logging.getLogger("conveyor.exporter")

# Task name → queue, for events whose task-sent the exporter did not see.
_ROUTES = {route.name: route.queue for route in KINDS.values()}
_EXCEPTION_CLASS = re.compile(r"^(\w+)\(")
ACTIVE_QUEUES_EVERY_S = 10.0


def host_of(nodename: str | None) -> str:
    """celery-exporter's ``hostname`` label: a node name's host part (no worker names, pids)."""
    return nodesplit(nodename or "unknown")[1] or "unknown"


def exception_class(exception: str | None) -> str:
    match = _EXCEPTION_CLASS.match(exception or "")
    return match.group(1) if match else ""


class Exporter(Collector):
    """Event bookkeeping plus the collectors read at scrape time."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_celery(settings)
        self.state = State(max_tasks_in_memory=10_000)
        self.lock = threading.Lock()
        # Worker node name → (time its last heartbeat arrived, tasks active). Arrival time,
        # not the event's own timestamp: a worker's clock may be off, ours is the judge.
        self.workers: dict[str, tuple[float, int]] = {}
        self.worker_queues: dict[str, list[str]] = {}
        timeout = settings.redis_socket_timeout_s
        self.redis = redis.Redis.from_url(
            settings.redis_url or "", socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.engine: Engine | None = (
            make_engine(settings, pool_size=1, max_overflow=0) if settings.database_url else None
        )
        self.stopping = threading.Event()

    # --- events ---------------------------------------------------------------------------

    def handle(self, event: dict[str, Any]) -> None:
        """One Celery event (called from the receiver thread)."""
        kind = event.get("type", "")
        try:
            with self.lock:
                if kind.startswith("worker-"):
                    self._worker_event(kind, event)
                elif kind in metrics.TASK_EVENT_COUNTERS:
                    self._task_event(kind, event)
        except Exception:  # one odd event must not stop the receiver
            log.exception("could not account for an event", extra={"event_type": kind})

    def _worker_event(self, kind: str, event: dict[str, Any]) -> None:
        node = event.get("hostname") or "unknown"
        if kind == "worker-offline":
            self.workers[node] = (float("-inf"), 0)
        else:  # worker-online, worker-heartbeat
            self.workers[node] = (time.time(), int(event.get("active") or 0))

    def _task_event(self, kind: str, event: dict[str, Any]) -> None:
        self.state.event(event)
        task = self.state.tasks.get(event.get("uuid"))
        name = (task.name if task is not None else None) or event.get("name") or "unknown"
        # task-sent carries the queue; State keeps it as routing_key (our queues' keys).
        queue = getattr(task, "routing_key", None) or _ROUTES.get(name, "default")
        labels = {"name": name, "hostname": host_of(event.get("hostname")), "queue_name": queue}
        if kind == "task-failed":
            exception = exception_class(event.get("exception"))
            metrics.TASK_EVENT_COUNTERS[kind].labels(**labels, exception=exception).inc()
        else:
            metrics.TASK_EVENT_COUNTERS[kind].labels(**labels).inc()
        if kind == "task-succeeded" and event.get("runtime") is not None:
            metrics.TASK_RUNTIME.labels(**labels).observe(float(event["runtime"]))
        if kind == "task-started" and task is not None:
            published = task.sent or task.received
            if published:
                wait = max(0.0, float(event["timestamp"]) - float(published))
                metrics.TASK_QUEUE_WAIT.labels(**labels).observe(wait)

    def consume(self) -> None:
        """Receive events until stopped, reconnecting after broker trouble."""
        while not self.stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    receiver = self.app.events.Receiver(conn, handlers={"*": self.handle})
                    log.info("receiving Celery events")
                    # wakeup: workers answer with a heartbeat now, not in up to 2 s.
                    receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception:  # kombu raises many types; the loop is the retry
                log.warning("event receiver lost the broker; reconnecting", exc_info=True)
                self.stopping.wait(1.0)

    def refresh_queues(self) -> None:
        """Which queues each worker consumes (for ``celery_active_worker_count``)."""
        while not self.stopping.is_set():
            try:
                answer = self.app.control.inspect(timeout=1.0).active_queues() or {}
                with self.lock:
                    self.worker_queues = {
                        node: [q["name"] for q in queues] for node, queues in answer.items()
                    }
            except Exception:  # a broadcast that fails now is tried again shortly
                log.warning("could not ask workers for their queues", exc_info=True)
            self.stopping.wait(ACTIVE_QUEUES_EVERY_S)

    # --- scrape-time figures ---------------------------------------------------------------

    def live_nodes(self) -> dict[str, bool]:
        """Worker node name → heartbeat within the timeout."""
        now = time.time()
        timeout = self.settings.worker_heartbeat_timeout_s
        with self.lock:
            return {node: now - seen <= timeout for node, (seen, _) in self.workers.items()}

    def collect(self) -> Iterator[Any]:
        yield from self._workers()
        yield from self._broker()
        yield from self._jobs()

    def _workers(self) -> Iterator[Any]:
        live = self.live_nodes()
        with self.lock:
            active = {node: n for node, (_, n) in self.workers.items()}
            consumed = dict(self.worker_queues)
        up = GaugeMetricFamily(
            metrics.WORKER_UP,
            "Whether a worker heartbeat arrived within the timeout.",
            labels=["hostname"],
        )
        tasks = GaugeMetricFamily(
            metrics.WORKER_TASKS_ACTIVE, "Tasks a worker is running.", labels=["hostname"]
        )
        by_host: dict[str, list[str]] = defaultdict(list)
        for node in live:
            by_host[host_of(node)].append(node)
        for host, nodes in sorted(by_host.items()):
            alive = [n for n in nodes if live[n]]
            up.add_metric([host], 1.0 if alive else 0.0)
            tasks.add_metric([host], float(sum(active[n] for n in alive)))
        workers = GaugeMetricFamily(
            metrics.ACTIVE_WORKER_COUNT,
            "Live workers consuming a queue.",
            labels=["queue_name"],
        )
        for queue in QUEUES:
            count = sum(
                1 for node, queues in consumed.items() if live.get(node) and queue in queues
            )
            workers.add_metric([queue], float(count))
        yield from (up, tasks, workers)

    def _broker(self) -> Iterator[Any]:
        try:
            depths = queue_depths(self.redis)
            reserved = reserved_counts(self.redis)
            stats = read_stats(self.redis)
        except redis.RedisError:
            log.warning("could not read queue lengths from Redis", exc_info=True)
            return
        length = GaugeMetricFamily(
            metrics.QUEUE_LENGTH,
            "Messages waiting in a queue (every priority sub-list), reserved ones not included.",
            labels=["queue_name"],
        )
        held = GaugeMetricFamily(
            metrics.QUEUE_RESERVED,
            "Messages delivered to a worker and not yet acknowledged.",
            labels=["queue_name"],
        )
        for queue in QUEUES:
            length.add_metric([queue], float(depths[queue]))
            held.add_metric([queue], float(reserved[queue]))
        cache = CounterMetricFamily(
            metrics.CACHE_REQUESTS,
            "Cache lookups by layer (l1, l2, l3) and result, summed over web processes.",
            labels=["layer", "result"],
        )
        for key, n in sorted(stats.items()):
            layer, _, result = key.partition("_")
            if layer and result:
                cache.add_metric([layer, result], float(n))
        yield from (length, held, cache)

    def _jobs(self) -> Iterator[Any]:
        if self.engine is None:
            return
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state")
                ).all()
        except Exception:  # database down: the other figures still answer
            log.warning("could not count jobs", exc_info=True)
            return
        counts = {(str(kind), str(state)): int(n) for kind, state, n in rows}
        family = GaugeMetricFamily(
            metrics.JOBS, "Jobs by kind and state.", labels=["kind", "state"]
        )
        for kind in KINDS:
            for state in JobState:
                family.add_metric([kind, state.value], float(counts.get((kind, state.value), 0)))
        yield family

    def close(self) -> None:
        self.stopping.set()
        self.redis.close()
        if self.engine is not None:
            self.engine.dispose()


def build_registry(exporter: Exporter, settings: Settings) -> CollectorRegistry:
    """Everything ``/metrics`` shows: events, scrape-time figures, workers' own files."""
    registry = CollectorRegistry()
    registry.register(_Forward(metrics.CELERY_REGISTRY))
    registry.register(exporter)
    registry.register(metrics.DirsCollector(settings.metrics_path, "worker-*"))
    return registry


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def wsgi_app(registry: CollectorRegistry, settings: Settings) -> Any:
    """``/metrics`` behind the token or the loopback rule; 404 elsewhere."""
    metrics_app = make_wsgi_app(registry)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        if not metrics.authorize_scrape(
            token, environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR")
        ):
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"the metrics token is missing or wrong\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


def check_bind(settings: Settings) -> None:
    """Off loopback, figures need a token (they name hosts, queues and environments)."""
    if settings.metrics_token is None and not metrics.is_loopback(settings.exporter_host):
        raise SystemExit(
            f"the exporter would listen on {settings.exporter_host} without a token: "
            "set CONVEYOR_METRICS_TOKEN or CONVEYOR_EXPORTER_HOST=127.0.0.1"
        )


def main() -> None:
    """Run the exporter until SIGTERM or Ctrl-C."""
    settings = load_settings()
    configure_logging(settings, "exporter")
    check_bind(settings)
    metrics.prune_dead_dirs(settings.metrics_path, "worker")
    exporter = Exporter(settings)
    server = make_server(
        settings.exporter_host,
        settings.exporter_port,
        wsgi_app(build_registry(exporter, settings), settings),
        ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    for target in (exporter.consume, exporter.refresh_queues):
        threading.Thread(target=target, daemon=True, name=target.__name__).start()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    log.info(
        "exporter listening",
        extra={"host": settings.exporter_host, "port": server.server_port},
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        exporter.close()
        server.server_close()


if __name__ == "__main__":
    main()
