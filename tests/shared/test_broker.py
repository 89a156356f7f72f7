"""The broker transport (shared/broker.py) against real Redis: one client, same wire."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis
from celery import signals

from shared.queue import Publisher, celery_config, make_celery
from shared.settings import Settings


def _sent_task_id(data: bytes) -> str | None:
    """The task id of a ``task-sent`` event as kombu's fanout carries it, else None."""
    envelope = json.loads(data)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    event = json.loads(body)
    return str(event["uuid"]) if event.get("type") == "task-sent" else None


def _publish(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, transport: str | None
) -> tuple[int, list[str], list[str], list[str]]:
    """One warm-up publish, then five counted: (clients built, sent, queued, announced)."""
    app = make_celery(settings)
    app.conf.broker_transport = transport
    publisher = Publisher(settings, app=app)
    queue = f"test-broker-{uuid.uuid4().hex}"
    listener = redis.Redis.from_url(settings.redis_url or "")
    events = listener.pubsub()
    try:
        events.psubscribe("*celeryev*")
        events.get_message(timeout=1)  # the subscription's confirmation
        sent = [str(uuid.uuid4()) for _ in range(6)]
        publisher.send("conveyor.canary.run", queue, sent[0])
        built: list[int] = []
        original = redis.Redis.__init__

        def counting(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
            built.append(1)
            original(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(redis.Redis, "__init__", counting)
            for job_id in sent[1:]:
                publisher.send("conveyor.canary.run", queue, job_id)
        # kombu LPUSHes and its consumer pops from the other end: oldest last.
        queued = [json.loads(m)["headers"]["id"] for m in listener.lrange(queue, 0, -1)][::-1]
        announced: list[str] = []
        deadline = time.monotonic() + 10
        while len(announced) < len(sent) and time.monotonic() < deadline:
            message = events.get_message(timeout=0.5)
            if message and message["type"] == "pmessage":
                task_id = _sent_task_id(message["data"])
                if task_id in sent:
                    announced.append(task_id)
        return len(built), sent, queued, announced
    finally:
        listener.delete(queue)
        events.close()
        listener.close()
        app.close()


def test_publishing_builds_no_client_and_delivers_tasks_and_events(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = celery_config(settings)["broker_transport"]
    assert transport == "shared.broker:Transport"
    built, sent, queued, announced = _publish(settings, monkeypatch, transport)
    assert built == 0
    assert queued == sent
    assert announced == sent  # every task-sent event still goes out, in order
    # kombu's own transport builds a client for each task and another for its event.
    built, sent, queued, announced = _publish(settings, monkeypatch, None)
    assert built == 10
    assert queued == sent
    assert announced == sent


def test_other_schemes_and_the_setting_keep_kombus_transport(settings: Settings) -> None:
    secure = settings.model_copy(update={"redis_url": "rediss://127.0.0.1:6380/0"})
    assert celery_config(secure)["broker_transport"] is None
    chosen = settings.model_copy(update={"broker_transport": "kombu"})
    assert celery_config(chosen)["broker_transport"] is None


def test_a_publish_on_redis_declares_nothing(settings: Settings) -> None:
    """Celery re-declared the queue at every publish (a SADD of its binding, once per
    connection, and a cached check every time); on Redis the task reaches the queue's list
    without it, and workers declare the queues they consume."""
    publisher = Publisher(settings)
    client = redis.Redis.from_url(settings.redis_url or "")
    queue = f"test-broker-{uuid.uuid4().hex}"
    job_id = str(uuid.uuid4())
    try:
        publisher.send("conveyor.canary.run", queue, job_id)
        assert [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)] == [job_id]
        assert not client.exists(f"_kombu.binding.{queue}")
        # Celery's default on the same broker binds the queue: what the test tells apart.
        publisher.app.send_task("conveyor.canary.run", args=[job_id], queue=queue)
        assert client.exists(f"_kombu.binding.{queue}")
    finally:
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()
        publisher.app.close()


def test_other_brokers_keep_celerys_declarations(settings: Settings) -> None:
    amqp = settings.model_copy(update={"redis_url": "amqp://guest@127.0.0.1:5672//"})
    assert Publisher(amqp)._declare is None
    assert Publisher(settings)._declare == []


def _decoded(envelope: dict[str, Any]) -> dict[str, Any]:
    """An envelope with its body decoded and the per-message delivery tag left out."""
    properties = dict(envelope["properties"])
    tag = properties.pop("delivery_tag")
    uuid.UUID(tag)  # kombu's tag: a fresh uuid per message
    body = json.loads(base64.b64decode(envelope["body"]))
    return {**envelope, "properties": properties, "body": body}


def test_the_sender_writes_what_send_task_writes(settings: Settings) -> None:
    """shared.broker.TaskSender against Celery's send_task on the installed Celery and kombu:
    the same task message on the queue's list and the same task-sent event on the same
    topic, field by field (the delivery tag, the event's time and Lamport clock aside)."""
    publisher = Publisher(settings)
    assert publisher._sender is not None
    assert publisher._sender.handles("conveyor.canary.run")
    client = redis.Redis.from_url(settings.redis_url or "")
    events = client.pubsub()
    queue = f"test-broker-{uuid.uuid4().hex}"
    job_id = str(uuid.uuid4())
    headers = {"request_id": "req-contract"}
    try:
        events.psubscribe("*celeryev*")
        events.get_message(timeout=1)  # the subscription's confirmation
        publisher.send("conveyor.canary.run", queue, job_id, headers)  # the sender
        publisher.app.send_task(  # Celery's own path, as Publisher used it before
            "conveyor.canary.run",
            args=[job_id],
            task_id=job_id,
            queue=queue,
            headers=headers,
            declare=[],
        )
        ours, celerys = (json.loads(m) for m in client.lrange(queue, 0, -1)[::-1])
        assert _decoded(ours) == _decoded(celerys)
        assert _decoded(ours)["headers"]["id"] == job_id
        assert _decoded(ours)["headers"]["request_id"] == "req-contract"

        published: list[tuple[bytes, dict[str, Any]]] = []
        deadline = time.monotonic() + 10
        while len(published) < 2 and time.monotonic() < deadline:
            message = events.get_message(timeout=0.5)
            if message and message["type"] == "pmessage" and _sent_task_id(message["data"]):
                published.append((message["channel"], _decoded(json.loads(message["data"]))))
        (our_topic, our_event), (celery_topic, celery_event) = published
        assert our_topic == celery_topic
        bodies = [event.pop("body") for event in (our_event, celery_event)]
        assert our_event == celery_event
        assert bodies[1]["clock"] > bodies[0]["clock"]  # one Lamport clock for both paths
        for body in bodies:
            del body["timestamp"], body["clock"]
        assert bodies[0] == bodies[1]
        assert bodies[0]["uuid"] == job_id
        assert bodies[0]["type"] == "task-sent"
    finally:
        client.delete(queue)
        events.close()
        client.close()
        publisher.close()


def test_the_sender_leaves_known_tasks_and_other_transports_to_celery(
    settings: Settings,
) -> None:
    """Tasks the app registered (the worker's, with their time limits) and kombu's own
    transport go through send_task."""
    app = make_celery(settings)

    @app.task(name="tests.known", time_limit=10)
    def known() -> None:
        """A task with options of its own."""

    publisher = Publisher(settings, app=app)
    assert publisher._sender is not None
    assert not publisher._sender.handles("tests.known")
    assert publisher._sender.handles("conveyor.canary.run")
    publisher.close()
    stock = Publisher(settings.model_copy(update={"broker_transport": "kombu"}))
    assert stock._sender is None
    stock.close()


def test_the_sender_sends_celerys_publish_signals(settings: Settings) -> None:
    """What a before_task_publish receiver adds to the headers (OpenTelemetry's trace
    context, say) rides in the message; after_task_publish follows the write."""
    publisher = Publisher(settings)
    client = redis.Redis.from_url(settings.redis_url or "")
    queue = f"test-broker-{uuid.uuid4().hex}"
    job_id = str(uuid.uuid4())
    seen: list[tuple[str, str]] = []

    def before(sender: str, headers: dict[str, Any], **_: Any) -> None:
        headers["x-added"] = "by a receiver"
        seen.append(("before", sender))

    def after(sender: str, headers: dict[str, Any], **_: Any) -> None:
        seen.append(("after", str(client.llen(queue))))

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        publisher.send("conveyor.canary.run", queue, job_id)
        (message,) = (json.loads(m) for m in client.lrange(queue, 0, -1))
        assert message["headers"]["x-added"] == "by a receiver"
        assert seen == [("before", "conveyor.canary.run"), ("after", "1")]
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
        client.delete(queue)
        client.close()
        publisher.close()
