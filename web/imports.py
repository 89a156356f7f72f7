"""``/api/v1/imports``: upload a CSV or NDJSON file as an import job, and read its report.

The body streams through in fixed-size pieces, never whole in memory: from the socket,
through gzip (when ``Content-Encoding: gzip``) and the multipart decoder (when the file is
a form field), into a PostgreSQL large object (``shared.storage``), hashing as it goes.
The object, its ``uploads`` row, the job and its ``imports`` row commit together in
``shared.jobs.submit``'s one transaction, before the message is published; every refusal
(too large, a bad header, a reused Idempotency-Key) rolls back or deletes what was stored.

Job ``params`` carry the file's digest and size, not the upload's id: they are the
Idempotency-Key fingerprint, and the same file under the same key must fingerprint the
same. The worker finds the file through the ``imports`` row (``upload_id``).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, File, MultipartDecoder, NeedData
from werkzeug.sansio.multipart import Field as FormField

from shared import jobs, storage
from shared.importspec import FORMATS, TARGETS
from shared.jobs import JobRecord
from shared.models import ImportError_, ImportRun, Job, TokenScope, Upload
from shared.pages import page_body
from web.auth import current_principal, requires, visible_owner
from web.errors import BadRequest, NotFound, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from web.extension import conveyor, db_session
from web.jobs import MAX_PAGE, PROGRESS_FIELDS, job_body, job_url
from web.links import link
from web.submission import idempotency_key, submit_and_respond
from web.validation import query

bp = Blueprint("imports", __name__, url_prefix="/api/v1/imports")

KIND = "import"
READ_SIZE = 64 * 1024  # one piece of the body: socket read, gunzip output, storage write
# The header is a handful of column names; a longer first record is an unterminated quote.
MAX_HEADER_BYTES = 64 * 1024
MAX_MAX_ERRORS = 10_000_000
# Room for the multipart envelope (boundaries, part headers, small extra fields) around a
# file that is itself within the limit.
MULTIPART_OVERHEAD = 64 * 1024
MAX_MULTIPART_PARTS = 16
GZIP_WBITS = 16 + zlib.MAX_WBITS
UTF8_BOM = b"\xef\xbb\xbf"
UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
MEDIA_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}
EXTENSIONS = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}
MAX_FILENAME = 255  # uploads.filename
MAX_ERRORS_PAGE_SIZE = 1000
CSV_FLUSH_BYTES = 64 * 1024
# OWASP "CSV Injection": a spreadsheet runs a cell starting with these as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Progress members an import reports beside the generic ones.
IMPORT_PROGRESS_FIELDS = (*PROGRESS_FIELDS, "rows_per_s")
_QUOTE_OR_NEWLINE = re.compile(rb'["\r\n]')


def import_url(job_id: uuid.UUID | str) -> str:
    """Where an import's report lives."""
    return link("imports.get_import", job_id=str(job_id))


def errors_url(job_id: uuid.UUID | str) -> str:
    """Where an import's rejected rows are listed."""
    return link("imports.list_errors", job_id=str(job_id))


# --- reading the body ------------------------------------------------------------------------


@dataclass
class IncomingFile:
    """The uploaded file, ready to stream: its format, and its bytes as pieces."""

    format: str
    content_type: str
    filename: str | None
    pieces: Iterator[bytes]
    columns: list[str] | None = None  # CSV: the header, already checked


