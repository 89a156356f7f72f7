"""URLs for ``links`` members and ``Location`` headers.

Paths come from the URL map, so a route change cannot leave a stale link behind. Behind a
proxy that rewrites the host or prefix, ``settings.public_url`` makes them absolute.
"""

from __future__ import annotations

from typing import Any

from flask import url_for

from web.extension import conveyor


def link(endpoint: str, **values: Any) -> str:
    """The URL of ``endpoint``: a path, or absolute under ``public_url`` when set."""
    path = url_for(endpoint, **values)
    base = conveyor().settings.public_url
    return base.rstrip("/") + path if base else path
