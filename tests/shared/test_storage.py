"""Uploaded files in large objects: round trips, resuming at an offset, a stalled client."""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Iterator

import psycopg2
import pytest
import sqlalchemy as sa

from shared import storage
from shared.db import Database

# Lines of different lengths, some non-ASCII: offsets must count bytes of the file.
DATA = b"".join(f"{i},name {i} \u00e9\u00e8 {'x' * (i % 97)}\n".encode() for i in range(40_000))


def _objects(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(sa.text("SELECT count(*) FROM pg_largeobject_metadata")) or 0)


def _object_bytes(db: Database, oid: int) -> int:
    with db.session() as s:
        return int(s.scalar(sa.text("SELECT length(lo_get(:oid))"), {"oid": oid}) or 0)


@pytest.mark.parametrize("compression", ["gzip", "identity"])
def test_a_file_reads_back_whole_and_from_any_offset(
    db: Database, compression: storage.Compression
) -> None:
    pieces = [DATA[i : i + 65_536] for i in range(0, len(DATA), 65_536)]
    with db.session() as s:
        stored = storage.write_stream(s, pieces, 1 << 30, compression=compression)
        s.commit()
    assert (stored.size, stored.sha256) == (len(DATA), hashlib.sha256(DATA).hexdigest())
    assert stored.compression == compression
    kept = _object_bytes(db, stored.oid)
    if compression == "gzip":
        assert kept < len(DATA) // 2  # compressed
    else:
        assert kept == len(DATA)
    engine = db.engine
    for offset in (0, 1, 65_535, 65_536, len(DATA) // 2 + 7, len(DATA) - 1, len(DATA)):
        with storage.reading(engine, stored.oid, offset, compression) as stream:
            first_line = stream.readline(1 << 20)
            rest = stream.read()
        assert first_line + rest == DATA[offset:], offset
    with db.session() as s:
        storage.delete(s, stored.oid)
        s.commit()


@pytest.mark.parametrize("compression", ["gzip", "identity"])
def test_a_long_read_renews_its_transaction_and_loses_no_byte(
    db: Database, compression: storage.Compression, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader reopens the object in a new transaction as it goes (here before every
    read) so its snapshot never holds back pruning; the bytes come out the same."""
    # Incompressible bytes too, so even the gzip object spans several reads of a MiB.
    data = DATA + random.Random(7).randbytes(5 << 20)
    with db.session() as s:
        stored = storage.write_stream(s, [data], 1 << 30, compression=compression)
        s.commit()
    monkeypatch.setattr(storage.LargeObjectReader, "REOPEN_EVERY_S", 0.0)
    starts: set[object] = set()
    got = bytearray()
    with storage.reading(db.engine, stored.oid, 12_345, compression) as stream:
        while piece := stream.read(700_001):
            got += piece
            with db.session() as other:  # the reader's own transaction, seen from outside
                starts |= set(
                    other.scalars(
                        sa.text(
                            "SELECT xact_start FROM pg_stat_activity WHERE pid <> "
                            "pg_backend_pid() AND datname = current_database() AND "
                            "state = 'idle in transaction'"
                        )
                    )
                )
    assert bytes(got) == data[12_345:]
    assert len(starts) > 3  # a new transaction, again and again
    with db.session() as s:
        storage.delete(s, stored.oid)
        s.commit()


def test_an_oversized_upload_leaves_nothing(db: Database) -> None:
    before = _objects(db)
    with pytest.raises(storage.TooLarge), db.session() as s:
        storage.write_stream(s, [DATA, DATA], len(DATA) + 10)
    assert _objects(db) == before


def test_a_stalled_upload_is_ended_by_the_server(db: Database) -> None:
    def stalling() -> Iterator[bytes]:
        yield b"first piece\n"
        time.sleep(2.5)  # longer than the idle timeout below
        yield b"second piece\n"

    before = _objects(db)
    # The server ends the session: the write fails (and so does the rollback after it).
    with pytest.raises((psycopg2.Error, sa.exc.DBAPIError)), db.session() as s:
        storage.write_stream(s, stalling(), 1 << 20, idle_timeout_s=1)
    assert _objects(db) == before


def test_a_failed_write_stops_the_upload_and_surfaces(db: Database) -> None:
    """Pieces are compressed and written in threads of their own: a write that fails there
    (here: the session's server process is terminated) reaches the caller, and the rest
    of the body is not read."""
    sent = 0

    def pieces(backend: int) -> Iterator[bytes]:
        nonlocal sent
        for i in range(10_000):
            if i == 3:
                with db.session() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": backend})
                    other.commit()
            sent += 1
            yield DATA[:65_536]

    before = _objects(db)
    s = db.sessionmaker()
    backend = int(s.scalar(sa.text("SELECT pg_backend_pid()")) or 0)
    with pytest.raises((psycopg2.Error, sa.exc.DBAPIError)):
        storage.write_stream(s, pieces(backend), 1 << 40, compression="identity")
    with contextlib.suppress(psycopg2.Error, sa.exc.DBAPIError):
        s.close()  # its connection is gone
    assert 3 < sent < 10_000
    assert _objects(db) == before
