"""Celery wiring both sides share: configuration, task names, and publishing by name.

Task names are the wire protocol between web and worker; messages outlive refactors,
so they are explicit and stable. Web never imports ``worker``: it publishes by name here.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu.entity import Queue
from kombu.exceptions import ChannelError
from kombu.transport.redis import PRIORITY_STEPS, Channel

from shared.broker import TRANSPORT, TaskSender
from shared.settings import Settings

QUEUES = ("default", "imports", "deployments")


@dataclass(frozen=True)
class TaskRoute:
    name: str
    queue: str


# kind → the task that runs it. Adding a kind means adding its task in worker/.
KINDS: dict[str, TaskRoute] = {
    "canary": TaskRoute("conveyor.canary.run", "default"),
    "import": TaskRoute("conveyor.imports.run", "imports"),
    "deployment": TaskRoute("conveyor.deployments.run", "deployments"),
}
REAP_TASK = "conveyor.maintenance.reap"
CLEANUP_TASK = "conveyor.maintenance.cleanup"
COMPACT_COUNTS_TASK = "conveyor.maintenance.compact_counts"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one place reliability options are set, for web (publishing) and worker alike."""
    transport = {
        # A task slice must finish well inside this, or Redis redelivers it to another
        # worker while it still runs (kombu's Redis transport restores unacked messages
        # after visibility_timeout). Slices are job_slice_s; the lease fences the rest.
        "visibility_timeout": settings.broker_visibility_timeout_s,
        # Bounded socket waits: publishing while Redis is down fails fast, never hangs.
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "retry_on_timeout": False,
        "health_check_interval": 25,
    }
    # kombu's Redis transport with one client per channel (shared/broker.py), for redis://.
    ours = settings.broker_transport == "conveyor"
    ours = ours and urlsplit(settings.redis_url or "").scheme == "redis"
    return {
        "broker_url": settings.redis_url,
        "broker_transport": TRANSPORT if ours else None,
        "broker_transport_options": transport,
        "broker_connection_timeout": settings.redis_socket_timeout_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # JSON only: a pickle payload on the broker is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The job row is the source of truth for status and results.
        "task_ignore_result": True,
        "result_backend": None,
        # At-least-once: ack after the task ran; a killed worker's task is redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "default",
        "task_queues": [Queue(q, routing_key=q) for q in QUEUES],  # type: ignore[no-untyped-call]
        "task_routes": {route.name: {"queue": route.queue} for route in KINDS.values()}
        | {task: {"queue": "default"} for task in (REAP_TASK, CLEANUP_TASK, COMPACT_COUNTS_TASK)},
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        # Events on, so Flower (and the exporter) see tasks and workers.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def make_celery(settings: Settings, main: str = "conveyor") -> Celery:
    """A Celery app configured from settings (no tasks registered)."""
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class PublishError(RuntimeError):
    """The broker did not take the message (down, timed out, refused)."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id  # the job left unpublished, for the 503 answer


class Publisher:
    """Publishes job tasks by name; the only argument is the job id, the task id too."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.app = app or make_celery(settings)
        # On Redis a task goes to its queue's list by name (kombu's anonymous exchange),
        # declared or not, and workers declare the queues they consume. Celery declares the
        # queue again at every publish, and kombu's cached check (an ``ensure`` wrapper and
        # the queue's repr hashed) was a twentieth of a ``POST /api/v1/canaries`` (callgrind,
        # in process: 5.64 → 5.35 million instructions). Other brokers keep Celery's default:
        # AMQP drops a message routed to no queue.
        with self.app.connection_for_write() as conn:  # lazy: nothing connects here
            redis_broker = conn.transport.driver_type == "redis"
        self._declare: list[Any] | None = [] if redis_broker else None
        # On Conveyor's own transport (redis://), a task the app has no options for goes
        # out with its task-sent event in one round trip (shared.broker.TaskSender).
        self._sender: TaskSender | None = None
        if self.app.conf.broker_transport == TRANSPORT:
            self._sender = TaskSender(self.app)

    def publish(self, kind: str, job_id: str, headers: dict[str, str] | None = None) -> None:
        """Send the job's task, or raise PublishError within a few seconds."""
        route = KINDS[kind]
        self.send(route.name, route.queue, job_id, headers)

    def send(
        self, task: str, queue: str, job_id: str, headers: dict[str, str] | None = None
    ) -> None:
        try:
            if self._sender is not None and self._sender.handles(task):
                self._sender.send(task, queue, job_id, headers or {})
                return
            self.app.send_task(
                task,
                args=[job_id],
                task_id=job_id,
                queue=queue,
                headers=headers or {},
                retry=True,
                declare=self._declare,
            )
        except Exception as exc:  # kombu raises many types (OperationalError, socket errors)
            raise PublishError(
                f"could not publish {task} for job {job_id}: {exc}", job_id=job_id
            ) from exc

    def close(self) -> None:
        """Release the broker connections (tests, and a clean shutdown)."""
        if self._sender is not None:
            self._sender.close()
        self.app.close()

    def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue``, all of kombu's priority sub-lists included.

        kombu's Redis transport keeps one list per priority step, named ``queue`` for the
        default priority and ``queue<sep><n>`` for the others (celery-exporter#272 counted
        only the first); unacked (reserved) messages are not included.
        """
        with self.app.connection_for_write() as conn:
            try:
                # Passive declare answers kombu's own count over every priority sub-list.
                ok = conn.default_channel.queue_declare(queue=queue, passive=True)
            except ChannelError:  # no list exists: nothing waiting
                return 0
            return int(ok.message_count)

    def revoke(self, job_id: str) -> None:
        """Best-effort broadcast; the job row's state is what really stops the task."""
        # Revocation is advisory; the row already says REVOKED or cancel_requested.
        with contextlib.suppress(Exception):
            self.app.control.revoke(job_id)


# --- broker figures read straight from Redis (readyz, the exporter) -----------------------

# Worker host name → time of its last heartbeat, written by each worker's main process
# (``worker.celery_app``) so a probe can tell live workers without an event receiver.
WORKERS_KEY = "conveyor:workers"
# kombu's Redis transport: the hash of delivered, unacknowledged messages.
UNACKED_KEY = Channel.unacked_key


def priority_lists(queue: str) -> list[str]:
    """The Redis lists holding ``queue``: one per kombu priority step.

    The default priority's list is the queue's own name; the others are
    ``queue<sep><step>`` (``sep`` is ``"\\x06\\x16"``), as kombu's ``_q_for_pri`` names them.
    """
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages waiting per queue, every priority list summed, read in one transaction."""
    pipe = client.pipeline(transaction=True)
    for queue in queues:
        for name in priority_lists(queue):
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in PRIORITY_STEPS) for queue in queues}


def reserved_counts(client: redis.Redis, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages delivered to a worker and not yet acknowledged, per queue."""
    counts = dict.fromkeys(queues, 0)
    for raw in client.hvals(UNACKED_KEY):
        try:
            _payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):  # not kombu's shape: not ours to count
            continue
        if routing_key in counts:
            counts[routing_key] += 1
    return counts


def record_heartbeat(client: redis.Redis, hostname: str) -> None:
    client.hset(WORKERS_KEY, hostname, f"{time.time():.3f}")


def forget_worker(client: redis.Redis, hostname: str) -> None:
    client.hdel(WORKERS_KEY, hostname)


def worker_heartbeats(client: redis.Redis, timeout_s: float) -> dict[str, bool]:
    """Known workers → whether their last heartbeat is within ``timeout_s``.

    Workers silent for a hundred timeouts (scaled down, renamed) are forgotten.
    """
    now = time.time()
    seen: dict[str, bool] = {}
    raw: dict[bytes, bytes] = client.hgetall(WORKERS_KEY)  # type: ignore[assignment]
    for host, stamp in raw.items():
        age = now - float(stamp)
        if age > 100 * timeout_s:
            client.hdel(WORKERS_KEY, host)
            continue
        seen[host.decode()] = age <= timeout_s
    return seen
