"""What an import file may contain: targets, columns, enums and limits.

Web checks a CSV header against this before it accepts a file; the worker validates every
row against it. README and docs/openapi.yaml document the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.models import FeatureStatus, TestCaseStatus

FORMATS = {"text/csv": "csv", "application/x-ndjson": "ndjson", "application/ndjson": "ndjson"}
MAX_FIELD_BYTES = 64 * 1024  # any single value; larger ones are row errors, never buffered
MAX_NAME = 255
CHUNK_ROWS = 1000  # rows per transaction


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "str" | "text" | "int" | "datetime" | "enum"
    required: bool = False
    max_length: int = MAX_NAME
    choices: tuple[str, ...] = ()
    default: str | None = None


@dataclass(frozen=True)
class Target:
    name: str
    table: str
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def check_header(self, header: list[str]) -> tuple[list[str], list[str], list[str]]:
        """(unknown columns, missing required columns, repeated columns) of a CSV header."""
        known = set(self.column_names)
        unknown = [h for h in header if h not in known]
        missing = [c for c in self.required if c not in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        return unknown, missing, repeated


TARGETS: dict[str, Target] = {
    "features": Target(
        "features",
        "features",
        (
            Column("external_id", "str", required=True),
            Column("name", "str", required=True),
            Column("description", "text", max_length=MAX_FIELD_BYTES),
            Column(
                "status",
                "enum",
                choices=tuple(s.value for s in FeatureStatus),
                default=FeatureStatus.PLANNED.value,
            ),
            Column("complexity_points", "int", default="0"),
            Column("created_at", "datetime"),
        ),
    ),
    "test_cases": Target(
        "test_cases",
        "test_cases",
        (
            Column("external_id", "str", required=True),
            Column("feature_external_id", "str", required=True),
            Column("name", "str", required=True),
            Column(
                "status",
                "enum",
                choices=tuple(s.value for s in TestCaseStatus),
                default=TestCaseStatus.PENDING.value,
            ),
        ),
    ),
}
