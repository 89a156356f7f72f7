"""The broker transport (shared/broker.py) against real Redis: one client, same wire."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis

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
