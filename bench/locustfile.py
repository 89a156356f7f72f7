"""The seed's k6 scenario (bench/load_test.js) for locust: run by ``bench/load.py``.

Each user loops GET the first page of features, POST a feature, sleep one second; the
ramp comes from ``load_stages.json`` (``CONVEYOR_BENCH_QUICK=1`` divides it by 10). This
file runs in the benchmark's own tool environment (locust is a tool, not a dependency of
Conveyor), so it imports nothing from the project.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant, task

CONFIG = json.loads((Path(__file__).parent / "load_stages.json").read_text())
SCALE = 10 if os.environ.get("CONVEYOR_BENCH_QUICK") == "1" else 1
TOKEN = os.environ["CONVEYOR_BENCH_TOKEN"]
_names = itertools.count()


class SeedUser(FastHttpUser):
    wait_time = constant(1)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    @task
    def list_then_create(self) -> None:
        self.client.get(
            "/api/v1/features?page=1&page_size=20", headers=self.headers, name="GET /features"
        )
        n = next(_names)
        self.client.post(
            "/api/v1/features",
            json={"name": f"load feature {os.getpid()}-{n}", "complexity_points": n % 13},
            headers=self.headers,
            name="POST /features",
        )


class SeedRamp(LoadTestShape):
    """k6 ``stages``: ramp linearly to each stage's target over its duration."""

    stages = [(s["duration_s"] / SCALE, s["target"]) for s in CONFIG["stages"]]

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        start, users = 0.0, 0
        for duration, target in self.stages:
            if elapsed < start + duration:
                now = users + (target - users) * (elapsed - start) / duration
                return max(1, round(now)), 100.0
            start, users = start + duration, target
        return None
