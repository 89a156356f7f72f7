"""The WSGI entry point: ``gunicorn web.wsgi:app``. Settings come from the environment."""

from __future__ import annotations

from web import create_app

app = create_app()
