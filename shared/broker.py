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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from kombu.transport import redis as kombu_redis

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
