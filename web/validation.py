"""Reading request input: JSON bodies and query strings, validated by pydantic models.

Malformed JSON is the client's syntax error (400); JSON that parses but breaks a rule is
a 422 with one entry per field, so a client can show each message beside its input.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from web.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)

# JSON request bodies are small documents; bulk data goes through the imports endpoint.
MAX_JSON_BYTES = 1 << 20


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; RFC 8259 JSON (and PostgreSQL's jsonb) do not.
    raise ValueError(f"{name} is not valid JSON")


def json_object(*, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object; ``{}`` for an empty body when not ``required``."""
    length = request.content_length
    if length is not None and length > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON bodies are limited to {MAX_JSON_BYTES} bytes")
    raw = request.stream.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON bodies are limited to {MAX_JSON_BYTES} bytes")
    if not raw.strip():
        if required:
            raise Unprocessable.field("body", "a JSON object is required")
        return {}
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType("send the body as application/json")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Unprocessable.field("body", "must be a JSON object")
    return data


def field_errors(error: ValidationError) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` per field, messages for the same field joined."""
    by_field: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or "body"
        by_field.setdefault(field, []).append(item["msg"])
    return [{"field": f, "message": "; ".join(msgs)} for f, msgs in by_field.items()]


def validate(model: type[M], data: dict[str, Any]) -> M:
    """``model`` built from ``data``, or a 422 naming each offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Unprocessable(field_errors(exc)) from None


def query(model: type[M]) -> M:
    """The query string validated by ``model`` (repeated keys: the first value counts)."""
    return validate(model, request.args.to_dict())
