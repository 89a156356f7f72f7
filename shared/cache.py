"""The read caches of features and test cases, and how a write invalidates them.

Three layers, outermost last:

* **L1, process memory**: a ``cachetools`` LRU of serialized responses (and, for
  ``web.auth``, of authenticated tokens), each entry good for ``cache_local_ttl_s``.
  ``web.fastpath`` answers GETs whose body and token are here before Flask runs.
* **L2, Redis**: ``feature:{id}``, ``test_case:{id}`` (``cache_item_ttl_s``) and
  ``features:list:{page}:{page_size}:{status}``,
  ``test_cases:list:{feature}:{page}:{page_size}:{status}`` (``cache_list_ttl_s``), each
  suffixed ``:v{generation}``.
* **L3, HTTP**: the ``ETag`` computed here, answered with 304 by ``web.catalog``.

**Generations.** Every data class (``feature``, ``features:list``, ``test_case``,
``test_cases:list``, ``tokens``) has a counter in the Redis hash ``cache:generations``; a
write ``HINCRBY``s the counters of what it changed. An L2 key carries the generation, so
bumping it retires every key of the class at once, without finding them, and a reader
that loaded the database before the write can only store its old answer under the old
generation, where nobody looks any more. An L2 read is one Lua round trip that reads
the current generation and the value together.

**Why L1 needs more than the counter.** Checking the counter on every L1 hit would cost
the Redis round trip L1 exists to avoid (the 10k req/s target needs the answer from
process memory). So each process keeps its own copy of the counters, updated from a
pub/sub channel by a listener thread, and an L1 entry is served only while it carries
the process's current generation. Pub/sub alone has a race: the writer answers its
client, the client asks another process, and that process's listener has not read the
message yet. The writer therefore waits for acknowledgements: ``PUBLISH`` says how many
subscribers received the message, each listener applies it and ``RPUSH``es to the ack
list the message names, and the writer ``BLPOP``s that many acks before it answers. So a
GET that starts after a write's response, in any process, finds the new generation.

**What bounds staleness when a process does not acknowledge** (hung, or cut off from
Redis without noticing): the writer waits at most ``cache_local_ttl_s``, and an L1
entry's lifetime is counted from *before* its generation was read. So any entry filled
before the write has expired once the writer answers, and one filled after read the
new generation from Redis. A listener that loses its connection, or whose pings go
unanswered for ``cache_local_ttl_s``, turns L1 off until it has subscribed again and
re-read the counters. The only staleness left: a process cut off from Redis silently
(no reset, no answer) before the writer published, serving for up to
``cache_local_ttl_s`` after its last answered ping.

**Writes** call ``before_write`` and ``after_write`` around their commit: a bump before
the transaction (Redis down → the write is refused, nothing changed), and after it a bump,
the message and the wait. The import pipeline bumps after each chunk (without waiting)
and at the end (waiting), so a finished import reads SUCCESS only once every cache has
forgotten the old rows.

**Counters.** Hits and misses per layer are counted in process (``stats()``) and added to
the Redis hash ``cache:stats`` by the listener every few seconds; reads of single features
go to the sorted set ``cache:reads:feature``, which the beat task ``warm_cache`` uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache as memoize
from typing import Any, Final

import redis
from cachetools import LRUCache

from shared.settings import Settings

log = logging.getLogger(__name__)

# Data classes: each has a generation; a write bumps those it changed.
FEATURE: Final = "feature"
FEATURES_LIST: Final = "features:list"
TEST_CASE: Final = "test_case"
TEST_CASES_LIST: Final = "test_cases:list"
TOKENS: Final = "tokens"  # L1 only: web.auth's authenticated tokens
# What an import into each target may have changed (it inserts and updates rows).
IMPORT_CLASSES: Final = {
    "features": (FEATURE, FEATURES_LIST),
    "test_cases": (TEST_CASE, TEST_CASES_LIST),
}

WARM_TASK: Final = "conveyor.maintenance.warm_cache"  # worker.cache_warming, run by beat
GENERATIONS_KEY: Final = "cache:generations"
STATS_KEY: Final = "cache:stats"
READS_KEY: Final = "cache:reads:feature"
ACK_PREFIX: Final = "cache:ack:"
LAYERS: Final = ("l1", "l2", "l3")
# How often the listener pings, as a share of the L1 TTL, and adds counters to Redis.
PINGS_PER_TTL = 4
FLUSH_EVERY_S = 5.0

# One round trip: the class's current generation and the value stored under it.
_LOOKUP = """
local gen = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
return {gen, redis.call('GET', ARGV[2] .. gen)}
"""


def channel(client: redis.Redis) -> str:
    """The invalidation channel: pub/sub ignores database numbers, so the name carries it."""
    return f"cache:invalidate:{client.connection_pool.connection_kwargs.get('db', 0)}"


def versioned(key: str, generation: int) -> str:
    return f"{key}:v{generation}"


def feature_key(feature_id: int) -> str:
    return f"feature:{feature_id}"


def features_list_key(page: int, page_size: int, status: str | None) -> str:
    return f"features:list:{page}:{page_size}:{status or 'all'}"


def test_case_key(test_case_id: int) -> str:
    return f"test_case:{test_case_id}"


def test_cases_list_key(
    feature_id: int | None, page: int, page_size: int, status: str | None
) -> str:
    return f"test_cases:list:{feature_id or 'all'}:{page}:{page_size}:{status or 'all'}"


def etag_of(body: bytes) -> str:
    """A strong ETag: a digest of the exact bytes sent."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def serialize(body: Any) -> bytes:
    """The one JSON form of a cached body (web and the warm task must agree byte for byte)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Cached:
    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes) -> Cached:
        return cls(body, etag_of(body))


@dataclass(frozen=True, slots=True)
class _Entry:
    generation: int
    expires: float  # time.monotonic()
    value: Any


def client_for(settings: Settings) -> redis.Redis:
    """A Redis client with the broker's bounded socket waits."""
    return redis.Redis.from_url(
        settings.redis_url or "",
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
    )


