"""Structured logs: one JSON object a line, with request_id / job_id / task_id when known.

stdlib logging is the single pipe (Celery, gunicorn, werkzeug and our code all log through
it); structlog's ProcessorFormatter renders every record as JSON and merges the context
variables bound by ``bind_context`` (request id in web, job and task id in worker).
"""

from __future__ import annotations

import functools
import logging
import logging.config
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from shared.settings import Settings

# Keys that must never reach a log line, whatever a caller passes as ``extra``.
_REDACT = frozenset({"authorization", "token", "password", "secret", "pepper", "cookie"})


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str) -> bool:
    # Remembered per key: a line carries about ten keys, nearly always the same ones, and
    # this test was a quarter of a log line's cost.
    lowered = key.lower()
    return any(word in lowered for word in _REDACT)


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in [k for k in event_dict if _is_secret(k)]:
        event_dict[key] = "[redacted]"
    return event_dict


def _extra_fields(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Carry stdlib ``extra={...}`` fields into the JSON object."""
    record: logging.LogRecord | None = event_dict.get("_record")
    if record is not None:
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_") and key not in event_dict:
                event_dict[key] = value
    return event_dict


_STD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "color_message"}
)


def configure_logging(settings: Settings, process: str) -> None:
    """Route every logger to stderr as JSON lines tagged with the process kind."""

    def tag_process(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        # A processor, not a context variable: threads a server starts later (gunicorn
        # gthread, granian) begin with an empty context and would log untagged lines.
        event_dict.setdefault("process", process)
        return event_dict

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        tag_process,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _extra_fields,
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    # The logging HOWTO's "Optimization": no record looks up its caller's frame, thread,
    # process or multiprocessing names, which no line shows (``process`` is ours, above).
    # A sixth of a line's instructions (callgrind: a canary's three worker lines).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # warnings.warn output (Celery's superuser warning, deprecations) becomes JSON too.
    logging.captureWarnings(True)
    structlog.contextvars.clear_contextvars()
    structlog.configure(
        processors=[
            structlog.stdlib.add_logger_name,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


@contextmanager
def bind_context(**values: str | None) -> Iterator[None]:
    """Add fields (job_id, task_id, request_id) to every log line inside the block."""
    present = {k: v for k, v in values.items() if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**present)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
