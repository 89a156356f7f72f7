"""Request ids: taken from ``X-Request-ID`` or made up, logged, echoed, passed to tasks.

A proxy or client that already has an id keeps it end to end: it is bound into every log
line of the request, returned in the response header, and sent as the ``request_id``
message header of any task the request publishes.
"""

from __future__ import annotations

import re
import uuid
from contextlib import ExitStack

from flask import Flask, Response, g, request

from shared.logs import bind_context

HEADER = "X-Request-ID"
# A client-supplied id goes into logs and a response header: only accept tame ones.
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def current_request_id() -> str:
    """This request's id."""
    request_id: str = g.request_id
    return request_id


def request_id_for(offered: str) -> str:
    """The id a request offering ``offered`` (maybe empty) gets: that one if tame, or new."""
    return offered if _ACCEPTABLE.fullmatch(offered) else uuid.uuid4().hex


def _begin() -> None:
    g.request_id = request_id_for(request.headers.get(HEADER, ""))
    stack = ExitStack()
    stack.enter_context(bind_context(request_id=g.request_id))
    g.request_log_context = stack


def _echo(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers[HEADER] = request_id
    return response


def _end(_: BaseException | None) -> None:
    stack: ExitStack | None = g.pop("request_log_context", None)
    if stack is not None:
        stack.close()


def init_request_ids(app: Flask) -> None:
    """Bind, echo and unbind the request id around every request."""
    app.before_request(_begin)
    app.after_request(_echo)
    app.teardown_request(_end)
