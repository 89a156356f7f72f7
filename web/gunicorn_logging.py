"""gunicorn's own log lines (boot, worker exits) as JSON, like every other Conveyor line.

gunicorn installs plain-text handlers on ``gunicorn.error``/``gunicorn.access`` with
propagation off; this logger class hands those records to the root logger instead, which
``shared.logs.configure_logging`` renders as JSON. Used via ``--logger-class``.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from shared.logs import configure_logging
from shared.settings import load_settings


class JsonLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        configure_logging(load_settings(), "web")
        for log in (self.error_log, self.access_log):
            log.handlers[:] = []
            log.propagate = True
