"""Streaming readers for import files: CSV (RFC 4180) and NDJSON, one record at a time.

Each record carries the physical line it starts on and the byte offset just after it, so a
chunk's checkpoint can say exactly where to resume. Memory stays bounded whatever the file
holds: a physical line is read at most ``MAX_LINE_BYTES`` at a time (the rest of a longer
line is skipped and the record rejected), and a quoted field may grow only to the csv
module's field limit (an unterminated quote cannot swallow the file). Invalid UTF-8 is
decoded with ``surrogateescape`` so the bad record can be reported, not the stream aborted.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.importspec import MAX_FIELD_BYTES

# A record line may hold several fields; any one field is capped by the csv field limit.
MAX_LINE_BYTES = 4 * MAX_FIELD_BYTES
_BOM = "\ufeff"


@dataclass(slots=True)
class Record:
    """One record of the file: its values (by column) or why it was refused."""

    line: int  # physical line where the record starts (1-based)
    end_offset: int  # byte offset just after the record: where to resume
    values: Any  # CSV: the fields (list[str]) in header order; NDJSON: the object
    error: tuple[str | None, str] | None = None  # (column, reason)
    excerpt: str = ""


class _LongLine(Exception):
    """A physical line longer than MAX_LINE_BYTES (its remainder was skipped)."""


class _Lines:
    """Physical lines for csv.reader, counting lines and bytes as they are handed over.

    A class, not a generator: it raises _LongLine through csv.reader for one record and
    keeps going on the next call (csv.reader resets its state on every record).
    """

    def __init__(self, stream: io.BufferedIOBase, offset: int, line: int) -> None:
        self.stream = stream
        self.offset = offset  # bytes consumed so far
        self.line = line  # physical lines consumed so far
        self.bad_utf8 = False  # set when a line of the current record is not UTF-8
        self.first = offset == 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.stream.readline(MAX_LINE_BYTES)
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.line += 1
        if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
            self._skip_rest_of_line()
            raise _LongLine
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_utf8 = True
            text = raw.decode("utf-8", "surrogateescape")
        if self.first:
            self.first = False
            text = text.removeprefix(_BOM)
        return text

    def _skip_rest_of_line(self) -> None:
        while True:
            piece = self.stream.readline(MAX_LINE_BYTES)
            self.offset += len(piece)
            if not piece or piece.endswith(b"\n"):
                return


def excerpt(text: str, limit: int = 120) -> str:
    """A short, printable, storable piece of a bad value (no NUL, no lone surrogates)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CsvReader:
    """Records of a CSV file with a header line; resumable from a checkpoint."""

    def __init__(
        self,
        stream: io.BufferedIOBase,
        *,
        offset: int = 0,
        line: int = 0,
        header: list[str] | None = None,
    ) -> None:
        csv.field_size_limit(MAX_FIELD_BYTES)
        self._lines = _Lines(stream, offset, line)
        self._reader = csv.reader(self._lines, strict=True)
        self.header = header

    def read_header(self) -> list[str]:
        """Parse the first record as the header (call once, at offset 0)."""
        try:
            header = next(self._reader)
        except StopIteration:
            header = []
        self.header = [h.strip() for h in header]
        return self.header

    @property
    def offset(self) -> int:
        return self._lines.offset

    def value(self, values: list[str], column: str | None) -> Any:
        """The field named ``column`` of a record's values (for error excerpts)."""
        if column is None or self.header is None or column not in self.header:
            return None
        return values[self.header.index(column)]

    @property
    def line(self) -> int:
        return self._lines.line

    def __iter__(self) -> Iterator[Record]:
        assert self.header is not None, "read_header() first, or pass the header to resume"
        header = self.header
        width = len(header)
        lines = self._lines
        reader = self._reader
        while True:
            start = lines.line + 1
            lines.bad_utf8 = False
            try:
                fields = next(reader)
            except StopIteration:
                return
            except _LongLine:
                yield Record(start, lines.offset, None, (None, "line too long"), "")
                continue
            except csv.Error as exc:
                reason = str(exc)
                if "field larger than field limit" in reason:
                    reason = f"a field is longer than {MAX_FIELD_BYTES} characters"
                yield Record(start, lines.offset, None, (None, f"malformed CSV: {reason}"), "")
                continue
            if not fields:
                continue  # a blank line is not a record
            if lines.bad_utf8:
                yield Record(
                    start, lines.offset, None, (None, "invalid UTF-8"), excerpt(",".join(fields))
                )
                continue
            if len(fields) != width:
                yield Record(
                    start,
                    lines.offset,
                    None,
                    (None, f"expected {width} fields, found {len(fields)}"),
                    excerpt(",".join(fields)),
                )
                continue
            yield Record(start, lines.offset, fields)


class NdjsonReader:
    """Records of an NDJSON file: one JSON object per physical line."""

    def __init__(self, stream: io.BufferedIOBase, *, offset: int = 0, line: int = 0) -> None:
        self._stream = stream
        self.offset = offset
        self.line = line

    @staticmethod
    def value(values: dict[str, Any], column: str | None) -> Any:
        """The field named ``column`` of a record's values (for error excerpts)."""
        return values.get(column) if column else None

    def __iter__(self) -> Iterator[Record]:
        stream = self._stream
        while True:
            raw = stream.readline(MAX_LINE_BYTES)
            if not raw:
                return
            self.offset += len(raw)
            self.line += 1
            start = self.line
            if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while True:
                    piece = stream.readline(MAX_LINE_BYTES)
                    self.offset += len(piece)
                    if not piece or piece.endswith(b"\n"):
                        break
                yield Record(start, self.offset, None, (None, "line too long"), "")
                continue
            if start == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                shown = excerpt(raw.decode("utf-8", "surrogateescape"))
                yield Record(start, self.offset, None, (None, "invalid UTF-8"), shown)
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield Record(
                    start, self.offset, None, (None, f"invalid JSON: {exc}"), excerpt(text)
                )
                continue
            if not isinstance(value, dict):
                yield Record(
                    start,
                    self.offset,
                    None,
                    (None, f"expected a JSON object, found {type(value).__name__}"),
                    excerpt(text),
                )
                continue
            yield Record(start, self.offset, value)
