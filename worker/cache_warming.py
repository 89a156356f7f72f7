"""The beat task that warms Redis (L2) with the most-read features.

Web counts reads of single features in the sorted set ``cache:reads:feature``
(``shared.cache``). Every ``cache_warm_interval_s`` this task stores the top
``cache_warm_top`` of them, and the first page of the feature list, under the current
generation, so the first reader after a write or an expiry finds them in Redis instead of
PostgreSQL. It then halves the scores, so "most read" follows what is read now.
"""

from __future__ import annotations

import logging

import redis
from celery import Task
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import cache
from shared.catalog import feature_body, features_page
from shared.models import Feature
from shared.settings import Settings
from worker import runtime
from worker.tasks import job_task

log = logging.getLogger(__name__)

FIRST_PAGE_SIZE = 20  # the list page the seed's clients ask for
DECAY = 0.5


def warm_cache(session: Session, client: redis.Redis, settings: Settings) -> int:
    """Store the most-read features and the first list page in Redis; returns how many
    entries were written (those already cached are left alone)."""
    ranked: list[bytes] = client.zrevrange(cache.READS_KEY, 0, settings.cache_warm_top - 1)  # type: ignore[assignment]
    top = [int(m) for m in ranked]
    # The generations are read before the database, like any reader's: if a write lands
    # in between, what we store sits under a generation nobody reads any more.
    raw = client.hmget(cache.GENERATIONS_KEY, [cache.FEATURE, cache.FEATURES_LIST])
    item_gen, list_gen = (int(v or 0) for v in raw)
    base = (settings.public_url or "").rstrip("/")
    features = session.scalars(select(Feature).where(Feature.id.in_(top))).all() if top else []
    first_page = features_page(session, 1, FIRST_PAGE_SIZE, None, base)
    session.rollback()

    pipe = client.pipeline(transaction=False)
    for feature in features:
        key = cache.versioned(cache.feature_key(feature.id), item_gen)
        body = cache.serialize(feature_body(feature, base))
        pipe.set(key, body, ex=settings.cache_item_ttl_s, nx=True)
    list_key = cache.versioned(cache.features_list_key(1, FIRST_PAGE_SIZE, None), list_gen)
    pipe.set(list_key, cache.serialize(first_page), ex=settings.cache_list_ttl_s, nx=True)
    gone = set(top) - {f.id for f in features}
    if gone:  # deleted features leave the ranking
        pipe.zrem(cache.READS_KEY, *(str(i) for i in gone))
    pipe.zunionstore(cache.READS_KEY, {cache.READS_KEY: DECAY})
    pipe.zremrangebyscore(cache.READS_KEY, "-inf", f"({DECAY}")
    results = pipe.execute()
    return sum(1 for r in results[: len(features) + 1] if r)


@job_task(cache.WARM_TASK, soft_time_limit=60, time_limit=90)
def warm_cache_task(self: Task) -> int:
    """Warm Redis with the most-read features."""
    settings = runtime.settings()
    client = cache.client_for(settings)
    try:
        with runtime.database().session() as session:
            written = warm_cache(session, client, settings)
    finally:
        client.close()
    if written:
        log.info("cache warmed", extra={"entries": written})
    return written
