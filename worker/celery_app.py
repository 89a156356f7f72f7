"""The Celery app: ``celery -A worker.celery_app worker`` (and ``beat``).

Configuration comes from ``shared.queue.celery_config`` (JSON only, acks_late, reject on
worker lost, prefetch 1, visibility timeout, bounded broker sockets) so web and worker
agree on the wire. Fork safety: each prefork child disposes the SQLAlchemy engine it
inherited (``worker_process_init``), per SQLAlchemy's "Using Connection Pools with
Multiprocessing or os.fork()". Settings are read when this entry module is loaded by the
``celery`` command, never by library code.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from shared.cache import WARM_TASK
from shared.logs import configure_logging
from shared.queue import CLEANUP_TASK, REAP_TASK, make_celery
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
}


def _setup_logging(**_: Any) -> None:
    configure_logging(runtime.settings(), "worker")


def _setup_beat_logging(**_: Any) -> None:
    configure_logging(runtime.settings(), "beat")


def _dispose_inherited_pool(**_: Any) -> None:
    runtime.after_fork()


# Connecting setup_logging stops Celery from installing its own (plain text) handlers.
signals.setup_logging.connect(_setup_logging, weak=False)
signals.beat_init.connect(_setup_beat_logging, weak=False)
signals.worker_process_init.connect(_dispose_inherited_pool, weak=False)
