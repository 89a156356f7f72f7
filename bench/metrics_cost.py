"""Metrics cost on the enqueue path: POST /api/v1/canaries req/s with metrics on vs off.

The same gunicorn layout is started alternately with ``CONVEYOR_METRICS_ENABLED`` true
and false (on, off, on, off ... in one run, so drift on a shared machine hits both), each
saturated by ``hey`` (an offered rate far above what it can answer: what it achieves is
its capacity). The figure is the median of each side; the target is at most 5 % slower
with metrics on. No worker runs: the path measured is validate, insert, commit, publish.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from bench.load import CACHE_DIR, Step, rate_step
from bench.processes import Child, child_env, wait_http_ok
from bench.services import BenchServices, bench_services
from shared.cli import web_command
from shared.models import TokenScope
from shared.queue import QUEUES, priority_lists
from shared.tokens import create_token

console = Console()
TARGET_SLOWDOWN = 0.05
# Closed loop: enough connections to keep every gunicorn thread busy (4 x 4 by default).
SATURATING_CONNECTIONS = 32


def _saturate(services: BenchServices, metrics_on: bool, seconds: float, log: Path) -> Step:
    """One gunicorn (settings' layout), one saturating hey run, then everything stopped."""
    settings = services.child_settings("metrics")
    state = settings.state_dir
    engine = create_engine(services.database_url, poolclass=NullPool)
    with Session(engine) as session:
        _, token = create_token(
            session, settings.secret("token_pepper"), "bench-metrics", TokenScope.WRITE
        )
    env = child_env(settings) | {"CONVEYOR_METRICS_ENABLED": "true" if metrics_on else "false"}
    web = Child("web", web_command(settings), env, log)
    base = f"http://127.0.0.1:{settings.web_port}"
    try:
        wait_http_ok(base + "/readyz", web)
        headers = {"Authorization": f"Bearer {token}"}
        url = base + "/api/v1/canaries"
        rate_step(url=url, rate=200, seconds=2, method="POST", headers=headers, body="{}")  # warm
        return rate_step(
            url=url,
            rate=0,
            seconds=seconds,
            closed=SATURATING_CONNECTIONS,
            method="POST",
            headers=headers,
            body="{}",
        )
    finally:
        web.stop()
        _purge(services, engine)
        engine.dispose()
        shutil.rmtree(state, ignore_errors=True)


def _purge(services: BenchServices, engine: Any) -> None:
    """Drop what the run queued: no worker will ever take it."""
    client = redis.Redis.from_url(services.redis_url)
    client.delete(*(name for q in QUEUES for name in priority_lists(q)))
    client.close()
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Five pairs: on this shared machine single runs of the same side differ by 20 %.
    parser.add_argument("--rounds", type=int, default=5, help="on/off pairs (default 5)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each wrk run (default 10)")


def run(args: argparse.Namespace) -> None:
    """Alternate metrics on and off, print the medians and the slowdown."""
    if shutil.which("hey") is None:
        raise SystemExit("missing hey: run `make bench-tools` first")
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = CACHE_DIR / "logs" / run_id / "metrics"
    results: dict[str, list[float]] = {"on": [], "off": []}
    with bench_services(CACHE_DIR) as services:
        console.print(f"services: {services.origin}; enqueue path, {args.rounds} on/off pairs")
        for n in range(args.rounds):
            for side in ("on", "off") if n % 2 == 0 else ("off", "on"):
                step = _saturate(
                    services, side == "on", args.seconds, log_dir / f"web-{side}-{n}.log"
                )
                results[side].append(step.achieved)
                console.print(
                    f"  metrics {side:3}: {step.achieved:,.0f} req/s "
                    f"(p99 {step.p99_s * 1000:.0f} ms, errors {step.errors})"
                )
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    slowdown = 1 - on / off if off else 0.0
    ok = slowdown <= TARGET_SLOWDOWN
    console.print(
        f"POST /api/v1/canaries: {on:,.0f} req/s with metrics, {off:,.0f} without: "
        f"{slowdown:+.1%} slower (target ≤ {TARGET_SLOWDOWN:.0%}) {'✓' if ok else '✗'}"
    )
    out = CACHE_DIR / "metrics.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "metrics",
                "run": run_id,
                "req_per_s": results,
                "median_on": on,
                "median_off": off,
                "slowdown": round(slowdown, 4),
            },
            indent=2,
        )
    )
    console.print(f"results: {out}")
