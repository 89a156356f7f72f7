"""``python -m worker.flower``: Flower, with its log lines as JSON like everything else.

Tornado installs its own plain-text handler only when the root logger has none, so
configuring ours first is enough. Flower then starts exactly as ``celery flower`` would.
"""

from __future__ import annotations

import sys

from celery.bin.celery import main as celery_main

from shared.logs import configure_logging
from shared.settings import load_settings


def main() -> None:
    configure_logging(load_settings(), "flower")
    sys.argv = ["celery", "-A", "worker.celery_app", "flower", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