def _gzip_encoded() -> bool:
    """Whether the body is gzip-compressed; 415 for any coding but gzip and identity."""
    codings = [c.strip().lower() for c in request.headers.get("Content-Encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return False
    if codings in (["gzip"], ["x-gzip"]):
        return True
    raise UnsupportedMediaType(
        f"Content-Encoding {request.headers['Content-Encoding']!r} is not supported; "
        "send the body uncompressed or as gzip",
        problem="unsupported-content-encoding",
    )


def _format_of_media_type(mimetype: str, options: dict[str, str]) -> str | None:
    """The import format a media type names, or None; 415 for a charset other than UTF-8."""
    fmt = FORMATS.get(mimetype.lower())
    if fmt is None:
        return None
    charset = options.get("charset")
    if charset is not None and charset.lower() not in UTF8_CHARSETS:
        raise UnsupportedMediaType(
            f"charset {charset!r} is not supported; import files are UTF-8",
            problem="unsupported-charset",
        )
    return fmt


def _unsupported_type(what: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"{what}; send text/csv or application/x-ndjson, raw or as the multipart field "
        "'file' (.csv, .ndjson or .jsonl)",
        problem="unsupported-media-type",
    )


def _body_pieces(gzipped: bool, cap: int, limit: int) -> Iterator[bytes]:
    """The request body, decoded, in pieces of at most READ_SIZE; TooLarge past ``cap``."""
    stream = request.stream
    raw: Iterator[bytes] = iter(lambda: stream.read(READ_SIZE), b"")
    pieces = _gunzip(raw) if gzipped else raw
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > cap:
            raise storage.TooLarge(limit)
        yield piece


def _gunzip(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress gzip as a stream, output bounded per piece (a zip bomb stays small).

    Concatenated gzip members (``cat a.gz b.gz``) decode as one stream, as gzip(1) does.
    """
    decoder = zlib.decompressobj(GZIP_WBITS)
    in_member = False
    try:
        for piece in pieces:
            data = piece
            while True:
                in_member = in_member or bool(data)
                out = decoder.decompress(data, READ_SIZE)
                if out:
                    yield out
                if decoder.eof:
                    data = decoder.unused_data
                    decoder = zlib.decompressobj(GZIP_WBITS)
                    in_member = False
                    if not data:
                        break
                    continue
                data = decoder.unconsumed_tail
                # A full piece may leave output pending even with no input left: go again.
                if not data and len(out) < READ_SIZE:
                    break
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid gzip: {exc}", problem="invalid-gzip") from None
    if in_member:
        raise BadRequest("the gzip body is truncated", problem="invalid-gzip")


def _safe_filename(filename: str | None) -> str | None:
    """The file's own name, without a client path (``C:\\fakepath\\x.csv``), for display."""
    if not filename:
        return None
    name = re.split(r"[\\/]", filename)[-1].strip()
    return name[:MAX_FILENAME] or None


def _format_of_filename(filename: str | None) -> str | None:
    if not filename:
        return None
    _, dot, ext = filename.rpartition(".")
    return EXTENSIONS.get(f".{ext.lower()}") if dot else None


class _MultipartFile:
    """The ``file`` part of a multipart/form-data body, decoded as it streams in.

    werkzeug's sans-IO decoder turns pieces into events; only the ``file`` part's data is
    kept, a piece at a time. Other parts are read past and ignored; a second ``file`` part
    is refused. ``request.files`` is not used: it spools the whole body before the view.
    """

    def __init__(self, pieces: Iterator[bytes], boundary: bytes) -> None:
        self._pieces = pieces
        # The byte cap bounds what the decoder buffers while it looks for a boundary or
        # the end of a part's headers; inside a part it holds about one piece.
        self._decoder = MultipartDecoder(
            boundary,
            max_form_memory_size=READ_SIZE + MULTIPART_OVERHEAD,
            max_parts=MAX_MULTIPART_PARTS,
        )
        self._events = self._all_events()

    def _all_events(self) -> Iterator[Any]:
        try:
            for piece in self._pieces:
                self._decoder.receive_data(piece)
                yield from self._ready_events()
            self._decoder.receive_data(None)
            yield from self._ready_events()
        except ValueError as exc:
            raise BadRequest(
                f"the multipart body is malformed: {exc}", problem="invalid-multipart"
            ) from None
        except RequestEntityTooLarge:
            raise PayloadTooLarge(
                f"the multipart body has more than {MAX_MULTIPART_PARTS} parts or a part "
                f"header, preamble or epilogue over {MULTIPART_OVERHEAD} bytes",
                problem="invalid-multipart",
            ) from None

    def _ready_events(self) -> Iterator[Any]:
        while True:
            event = self._decoder.next_event()
            if isinstance(event, NeedData):
                return
            yield event
            if isinstance(event, Epilogue):
                return

    def open(self) -> tuple[str | None, str | None, dict[str, str], Iterator[bytes]]:
        """Read up to the ``file`` part: (filename, mimetype, options, data pieces)."""
        for event in self._events:
            if isinstance(event, File | FormField) and event.name == "file":
                filename = event.filename if isinstance(event, File) else None
                mimetype, options = parse_options_header(event.headers.get("Content-Type", ""))
                return filename, mimetype or None, options, self._file_data()
        raise Unprocessable.field("file", "the multipart body has no 'file' part")

    def _file_data(self) -> Iterator[bytes]:
        for event in self._events:
            if not isinstance(event, Data):  # a part's events are Data until the last one
                break
            if event.data:
                yield event.data
            if not event.more_data:
                break
        # Read the rest of the body, so a malformed or doubled form is refused too.
        for event in self._events:
            if isinstance(event, File | FormField) and event.name == "file":
                raise Unprocessable.field("file", "send exactly one 'file' part")


def _open_body(limit: int) -> IncomingFile:
    """Check the request's headers and open its file; nothing is read for a refusal."""
    gzipped = _gzip_encoded()
    mimetype = request.mimetype
    multipart = mimetype == "multipart/form-data"
    fmt = None
    if not multipart:
        fmt = _format_of_media_type(mimetype, request.mimetype_params)
        if fmt is None:
            raise _unsupported_type(f"Content-Type {mimetype or '(none)'!r} is not supported")
    # The limit is on the file as stored. A Content-Length that cannot fit is refused before
    # reading; the envelope of a form and gzip's own overhead (under 0.1 %) get room.
    cap = limit + MULTIPART_OVERHEAD if multipart else limit
    allowed = cap + (limit >> 10) + 1024 if gzipped else cap
    length = request.content_length
    if length is not None and length > allowed:
        raise storage.TooLarge(limit)
    pieces = _body_pieces(gzipped, cap, limit)
    if not multipart:
        assert fmt is not None
        return IncomingFile(fmt, mimetype, None, pieces)
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise BadRequest("multipart/form-data needs a boundary parameter")
    name, part_type, options, data = _MultipartFile(pieces, boundary.encode("latin-1")).open()
    filename = _safe_filename(name)
    fmt = _format_of_media_type(part_type, options) if part_type else None
    fmt = fmt or _format_of_filename(filename)
    if fmt is None:
        raise _unsupported_type(
            f"the 'file' part's type ({part_type or 'none'}) and name ({filename or 'none'}) "
            "name no supported format"
        )
    part_type = part_type.lower() if part_type else None
    content_type = part_type if part_type in FORMATS else MEDIA_TYPES[fmt]
    return IncomingFile(fmt, content_type, filename, data)


def _empty_file() -> Unprocessable:
    return Unprocessable.field("body", "the file is empty", problem="empty-file")


def _first_record_end(data: bytes | bytearray) -> tuple[int | None, bool]:
    """Where the first CSV record's line break is, if seen, and whether a quote is open.

    Only ``"``, CR and LF matter, and in UTF-8 those bytes never occur inside a multi-byte
    character, so the bytes can be scanned before they are decoded.
    """
    quoted = False
    for match in _QUOTE_OR_NEWLINE.finditer(data):
        if match.group() == b'"':
            quoted = not quoted
        elif not quoted:
            return match.start(), False
    return None, quoted


def _header_problem(message: str) -> Unprocessable:
    return Unprocessable.field("header", message, problem="invalid-csv-header")


def _read_header(pieces: Iterator[bytes]) -> tuple[list[str], Iterator[bytes]]:
    """Parse the CSV header from the first piece(s); the pieces again, from the start."""
    buffer = bytearray()
    end: int | None = None
    quoted = False
    for piece in pieces:
        buffer += piece
        end, quoted = _first_record_end(buffer)
        if end is not None or len(buffer) > MAX_HEADER_BYTES:
            break
    head = bytes(buffer[:end] if end is not None else buffer)
    if head.startswith(UTF8_BOM):
        head = head[len(UTF8_BOM) :]
    if end is None:
        if not head:
            raise _empty_file()
        if quoted or len(buffer) > MAX_HEADER_BYTES:
            raise _header_problem(
                f"the first record does not end within {MAX_HEADER_BYTES} bytes "
                "(an unterminated quote?)"
            )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise _header_problem("the header is not valid UTF-8") from None
    try:
        columns = next(csv.reader([text], strict=True), [])
    except csv.Error as exc:
        raise _header_problem(f"the header is not valid CSV: {exc}") from None
    # Names are trimmed, as the worker trims them ("id, name" names "name").
    return [c.strip() for c in columns], itertools.chain([bytes(buffer)], pieces)


def _check_columns(target: str, columns: list[str]) -> None:
    """422 with one entry per unknown, missing or repeated column."""
    spec = TARGETS[target]
    unknown, missing, repeated = spec.check_header(columns)
    if not (unknown or missing or repeated):
        return
    known = ", ".join(spec.column_names)
    errors = [
        {"field": name, "message": f"unknown column for {target} (known: {known})"}
        for name in dict.fromkeys(unknown)
    ]
    errors += [{"field": name, "message": "required column is missing"} for name in missing]
    errors += [{"field": name, "message": "column appears more than once"} for name in repeated]
    parts = [
        f"{what}: {', '.join(repr(n) for n in names)}"
        for what, names in (
            ("unknown columns", list(dict.fromkeys(unknown))),
            ("missing required columns", missing),
            ("repeated columns", repeated),
        )
        if names
    ]
    raise Unprocessable(
        errors,
        "the CSV header does not fit " + target + ": " + "; ".join(parts),
        problem="invalid-csv-header",
    )


def _peek_first(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The pieces, after making sure there is at least one byte (422 when empty)."""
    for piece in pieces:
        if piece:
            return itertools.chain([piece], pieces)
    raise _empty_file()


# --- submitting ------------------------------------------------------------------------------


class ImportQuery(BaseModel):
    target: str
    max_errors: int | None = Field(None, ge=0, le=MAX_MAX_ERRORS)

    @field_validator("target")
    @classmethod
    def _known_target(cls, target: str) -> str:
        if target not in TARGETS:
            raise ValueError(f"must be one of: {', '.join(TARGETS)}")
        return target


def _discard_upload(upload_id: uuid.UUID) -> Callable[[Session], None]:
    """A callback removing the upload (row and large object) if it was committed."""

    def discard(session: Session) -> None:
        session.rollback()
        oid = session.execute(
            delete(Upload).where(Upload.id == upload_id).returning(Upload.oid)
        ).scalar_one_or_none()
        if oid is not None:
            storage.delete(session, oid)
        session.commit()

    return discard


@bp.post("")
@requires(TokenScope.WRITE)
def create_import() -> Response:
    """Store the uploaded file and queue its import; 202 with the job and Location."""
    q = query(ImportQuery)
    idempotency_key()  # a bad key is refused before the upload, not after it
    settings = conveyor().settings
    limit = settings.import_max_bytes
    max_errors = settings.import_max_errors if q.max_errors is None else q.max_errors
    session = db_session()
    try:
        incoming = _open_body(limit)
        if incoming.format == "csv":
            incoming.columns, incoming.pieces = _read_header(incoming.pieces)
            _check_columns(q.target, incoming.columns)
        else:
            incoming.pieces = _peek_first(incoming.pieces)
        # The large object is created in this transaction: a rollback leaves nothing.
        stored = storage.write_stream(
            session, incoming.pieces, limit, compression=settings.upload_compression
        )
    except storage.TooLarge:
        session.rollback()
        raise PayloadTooLarge(
            f"the file is larger than the limit of {limit} bytes (after decompression)",
            problem="upload-too-large",
            limit_bytes=limit,
        ) from None
    except BaseException:
        session.rollback()
        raise
    upload = Upload(
        id=uuid.uuid4(),
        oid=stored.oid,
        size_bytes=stored.size,
        sha256=stored.sha256,
        compression=stored.compression,
        content_type=incoming.content_type,
        filename=incoming.filename,
        owner=current_principal().token_id,
    )
    session.add(upload)
    session.flush()
    params = {
        "target": q.target,
        "format": incoming.format,
        "max_errors": max_errors,
        "sha256": stored.sha256,
        "size_bytes": stored.size,
    }
    header = {"columns": incoming.columns} if incoming.columns is not None else None

    def record_run(run_session: Session, job_id: uuid.UUID) -> None:
        run_session.add(
            ImportRun(
                job_id=job_id,
                upload_id=upload.id,
                target=q.target,
                format=incoming.format,
                max_errors=max_errors,
                size_bytes=stored.size,
                sha256=stored.sha256,
                header=header,
            )
        )

    return submit_and_respond(
        KIND,
        params,
        on_insert=record_run,
        on_discard=_discard_upload(upload.id),
        describe=_accepted_body,
    )


# --- reading the report ----------------------------------------------------------------------


def _run_and_filename(session: Session, job_id: uuid.UUID) -> tuple[ImportRun | None, str | None]:
    row = session.execute(
        select(ImportRun, Upload.filename)
        .outerjoin(Upload, Upload.id == ImportRun.upload_id)
        .where(ImportRun.job_id == job_id)
    ).one_or_none()
    if row is None:
        return None, None
    return row[0], row[1]


def run_fields(run: ImportRun, filename: str | None) -> dict[str, Any]:
    """The import's file, target and committed counters."""
    busy = run.busy_s or 0.0
    return {
        "target": run.target,
        "format": run.format,
        "max_errors": run.max_errors,
        "filename": filename,
        "size_bytes": run.size_bytes,
        "sha256": run.sha256,
        "columns": (run.header or {}).get("columns"),
        "rows_read": run.rows_read,
        "rows_inserted": run.rows_inserted,
        "rows_updated": run.rows_updated,
        "rows_unchanged": run.rows_unchanged,
        "rows_rejected": run.rows_rejected,
        "rows_duplicate": run.rows_duplicate,
        "chunks": run.chunks,
        "byte_offset": run.byte_offset,
        "line": run.line,
        "duration_s": round(busy, 3),
        "rows_per_s": round(run.rows_read / busy, 1) if busy > 0 else None,
    }


def _accepted_body(job: JobRecord) -> dict[str, Any]:
    """The job, with its import and a link to the import's report."""
    body = job_body(job)
    run, filename = _run_and_filename(db_session(), job.id)
    body["import"] = run_fields(run, filename) if run is not None else None
    body["links"]["import"] = import_url(job.id)
    return body


def _visible_import(raw_id: str) -> tuple[Job, ImportRun, str | None]:
    try:
        job_id = uuid.UUID(raw_id)
    except ValueError:
        raise BadRequest(f"{raw_id!r} is not an import id (a UUID)") from None
    session = db_session()
    job = jobs.get_job(session, job_id, owner=visible_owner(current_principal()))
    run, filename = _run_and_filename(session, job_id) if job is not None else (None, None)
    if job is None or job.kind != KIND or run is None:
        raise NotFound(f"no import {job_id}")
    return job, run, filename


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/<job_id>")
@requires(TokenScope.READ)
def get_import(job_id: str) -> Response:
    """An import's state, progress and summary (rows read, inserted, updated, rejected …)."""
    job, run, filename = _visible_import(job_id)
    body = job_body(job)
    del body["params"]  # the same facts, below
    if job.progress is not None:
        body["progress"] = {name: job.progress.get(name) for name in IMPORT_PROGRESS_FIELDS}
    body.update(run_fields(run, filename))
    body["links"] = {
        "self": import_url(job.id),
        "job": job_url(job.id),
        "errors": errors_url(job.id),
    }
    return _no_store(jsonify(body))


class ErrorPageQuery(BaseModel):
    page: int = Field(1, ge=1, le=MAX_PAGE)
    page_size: int = Field(50, ge=1, le=MAX_ERRORS_PAGE_SIZE)


def _escape_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _errors_csv(job_id: uuid.UUID) -> Iterator[str]:
    """Every rejected row as CSV, in line order, from a server-side cursor."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["line", "column", "reason", "excerpt"])
    # A fresh request session: the view's was closed when the view returned.
    result = db_session().execute(
        select(ImportError_.line, ImportError_.column, ImportError_.reason, ImportError_.excerpt)
        .where(ImportError_.job_id == job_id)
        .order_by(ImportError_.line, ImportError_.id)
        .execution_options(yield_per=1000)
    )
    try:
        for row in result:
            writer.writerow([_escape_cell(cell) for cell in row])
            if buffer.tell() >= CSV_FLUSH_BYTES:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    finally:
        result.close()
    yield buffer.getvalue()


@bp.get("/<job_id>/errors")
@requires(TokenScope.READ)
def list_errors(job_id: str) -> Response:
    """Rejected rows: a JSON page, or (``Accept: text/csv``) all of them as CSV."""
    job, _, _ = _visible_import(job_id)
    if request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv":
        response = Response(
            stream_with_context(_errors_csv(job.id)), mimetype="text/csv; charset=utf-8"
        )
        response.headers["Content-Disposition"] = (
            f'attachment; filename="import-{job.id}-errors.csv"'
        )
        response.headers["Vary"] = "Accept"
        return _no_store(response)

    q = query(ErrorPageQuery)
    session = db_session()
    condition = ImportError_.job_id == job.id
    total = session.scalar(select(func.count()).select_from(ImportError_).where(condition)) or 0
    rows = session.scalars(
        select(ImportError_)
        .where(condition)
        .order_by(ImportError_.line, ImportError_.id)
        .offset((q.page - 1) * q.page_size)
        .limit(q.page_size)
    ).all()

    def page_link(page: int) -> str:
        return link("imports.list_errors", job_id=str(job.id), page=page, page_size=q.page_size)

    items = [
        {"line": e.line, "column": e.column, "reason": e.reason, "excerpt": e.excerpt} for e in rows
    ]
    body = page_body(items, q.page, q.page_size, total, page_link)
    body["links"]["import"] = import_url(job.id)
    response = jsonify(body)
    response.headers["Vary"] = "Accept"
    return _no_store(response)
