"""The cache-warming beat task, run by a real worker process."""

from __future__ import annotations

import pytest
import redis

from shared import cache
from shared.db import Database
from shared.models import Feature
from shared.queue import make_celery
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until
from tests.web.catalog_helpers import clear_cache

pytestmark = pytest.mark.worker


def test_worker_warms_the_most_read_features(
    settings: Settings, committed_db: Database, worker: WorkerProcess
) -> None:
    """The task is registered under its beat name and fills Redis from the read counts."""
    clear_cache(settings.redis_url or "")
    with committed_db.session() as s:
        feature = Feature(name="popular", complexity_points=2)
        s.add(feature)
        s.commit()
    rd = redis.Redis.from_url(settings.redis_url or "")
    try:
        rd.zincrby(cache.READS_KEY, 5, str(feature.id))
        celery = make_celery(settings)
        try:
            celery.send_task(cache.WARM_TASK)
        finally:
            celery.close()
        key = cache.versioned(cache.feature_key(feature.id), 0)
        wait_until(lambda: rd.exists(key), timeout=30)
        ttl = rd.ttl(key)
        assert 0 < ttl <= settings.cache_item_ttl_s  # type: ignore[operator]
        assert rd.exists(cache.versioned(cache.features_list_key(1, 20, None), 0))
    finally:
        clear_cache(settings.redis_url or "")
        rd.close()
