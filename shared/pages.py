"""The page envelope every paginated list answers with, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def page_body(
    items: list[dict[str, Any]],
    page: int,
    page_size: int,
    total: int,
    page_link: Callable[[int], str],
) -> dict[str, Any]:
    """``items`` of page ``page``, the ``total`` count, and self / next / prev links."""
    return {
        "items": items,
        "page": page,
        "page_size": page_size,
        "total": total,
        "links": {
            "self": page_link(page),
            "next": page_link(page + 1) if page * page_size < total else None,
            "prev": page_link(page - 1) if page > 1 else None,
        },
    }
