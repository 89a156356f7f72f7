"""Row validation: a record's values → the tuple to write, or ``Refused`` with the reason.

One function per target, written flat because it runs for every row of every import.
The tuples are in the order of ``shared.importspec.TARGETS[target].column_names``; an
optional value left out or empty becomes its default (``None`` means "database default").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from shared.importspec import MAX_FIELD_BYTES, MAX_NAME, TARGETS

Row = tuple[Any, ...]
Validator = Callable[[dict[str, Any]], Row]

_DIGITS = re.compile(r"[0-9]{1,10}")
# An ISO 8601 date-time spelled the way PostgreSQL reads it is passed through unchanged
# once Python has parsed it (the chunk runs with TimeZone=UTC, so a value without an
# offset means UTC in both); anything else is re-formatted by isoformat().
_PLAIN_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})?"
)
_INT_MAX = 2**31 - 1
_FEATURE = TARGETS["features"]
_TEST_CASE = TARGETS["test_cases"]
_FEATURE_STATUS = frozenset(next(c for c in _FEATURE.columns if c.name == "status").choices)
_TEST_STATUS = frozenset(next(c for c in _TEST_CASE.columns if c.name == "status").choices)
_FEATURE_KEYS = frozenset(_FEATURE.column_names)
_TEST_CASE_KEYS = frozenset(_TEST_CASE.column_names)


class Refused(Exception):
    """A value the row may not have; the row becomes an import error."""

    def __init__(self, column: str | None, reason: str) -> None:
        self.column = column
        self.reason = reason


def _text(values: dict[str, Any], column: str, limit: int, *, required: bool) -> str | None:
    value = values.get(column)
    if value is None or value == "":
        if required:
            raise Refused(column, "is required")
        return None
    if not isinstance(value, str):
        raise Refused(column, f"must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise Refused(column, f"is longer than {limit} characters")
    if "\x00" in value:
        raise Refused(column, "contains a NUL byte")
    if required and not value.strip():
        raise Refused(column, "is required")
    return value


def _enum(values: dict[str, Any], column: str, choices: frozenset[str], default: str) -> str:
    value = values.get(column)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in choices:
        raise Refused(column, f"must be one of {', '.join(sorted(choices))}, not {value!r:.40}")
    return value


def _count(values: dict[str, Any], column: str) -> int:
    value = values.get(column)
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise Refused(column, "must be an integer ≥ 0")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value)
    else:
        raise Refused(column, f"must be an integer ≥ 0, not {value!r:.40}")
    if not 0 <= number <= _INT_MAX:
        raise Refused(column, f"must be an integer between 0 and {_INT_MAX}")
    return number


def _timestamp(values: dict[str, Any], column: str) -> str | None:
    return _timestamp_value(values.get(column), column)


def _timestamp_value(value: Any, column: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise Refused(column, "must be an ISO 8601 date-time")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise Refused(column, f"must be an ISO 8601 date-time, not {value!r:.40}") from None
    if _PLAIN_TIMESTAMP.fullmatch(value):
        return value  # valid, and spelled the way PostgreSQL reads it: no re-formatting
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # a time without an offset is taken as UTC
    return parsed.isoformat()


def _unknown(values: dict[str, Any], known: frozenset[str]) -> None:
    if len(values) > len(known) or not known.issuperset(values):
        extra = sorted(k for k in values if k not in known)
        if extra:
            raise Refused(extra[0], f"unknown field(s): {', '.join(extra)[:200]}")


def validate_feature(values: dict[str, Any]) -> Row:
    """(external_id, name, description, status, complexity_points, created_at); or Refused."""
    _unknown(values, _FEATURE_KEYS)
    return (
        _text(values, "external_id", MAX_NAME, required=True),
        _text(values, "name", MAX_NAME, required=True),
        _text(values, "description", MAX_FIELD_BYTES, required=False),
        _enum(values, "status", _FEATURE_STATUS, "planned"),
        _count(values, "complexity_points"),
        _timestamp(values, "created_at"),
    )


def validate_test_case(values: dict[str, Any]) -> Row:
    """(external_id, feature_external_id, name, status); or Refused."""
    _unknown(values, _TEST_CASE_KEYS)
    return (
        _text(values, "external_id", MAX_NAME, required=True),
        _text(values, "feature_external_id", MAX_NAME, required=True),
        _text(values, "name", MAX_NAME, required=True),
        _enum(values, "status", _TEST_STATUS, "pending"),
    )


VALIDATORS: dict[str, Validator] = {
    "features": validate_feature,
    "test_cases": validate_test_case,
}


def compile_csv_feature_validator(header: list[str]) -> Callable[[list[str]], Row]:
    """``validate_feature`` specialised to one CSV header: fields by position, no dict.

    Every import row passes through here, so the checks are inlined; they are the same as
    ``validate_feature``'s (a test runs both over the same rows).
    """
    pos = {name: header.index(name) if name in header else None for name in _FEATURE_KEYS}
    i_ext, i_name = pos["external_id"], pos["name"]
    i_desc, i_status = pos["description"], pos["status"]
    i_points, i_created = pos["complexity_points"], pos["created_at"]
    assert i_ext is not None
    assert i_name is not None
    statuses = _FEATURE_STATUS
    digits = _DIGITS.fullmatch

    def validate(f: list[str]) -> Row:
        ext = f[i_ext]
        if not ext or not ext.strip():
            raise Refused("external_id", "is required")
        if len(ext) > MAX_NAME:
            raise Refused("external_id", f"is longer than {MAX_NAME} characters")
        name = f[i_name]
        if not name or not name.strip():
            raise Refused("name", "is required")
        if len(name) > MAX_NAME:
            raise Refused("name", f"is longer than {MAX_NAME} characters")
        desc = f[i_desc] or None if i_desc is not None else None
        if desc is not None and len(desc) > MAX_FIELD_BYTES:
            raise Refused("description", f"is longer than {MAX_FIELD_BYTES} characters")
        if "\x00" in ext or "\x00" in name or (desc is not None and "\x00" in desc):
            column = "external_id" if "\x00" in ext else "name" if "\x00" in name else "description"
            raise Refused(column, "contains a NUL byte")
        status = "planned"
        if i_status is not None and f[i_status]:
            status = f[i_status]
            if status not in statuses:
                raise Refused(
                    "status", f"must be one of {', '.join(sorted(statuses))}, not {status!r:.40}"
                )
        points = 0
        if i_points is not None and f[i_points]:
            raw = f[i_points].strip()
            if not digits(raw) or int(raw) > _INT_MAX:
                raise Refused(
                    "complexity_points",
                    f"must be an integer between 0 and {_INT_MAX}, not {f[i_points]!r:.40}",
                )
            points = int(raw)
        created = None
        if i_created is not None and f[i_created]:
            created = _timestamp_value(f[i_created], "created_at")
        return (ext, name, desc, status, points, created)

    return validate


def compile_csv_validator(target: str, header: list[str]) -> Callable[[list[str]], Row]:
    """The validator for CSV rows of ``target`` under ``header`` (fields by position)."""
    if target == "features":
        return compile_csv_feature_validator(header)
    by_dict = VALIDATORS[target]
    return lambda fields: by_dict(dict(zip(header, fields, strict=True)))
