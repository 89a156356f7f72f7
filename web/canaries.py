"""``/api/v1/canaries``: an end-to-end probe job (web → Redis → worker → PostgreSQL)."""

from __future__ import annotations

from typing import Annotated

from flask import Blueprint, Response
from pydantic import BaseModel, ConfigDict, Field

from shared.models import TokenScope
from web.auth import requires
from web.submission import submit_and_respond
from web.validation import json_object, validate

bp = Blueprint("canaries", __name__, url_prefix="/api/v1/canaries")


class CanaryParams(BaseModel):
    """Optional: keep the canary busy (tests use it to cancel a running job)."""

    model_config = ConfigDict(extra="forbid")

    # Strict: JSON true or "3" is a client mistake, not a number of seconds.
    sleep_s: Annotated[float, Field(ge=0, le=30, strict=True, allow_inf_nan=False)] | None = None


@bp.post("")
@requires(TokenScope.WRITE)
def create_canary() -> Response:
    """Queue a canary job; 202 with the job and its Location."""
    params = validate(CanaryParams, json_object(required=False))
    return submit_and_respond("canary", params.model_dump(exclude_none=True))
