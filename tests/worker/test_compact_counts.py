"""The beat task that folds the row-count deltas, run by a real worker process."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

from shared import counts
from shared.db import Database
from shared.models import Feature, feature_counts
from shared.queue import COMPACT_COUNTS_TASK, make_celery
from shared.settings import Settings
from tests.conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.worker


def test_the_worker_folds_the_deltas_and_the_totals_stay(
    settings: Settings, committed_db: Database, worker: WorkerProcess
) -> None:
    with committed_db.session() as s:
        s.execute(text("TRUNCATE features CASCADE"))  # whatever earlier tests left
        s.commit()
        for i in range(5):
            s.add(Feature(name=f"f{i}", complexity_points=1, status=("planned", "done")[i % 2]))
            s.commit()  # a delta row per commit
        assert s.scalar(select(func.count()).select_from(feature_counts)) == 5

    def rows() -> int:
        with committed_db.session() as s:
            return s.scalar(select(func.count()).select_from(feature_counts)) or 0

    celery = make_celery(settings)
    try:
        celery.send_task(COMPACT_COUNTS_TASK)
    finally:
        celery.close()
    wait_until(lambda: rows() == 2, timeout=30)
    with committed_db.session() as s:
        assert counts.total(s, "features") == 5
        assert counts.total(s, "features", "planned") == 3
        assert counts.total(s, "features", "done") == 2
