"""``python -m web.granian_server``: the API under granian, Conveyor's default web server.

granian parses HTTP and manages connections in Rust and calls ``web.wsgi:app`` from a
few Python threads per worker process. Measured on this 2-core machine with
``wrk -t2 -c64`` (README, "Serving"): the cached feature list at 9.6-9.8k req/s under
granian 2 workers x 4 blocking threads against 4.9k under gunicorn gthread 4x4, and a bare
``/healthz`` at 12.9-13.6k against 5.8k. gunicorn stays available
(``CONVEYOR_WEB_SERVER=gunicorn``).

This launcher does for granian what ``web.metrics`` does as gunicorn's config: before the
workers start, the main process wipes and adopts a metrics directory of its own, so every
worker (forked from it) records into files there and ``/metrics`` from any worker shows
all workers' sums; the directory goes when the server stops. granian's own log lines go
to the root logger, which renders them as JSON like every other Conveyor line.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from typing import Any

from granian import Granian
from granian.constants import Interfaces

from shared import metrics
from shared.logs import configure_logging
from shared.settings import Settings, load_settings

# granian's loggers hand their records to the root logger (no plain-text handlers).
LOGGING: dict[str, Any] = {
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": True},
    },
}
# As gunicorn's --graceful-timeout: shorter than the supervisor's wait for web.
KILL_TIMEOUT_S = 10


def build(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> Any:
    """The granian server for ``settings`` (not started)."""
    server = Granian(
        "web.wsgi:app",
        address=host or settings.web_host,
        port=port or settings.web_port,
        interface=Interfaces.WSGI,
        workers=workers or settings.granian_workers,
        blocking_threads=threads or settings.granian_threads,
        websockets=False,
        log_dictconfig=LOGGING,
        log_access=False,
        respawn_failed_workers=True,
        workers_kill_timeout=KILL_TIMEOUT_S,
    )
    if settings.metrics_enabled:
        directory = metrics.instance_dir(settings.metrics_path, "web")

        def adopt() -> None:
            # In the main process, before its workers fork: they inherit the switch.
            metrics.prune_dead_dirs(settings.metrics_path, "web")
            metrics.reset_dir(directory)
            metrics.use_multiprocess_dir(directory)

        server.on_startup(adopt)
        server.on_shutdown(lambda: shutil.rmtree(directory, ignore_errors=True))
    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m web.granian_server", description=__doc__)
    parser.add_argument("--host", help="address to listen on (default: the settings')")
    parser.add_argument("--port", type=int, help="port to listen on (default: the settings')")
    parser.add_argument("--workers", type=int, help="worker processes")
    parser.add_argument("--threads", type=int, help="blocking (Python) threads per worker")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings, "web")
    build(
        settings, host=args.host, port=args.port, workers=args.workers, threads=args.threads
    ).serve()


if __name__ == "__main__":
    main()