def bump(client: redis.Redis, classes: Iterable[str]) -> dict[str, int]:
    """Increment the generations of ``classes``; returns the new values."""
    names = list(dict.fromkeys(classes))
    pipe = client.pipeline(transaction=True)
    for name in names:
        pipe.hincrby(GENERATIONS_KEY, name, 1)
    return dict(zip(names, (int(v) for v in pipe.execute()), strict=True))


def publish(client: redis.Redis, generations: dict[str, int], *, wait_s: float) -> tuple[int, int]:
    """Tell every listener about ``generations``; wait up to ``wait_s`` for their acks.

    Returns (listeners that received the message, acks received). With ``wait_s`` > 0
    it returns only once every listener acknowledged or ``wait_s`` has passed, which is
    what lets a write answer knowing no process still serves the old generation.
    """
    deadline = time.monotonic() + wait_s
    ack_key = ACK_PREFIX + uuid.uuid4().hex
    message = json.dumps({"generations": generations, "ack": ack_key if wait_s > 0 else None})
    receivers = int(client.publish(channel(client), message))
    acks = 0
    if wait_s <= 0:
        return receivers, acks
    while acks < receivers:
        remaining = deadline - time.monotonic()
        # Redis takes the timeout in seconds with millisecond resolution; 0 means forever.
        if remaining < 0.001:
            break
        if client.blpop([ack_key], timeout=remaining) is None:
            break
        acks += 1
    client.delete(ack_key)
    if acks < receivers:
        log.warning(
            "cache invalidation not acknowledged by every process; waited out the L1 TTL",
            extra={"receivers": receivers, "acks": acks, "classes": sorted(generations)},
        )
        # Whatever the laggards hold in L1 expires by now (entries count from before
        # their generation read, which was before our bump).
        time.sleep(max(0.0, deadline - time.monotonic()))
    return receivers, acks


@memoize
def _worker_client(url: str, timeout_s: float) -> redis.Redis:
    # redis-py's pool notices a fork (pid check) and opens new sockets in the child.
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def invalidate_after_import(settings: Settings, target: str, *, wait: bool) -> None:
    """Retire the cached rows an import into ``target`` may have changed (never raises).

    After each chunk ``wait`` is False (progress shows soon); at the end it is True, so
    the job reports SUCCESS only after every web process has dropped the old rows.
    """
    client = _worker_client(settings.redis_url or "", settings.redis_socket_timeout_s)
    try:
        generations = bump(client, IMPORT_CLASSES[target])
        publish(client, generations, wait_s=settings.cache_local_ttl_s if wait else 0.0)
    except redis.RedisError:
        # The rows are committed either way; a lost bump leaves cached pages until their TTL.
        log.exception("could not invalidate the cache after an import", extra={"target": target})


def read_stats(client: redis.Redis) -> dict[str, int]:
    """Hits and misses per layer added up over every process (what ``flush`` wrote)."""
    raw: dict[bytes, bytes] = client.hgetall(STATS_KEY)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


