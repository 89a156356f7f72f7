"""The Celery app: ``celery -A worker.celery_app worker`` (and ``beat``).

Configuration comes from ``shared.queue.celery_config`` (JSON only, acks_late, reject on
worker lost, prefetch 1, visibility timeout, bounded broker sockets) so web and worker
agree on the wire. Fork safety: each prefork child disposes the SQLAlchemy engine it
inherited (``worker_process_init``), per SQLAlchemy's "Using Connection Pools with
Multiprocessing or os.fork()". Settings are read when this entry module is loaded by the
``celery`` command, never by library code.

Observability: the main process records each heartbeat in Redis (``/readyz`` counts live
workers from it) and switches to prometheus-client's multiprocess mode before forking,
in a directory of its own that ``conveyor exporter`` reads; a child that exits is marked
dead there. Each child sets up tracing when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import cache
from typing import Any

import redis
from celery import Celery, signals

from shared import metrics
from shared.cache import WARM_TASK
from shared.logs import configure_logging
from shared.queue import (
    CLEANUP_TASK,
    COMPACT_COUNTS_TASK,
    REAP_TASK,
    forget_worker,
    make_celery,
    record_heartbeat,
)
from shared.tracing import init_tracing, shutdown_tracing
from worker import runtime

# Configured on import, before Celery's own start-up checks write anything (its superuser
# warning among them); Flower's entry module configures first and keeps its own name.
if not logging.getLogger().handlers:
    configure_logging(runtime.settings(), "worker")

app: Celery = make_celery(runtime.settings())
app.conf.include = [
    "worker.canary",
    "worker.imports",
    "worker.deployments",
    "worker.maintenance",
    "worker.cache_warming",
]
app.conf.beat_schedule = {
    "reap-stale-jobs": {"task": REAP_TASK, "schedule": runtime.settings().reaper_interval_s},
    "delete-finished-uploads": {
        "task": CLEANUP_TASK,
        "schedule": runtime.settings().cleanup_interval_s,
    },
    "warm-cache": {"task": WARM_TASK, "schedule": runtime.settings().cache_warm_interval_s},
    "compact-counts": {
        "task": COMPACT_COUNTS_TASK,
        "schedule": runtime.settings().count_compact_interval_s,
    },
}


def _setup_logging(**_: Any) -> None:
    configure_logging(runtime.settings(), "worker")


def _setup_beat_logging(**_: Any) -> None:
    configure_logging(runtime.settings(), "beat")


def _dispose_inherited_pool(**_: Any) -> None:
    runtime.after_fork()
    init_tracing(runtime.settings(), "worker")


def _start_metrics(**_: Any) -> None:
    settings = runtime.settings()
    if settings.metrics_enabled:
        path = metrics.instance_dir(settings.metrics_path, "worker")
        metrics.reset_dir(path)
        metrics.use_multiprocess_dir(path)


def _child_exited(**_: Any) -> None:
    metrics.mark_dead(os.getpid())
    shutdown_tracing()  # flush the spans still buffered


@cache
def _heartbeat_redis() -> redis.Redis:
    timeout = runtime.settings().redis_socket_timeout_s
    return redis.Redis.from_url(
        runtime.settings().redis_url or "", socket_timeout=timeout, socket_connect_timeout=timeout
    )


def _heartbeat(sender: Any = None, **_: Any) -> None:
    # In the main process's event loop every 2 s: one HSET; a failure only makes the
    # worker look down until the next one lands.
    with contextlib.suppress(redis.RedisError):
        record_heartbeat(_heartbeat_redis(), sender.eventer.hostname)


def _shutting_down(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None)
    if hostname:
        with contextlib.suppress(redis.RedisError):
            forget_worker(_heartbeat_redis(), hostname)


# Connecting setup_logging stops Celery from installing its own (plain text) handlers.
signals.setup_logging.connect(_setup_logging, weak=False)
signals.beat_init.connect(_setup_beat_logging, weak=False)
signals.worker_process_init.connect(_dispose_inherited_pool, weak=False)
signals.worker_init.connect(_start_metrics, weak=False)
signals.worker_process_shutdown.connect(_child_exited, weak=False)
signals.heartbeat_sent.connect(_heartbeat, weak=False)
signals.worker_shutdown.connect(_shutting_down, weak=False)
