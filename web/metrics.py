"""Web's own figures: request timing, ``/metrics``, and gunicorn's multiprocess hooks.

``init_metrics`` times every request into ``conveyor_http_request_duration_seconds``
(route = the URL rule, so ``/api/v1/jobs/<job_id>`` is one series however many jobs
exist) and mounts ``/metrics``. That endpoint answers loopback clients only, unless
``metrics_token`` is set, in which case it wants that bearer token from anyone.

This module is also gunicorn's config (``--config python:web.metrics``, see
``shared.cli.web_command``): the master wipes its metrics directory when it starts and
marks each exited worker dead; each worker switches to multiprocess mode right after the
fork, before the app is loaded, so ``/metrics`` from any worker shows all workers' sums.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import metrics
from shared.queue import KINDS
from shared.settings import Settings, load_settings
from web.errors import Forbidden, NotFound, Unauthorized
from web.extension import conveyor

bp = Blueprint("metrics", __name__)


def init_metrics(app: Flask, settings: Settings) -> None:
    """Time requests and serve ``/metrics`` (both off when ``metrics_enabled`` is false)."""
    app.register_blueprint(bp)
    if not settings.metrics_enabled:
        return
    # First, so the time includes the other before_request steps (auth, request id).
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_observe)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started: float | None = g.get("metrics_started")
    if started is not None:
        rule = request.url_rule
        metrics.observe_request(
            request.method,
            rule.rule if rule is not None else "unmatched",
            response.status_code,
            time.perf_counter() - started,
        )
    if response.status_code == 202 and request.method == "POST":
        _count_submission(response)
    return response


def _count_submission(response: Response) -> None:
    # Every job-creating endpoint answers a new job with 202 and the job (web.submission);
    # a replayed Idempotency-Key answers 200 and is not counted again.
    body = response.get_json(silent=True)
    kind = body.get("kind") if isinstance(body, dict) else None
    if kind in KINDS:
        metrics.JOBS_SUBMITTED.labels(kind).inc()


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """This server's figures (every worker process's) in Prometheus text format."""
    settings = conveyor().settings
    if not settings.metrics_enabled:
        raise NotFound("metrics are turned off (CONVEYOR_METRICS_ENABLED=false)")
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if not metrics.authorize_scrape(
        token, request.headers.get("Authorization"), request.remote_addr
    ):
        if settings.metrics_token is not None:
            raise Unauthorized("the metrics token is missing or wrong")
        raise Forbidden("metrics answer loopback clients only unless CONVEYOR_METRICS_TOKEN is set")
    response = Response(generate_latest(metrics.process_registry()), mimetype=None)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Cache-Control"] = "no-store"
    return response


# --- gunicorn server hooks (this module is gunicorn's --config) --------------------------


def _web_dir(master_pid: int) -> Any:
    return metrics.instance_dir(load_settings().metrics_path, "web", master_pid)


def on_starting(server: Any) -> None:
    """Master, before workers: an empty directory of its own; dead masters' ones go."""
    settings = load_settings()
    if settings.metrics_enabled:
        metrics.prune_dead_dirs(settings.metrics_path, "web")
        metrics.reset_dir(_web_dir(server.pid))


def post_fork(server: Any, worker: Any) -> None:
    """Worker, before the app loads: record into the master's directory."""
    if load_settings().metrics_enabled:
        metrics.use_multiprocess_dir(_web_dir(server.pid))


def child_exit(server: Any, worker: Any) -> None:
    """Master: a worker exited; its live gauges (pool connections) stop counting."""
    metrics.mark_dead(worker.pid, _web_dir(server.pid))


def on_exit(server: Any) -> None:
    """Master, stopping: its figures end with it."""
    shutil.rmtree(_web_dir(server.pid), ignore_errors=True)
