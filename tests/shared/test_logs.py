"""Structured logs: one JSON object a line, bound context merged, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared.logs import bind_context, configure_logging
from shared.settings import Settings


@pytest.fixture
def json_logs(settings: Settings) -> Iterator[io.StringIO]:
    """Logging configured as every process does it, its one handler writing here."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(settings, "test")
    out = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    yield out
    root.handlers[:], root.level = handlers, level
    structlog.reset_defaults()


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_secrets_are_redacted_wherever_they_come_from(
    json_logs: io.StringIO,
) -> None:
    log = logging.getLogger("conveyor.test")
    with bind_context(job_id="j-1", api_token="tok-in-context"):
        for _ in range(2):  # the second line goes through the remembered key checks
            log.info(
                "calling out",
                extra={"Authorization": "Bearer abc", "db_password": "pw", "kind": "canary"},
            )
    lines = _lines(json_logs.getvalue())
    assert len(lines) == 2
    for line in lines:
        assert line["event"] == "calling out"
        assert line["job_id"] == "j-1"
        assert line["kind"] == "canary"
        assert line["Authorization"] == "[redacted]"
        assert line["db_password"] == "[redacted]"
        assert line["api_token"] == "[redacted]"
        assert line["process"] == "test"
    assert "abc" not in json.dumps(lines)
    assert '"pw"' not in json.dumps(lines)