class Cache:
    """One process's L1 and its view of L2; web creates one per app (``conveyor().cache``)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or client_for(settings)
        self.local_ttl_s = settings.cache_local_ttl_s
        self._lock = threading.Lock()
        self._local: LRUCache[tuple[str, str], _Entry] = LRUCache(
            settings.cache_local_max_entries + settings.token_cache_max_entries
        )
        self._generations: dict[str, int] = {}
        self._counts: Counter[str] = Counter()
        self._flushed: Counter[str] = Counter()
        self._reads: Counter[int] = Counter()
        self._lookup = self.client.register_script(_LOOKUP)
        # L1 is served only while the listener's last answered ping is this recent.
        self._contact = float("-inf")
        self._listener: _Listener | None = None
        self._listener_pid = 0

    # --- counters ------------------------------------------------------------------------

    def count(self, layer: str, outcome: str, n: int = 1) -> None:
        """Count a hit, miss or error of ``layer`` (l1, l2, l3)."""
        with self._lock:
            self._counts[f"{layer}_{outcome}"] += n

    def stats(self) -> dict[str, int]:
        """This process's counts so far: ``{"l1_hit": n, "l2_miss": n, ...}``."""
        with self._lock:
            return dict(self._counts)

    def count_read(self, feature_id: int) -> None:
        """Note a read of a feature, for the warm task's most-read list."""
        with self._lock:
            self._reads[feature_id] += 1

    def flush(self) -> None:
        """Add the counts since the last flush to ``cache:stats`` and ``cache:reads:feature``."""
        with self._lock:
            delta = self._counts - self._flushed
            self._flushed = Counter(self._counts)
            reads, self._reads = self._reads, Counter()
        if not delta and not reads:
            return
        pipe = self.client.pipeline(transaction=False)
        for name, n in delta.items():
            pipe.hincrby(STATS_KEY, name, n)
        for feature_id, n in reads.items():
            pipe.zincrby(READS_KEY, n, str(feature_id))
        try:
            pipe.execute()
        except redis.RedisError:
            with self._lock:  # try again at the next flush
                self._flushed -= delta
                self._reads.update(reads)
            raise

    # --- generations -------------------------------------------------------------------

    def generation(self, name: str) -> int:
        with self._lock:
            return self._generations.get(name, 0)

    def observe(self, generations: dict[str, int]) -> None:
        """Move this process's generations forward (never back)."""
        with self._lock:
            for name, value in generations.items():
                if value > self._generations.get(name, 0):
                    self._generations[name] = value

    def _reset(self, generations: dict[str, int]) -> None:
        # After (re)subscribing: Redis may have restarted, so its counters win outright.
        with self._lock:
            self._generations = dict(generations)
            self._local.clear()

    def l1_live(self) -> bool:
        self._ensure_listener()
        return time.monotonic() - self._contact < self.local_ttl_s

    # --- reads -------------------------------------------------------------------------

    def peek(self, name: str, key: str) -> Any:
        """The L1 value, or None when absent, expired, of an old generation, or L1 is off;
        counts nothing (``web.fastpath`` counts what it serves)."""
        live = self.l1_live()
        with self._lock:
            entry = self._local.get((name, key)) if live else None
            if (
                entry is not None
                and entry.generation == self._generations.get(name, 0)
                and entry.expires > time.monotonic()
            ):
                return entry.value
            return None

    def _local_get(self, name: str, key: str) -> Any:
        """``peek``, counting the L1 hit or miss."""
        value = self.peek(name, key)
        self.count("l1", "miss" if value is None else "hit")
        return value

    def _local_put(self, name: str, key: str, generation: int, started: float, value: Any) -> None:
        with self._lock:
            self._local[(name, key)] = _Entry(generation, started + self.local_ttl_s, value)

    def get(self, name: str, key: str, ttl_s: int, load: Callable[[], bytes]) -> tuple[Cached, str]:
        """The cached body of ``key`` in data class ``name`` and where it came from
        (``l1``, ``l2`` or ``db``): from L1, L2, or ``load()``.

        ``load`` reads the database and serializes; it may raise (a 404), and then
        nothing is stored. When Redis fails, the answer comes from the database.
        """
        cached: Cached | None = self._local_get(name, key)
        if cached is not None:
            return cached, "l1"
        started = time.monotonic()  # before the generation is read: see the docstring
        try:
            raw_gen, raw = self._lookup(keys=[GENERATIONS_KEY], args=[name, key + ":v"])
        except redis.RedisError:
            self.count("l2", "error")
            log.warning("cache read failed; answering from the database", exc_info=True)
            return Cached.of(load()), "db"
        generation = int(raw_gen)
        self.observe({name: generation})
        if raw is not None:
            self.count("l2", "hit")
            cached, layer = Cached.of(raw), "l2"
        else:
            self.count("l2", "miss")
            cached, layer = Cached.of(load()), "db"
            try:
                self.client.set(versioned(key, generation), cached.body, ex=ttl_s)
            except redis.RedisError:
                self.count("l2", "error")
                log.warning("cache write failed", exc_info=True)
        self._local_put(name, key, generation, started, cached)
        return cached, layer

    def remember(self, name: str, key: str, load: Callable[[], Any]) -> Any:
        """L1 only: ``load()``'s value for ``key``, kept while the generation holds.

        None is not kept (web.auth: an unknown token must not fill the LRU).
        """
        value = self._local_get(name, key)
        if value is not None:
            return value
        started = time.monotonic()
        generation = self.generation(name)  # read before loading: see the docstring
        value = load()
        if value is not None:
            self._local_put(name, key, generation, started, value)
        return value

    # --- writes ------------------------------------------------------------------------

    def invalidate(self, classes: Iterable[str]) -> None:
        """Bump ``classes``, tell every process, and wait for them (at most the L1 TTL)."""
        generations = bump(self.client, classes)
        self.observe(generations)
        publish(self.client, generations, wait_s=self.local_ttl_s)

    def before_write(self, classes: Iterable[str]) -> None:
        """Before a write's transaction: bump ``classes`` (raises when Redis is down, so
        the caller can refuse the write before anything changed)."""
        self.observe(bump(self.client, classes))

    def after_write(self, classes: Iterable[str]) -> None:
        """After the commit, before the answer: invalidate everywhere and wait.

        A failure is logged, not raised: the change is saved and an error would tell the
        client otherwise. (The bump before the commit already retired the old entries;
        only what a reader cached between that bump and the commit may outlive it.)
        """
        try:
            self.invalidate(classes)
        except redis.RedisError:
            log.exception("cache invalidation failed after a write", extra={"classes": classes})

    # --- listener ----------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        pid = os.getpid()
        if self._listener_pid == pid:
            return
        with self._lock:
            if self._listener_pid == pid:
                return
            # A forked child (gunicorn worker) starts its own: threads do not survive fork.
            self._listener_pid = pid
            self._contact = float("-inf")
            self._listener = _Listener(self)
            self._listener.start()

    def close(self) -> None:
        """Stop the listener and release connections."""
        listener = self._listener
        if listener is not None and self._listener_pid == os.getpid():
            listener.stop()
        self._listener = None
        self._listener_pid = 0
        self.client.close()


class _Listener(threading.Thread):
    """Applies invalidations from other processes, acks them, pings, flushes counters."""

    def __init__(self, cache: Cache) -> None:
        super().__init__(name="conveyor-cache-listener", daemon=True)
        self.cache = cache
        self.client = client_for(cache.settings)
        self.stopping = threading.Event()
        self.interval = cache.local_ttl_s / PINGS_PER_TTL

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.client.close()

    def run(self) -> None:
        backoff = self.interval
        while not self.stopping.is_set():
            try:
                self._listen()
                backoff = self.interval
            except (redis.RedisError, OSError, ValueError, KeyError, TypeError):
                self.cache._contact = float("-inf")
                log.warning("cache listener lost Redis; L1 is off until it is back", exc_info=True)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _listen(self) -> None:
        cache = self.cache
        pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        pings: dict[bytes, float] = {}  # payload -> when sent: a pong proves contact then
        try:
            # Confirmed subscription first, then the counters: nothing published in between
            # is lost (SUBSCRIBE and HGETALL travel on different connections).
            pubsub.subscribe(channel(self.client))
            deadline = time.monotonic() + self.cache.settings.redis_socket_timeout_s
            while (message := pubsub.get_message(timeout=self.interval)) is None or (
                message["type"] != "subscribe"
            ):
                if self.stopping.is_set():
                    return
                if time.monotonic() > deadline:
                    raise redis.TimeoutError("no subscription confirmation")
            raw: dict[bytes, bytes] = self.client.hgetall(GENERATIONS_KEY)  # type: ignore[assignment]
            cache._reset({k.decode(): int(v) for k, v in raw.items()})
            cache._contact = time.monotonic()
            pinged = last_flush = cache._contact
            while not self.stopping.is_set():
                message = pubsub.get_message(timeout=self.interval)
                if message is not None:
                    self._handle(message, pings)
                now = time.monotonic()
                if now - pinged >= self.interval:
                    pinged = now
                    payload = str(now).encode()
                    pings[payload] = now
                    pubsub.ping(payload.decode())
                if now - last_flush >= FLUSH_EVERY_S:
                    last_flush = now
                    cache.flush()
        finally:
            cache._contact = float("-inf")
            pubsub.close()
        cache.flush()

    def _handle(self, message: dict[str, Any], pings: dict[bytes, float]) -> None:
        if message["type"] == "pong":
            sent = pings.pop(message["data"], None)
            if sent is not None:
                self.cache._contact = max(self.cache._contact, sent)
            return
        if message["type"] != "message":
            return
        data = json.loads(message["data"])
        self.cache.observe({k: int(v) for k, v in data["generations"].items()})
        if data.get("ack"):
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(data["ack"], 1)
            pipe.expire(data["ack"], 60)
            pipe.execute()
