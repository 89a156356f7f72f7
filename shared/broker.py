"""kombu's Redis transport, sending its commands through one redis-py client per channel.

kombu's Redis channel builds a new ``redis.Redis`` for every command it sends outside its
BRPOP loop (``Channel.conn_or_acquire``): each task published, each event, each ack.
redis-py's constructor copies its ~170 response callbacks into a case-insensitive dict,
so a Celery publish with its ``task-sent`` event built two clients, a fifth of the
instructions of a whole ``POST /api/v1/canaries`` (7.7 → 6.2 million per request, counted
with callgrind in process). The client holds no connection of its own: every command
takes one from the channel's pool and gives it back, exactly as with a fresh client, so
one per channel behaves the same. A channel is used by one thread at a time (kombu
connections are not shared between threads), and redis-py clients are thread-safe anyway.

Used for ``redis://`` brokers (``shared.queue.celery_config``); any other scheme keeps
kombu's own transport.

``TaskSender`` goes one step further for the web's publishes (see its docstring).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import redis
from celery import Celery, signals
from celery.events import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from kombu.serialization import dumps as serialize
from kombu.transport import redis as kombu_redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

TRANSPORT = "shared.broker:Transport"


class Channel(kombu_redis.Channel):
    @cached_property
    def command_client(self) -> Any:
        """The client for every command this channel sends on its synchronous pool."""
        return self._create_client()  # type: ignore[no-untyped-call]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu's own test (truthiness), so a caller's client is used exactly when kombu would.
        yield client if client else self.command_client


class Transport(kombu_redis.Transport):
    Channel = Channel


# Celery's events go to kombu's fanout exchange of this name (``celery.events``), the
# ``task-sent`` event with this routing key.
EVENT_EXCHANGE = "celeryev"
TASK_SENT = "task-sent"


class TaskSender:
    """A task and its ``task-sent`` event, sent to Redis in one pipelined round trip.

    What ``Celery.send_task`` sends on a Redis broker, without its machinery around the
    two commands: the producer and its ``ensure`` wrappers, a second ``Producer.publish``
    for the event through Celery's event dispatcher, a round trip each. That machinery was
    half of a publish's CPU, and a ``POST /api/v1/canaries`` went from 5.22 to 4.34 million
    instructions without it (callgrind, in process). The messages are still Celery's and
    kombu's: headers, body and event fields from Celery's ``app.amqp.as_task_v2`` and
    ``celery.events.Event``, the body serialized by kombu's registry; only the envelope
    around them, kombu's virtual transport's (a base64 body, ``delivery_info``, a delivery
    tag), is written here, and a test compares it field by field with what ``send_task``
    writes on the installed Celery and kombu.

    For tasks the app does not know (the web publishes by name and registers none), so
    there are no task options to merge, at the default priority, to the queue's own list.
    The broker's URL, socket timeouts and publish retry policy are the app's
    (``shared.queue.celery_config``): connection errors are retried, and a retried write
    may land twice, as with kombu's retry (a job's task runs once: the lease fences the
    rest).
    """

    def __init__(self, app: Celery) -> None:
        self._app = app
        options = app.conf.broker_transport_options  # the broker's timeouts, as kombu's
        policy = app.conf.task_publish_retry_policy
        self._client = redis.Redis.from_url(
            app.conf.broker_url,
            socket_timeout=options.get("socket_timeout"),
            socket_connect_timeout=options.get("socket_connect_timeout"),
            health_check_interval=options.get("health_check_interval", 0),
            retry=Retry(
                ConstantBackoff(policy["interval_step"]),
                policy["max_retries"],
                (redis.ConnectionError,),
            ),
        )
        db = self._client.get_connection_kwargs().get("db", 0)
        # kombu's fanout topic on Redis: "/{db}." + exchange + "/" + routing key.
        self._event_topic = f"/{db}.{EVENT_EXCHANGE}/{TASK_SENT.replace('-', '.')}"
        self._node: tuple[int, str] = (0, "")

    def handles(self, task: str) -> bool:
        """Whether ``task`` goes this way: a task the app has no options for."""
        return task not in self._app.tasks

    def _nodename(self) -> str:
        """Celery's ``gen<pid>@<host>`` for this process (a fork gets its own)."""
        pid = os.getpid()
        if self._node[0] != pid:
            self._node = (pid, anon_nodename())
        return self._node[1]

    def send(self, task: str, queue: str, job_id: str, headers: Mapping[str, str]) -> None:
        """LPUSH the task onto ``queue`` and PUBLISH its ``task-sent`` event, pipelined."""
        app = self._app
        node = self._nodename()
        message = app.amqp.as_task_v2(
            job_id,
            task,
            args=[job_id],
            reply_to=app.thread_oid,
            create_sent_event=app.conf.task_send_sent_event,
            origin=node,
            ignore_result=None,  # what send_task passes when not asked
        )
        message.headers.update(headers)
        # Celery's publish signals, as send_task sends them: receivers may add headers
        # (OpenTelemetry's Celery instrumentation puts the trace context there).
        signals.before_task_publish.send(
            sender=task,
            body=message.body,
            exchange="",
            routing_key=queue,
            declare=[],
            headers=message.headers,
            properties=message.properties,
            retry_policy=dict(app.conf.task_publish_retry_policy),
        )
        pipe = self._client.pipeline(transaction=False)
        task_properties = {**message.properties, "delivery_mode": 2}  # persistent
        pipe.lpush(queue, _envelope(message.body, message.headers, task_properties, "", queue))
        if message.sent_event is not None:
            event = Event(
                TASK_SENT,
                hostname=node,
                utcoffset=utcoffset(),
                pid=os.getpid(),
                clock=app.clock.forward(),
                **message.sent_event,
                queue=queue,
                exchange="",
                routing_key=queue,
            )
            routing_key = TASK_SENT.replace("-", ".")
            envelope = _envelope(
                event, {"hostname": node}, {"delivery_mode": 1}, EVENT_EXCHANGE, routing_key
            )
            pipe.publish(self._event_topic, envelope)
        pipe.execute()
        signals.after_task_publish.send(
            sender=task, body=message.body, headers=message.headers, exchange="", routing_key=queue
        )

    def close(self) -> None:
        self._client.close()


def _envelope(
    body: Any,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    exchange: str,
    routing_key: str,
) -> str:
    """A message as kombu's virtual transport stores it on Redis (``prepare_message``,
    then ``_inplace_augment_message``: the Redis channel's body encoding is base64)."""
    serialized = serialize(body, serializer="json")  # type: ignore[no-untyped-call]
    content_type, content_encoding, data = serialized
    raw = data.encode(content_encoding) if isinstance(data, str) else data
    return json.dumps(
        {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": dict(headers),
            "properties": {
                **properties,
                "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )
