"""Health checks for process managers and load balancers; no token needed.

``/healthz`` says the process answers. ``/readyz`` says it can do its work: PostgreSQL and
Redis both reachable, each probed through its own small pool with a short timeout, so a
probe neither waits behind busy requests nor hangs on a dead dependency. It also reports
the pipeline: workers whose heartbeat is recent, and messages waiting per queue. Those are
information, not readiness: web accepts jobs with no worker up (they wait in the queue).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from shared.queue import queue_depths, worker_heartbeats
from web.errors import ServiceUnavailable, problem_response
from web.extension import conveyor

bp = Blueprint("health", __name__)

OK = "ok"
_MAX_REASON = 200


def _down(exc: BaseException) -> str:
    # First line only: driver messages run long and repeat the connection parameters.
    reason = (str(exc).strip().splitlines() or [""])[0][:_MAX_REASON]
    return f"down: {type(exc).__name__}: {reason}"


def _check_postgres() -> str:
    try:
        with conveyor().probe_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the reason is reported
        return _down(exc)
    return OK


def _check_redis() -> str:
    try:
        conveyor().probe_redis.ping()
    except Exception as exc:  # as above
        return _down(exc)
    return OK


def _pipeline() -> dict[str, object]:
    """Workers (live or not) and queue depths, or why they could not be read."""
    ext = conveyor()
    try:
        seen = worker_heartbeats(ext.probe_redis, ext.settings.worker_heartbeat_timeout_s)
        depths = queue_depths(ext.probe_redis)
    except Exception as exc:  # as above: reported, never raised
        return {"workers": _down(exc)}
    return {
        "workers": {"up": sum(seen.values()), "hosts": dict(sorted(seen.items()))},
        "queues": depths,
    }


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    response = jsonify({"status": OK})
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/readyz")
def readyz() -> Response:
    """PostgreSQL and Redis answer: 200, or 503 naming what is down."""
    checks = {"postgres": _check_postgres(), "redis": _check_redis()}
    down = sorted(name for name, state in checks.items() if state != OK)
    if down:
        response = problem_response(
            503,
            ServiceUnavailable.title,
            f"not ready: {', '.join(down)} unreachable",
            problem="not-ready",
            headers={"Retry-After": "5"},
            checks=checks,
        )
    else:
        response = jsonify({"status": OK, "checks": checks, **_pipeline()})
    response.headers["Cache-Control"] = "no-store"
    return response
