"""Uploaded files in PostgreSQL large objects: every worker host can read them, no shared disk.

A large object is created, written and unlinked inside a transaction, so a failed or
oversized upload rolled back leaves nothing stored. Reads stream in fixed-size pieces;
nothing here holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

READ_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small against any memory budget


class TooLarge(Exception):
    """The upload passed the size limit; the caller rolls back, which removes the object."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than {limit} bytes")
        self.limit = limit


def _dbapi(session: Session) -> Any:
    """The psycopg2 connection under the session's current transaction."""
    return session.connection().connection.dbapi_connection


def write_stream(
    session: Session, pieces: Iterable[bytes], limit: int, *, idle_timeout_s: int = 60
) -> tuple[int, int, str]:
    """Store ``pieces`` in a new large object; returns (oid, size, sha256 hex).

    Raises TooLarge as soon as more than ``limit`` bytes arrived. Runs in the session's
    transaction: commit to keep the object, roll back to drop it. The transaction stays
    open while the client sends; a client that stalls for ``idle_timeout_s`` between two
    pieces has its transaction ended by PostgreSQL (the write fails, nothing is kept)
    instead of holding a connection and an open transaction indefinitely.
    """
    session.execute(
        text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)"),
        {"ms": f"{idle_timeout_s * 1000}"},
    )
    lobj = _dbapi(session).lobject(0, "wb")
    digest = hashlib.sha256()
    size = 0
    try:
        for piece in pieces:
            if not piece:
                continue
            size += len(piece)
            if size > limit:
                raise TooLarge(limit)
            digest.update(piece)
            lobj.write(piece)
    finally:
        lobj.close()
    return int(lobj.oid), size, digest.hexdigest()


class LargeObjectReader(io.RawIOBase):
    """A read-only, seekable binary stream over a large object (wrap in BufferedReader).

    Each read is one ``lo_get(oid, offset, length)``: no large-object descriptor, so no
    transaction has to stay open while a worker streams a file and commits chunk after
    chunk on another connection. Give it an autocommit connection.
    """

    def __init__(self, conn: Connection, oid: int, size: int) -> None:
        self._conn = conn
        self._oid = oid
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._conn.exec_driver_sql(
            "SELECT lo_get(%(oid)s, %(offset)s, %(length)s)",
            {"oid": self._oid, "offset": self._pos, "length": want},
        ).scalar_one()
        data = bytes(data)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def open_reader(conn: Connection, oid: int, size: int, offset: int = 0) -> io.BufferedReader:
    """A buffered reader over the object, positioned at ``offset``."""
    raw = LargeObjectReader(conn, oid, size)
    raw.seek(offset)
    return io.BufferedReader(raw, buffer_size=READ_SIZE)


def delete(session: Session, oid: int) -> None:
    """Unlink the large object (in the session's transaction); a missing one is fine."""
    session.connection().exec_driver_sql(
        "SELECT lo_unlink(%(oid)s) FROM pg_largeobject_metadata WHERE oid = %(oid)s",
        {"oid": oid},
    )
