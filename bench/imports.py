"""The bulk-import benchmark (issue 3): how close Conveyor's import comes to ``COPY``.

Measured in one run, on the same PostgreSQL, from the same generated CSV:

(a) ``psql \\copy`` of the whole file into an empty copy of ``features``: the limit;
(b) the seed's "GOOD" path, SQLAlchemy ``bulk_insert_mappings`` with a commit every 1000
    rows, as the seed writes it and with ``render_nulls=True``;
(c) Conveyor end to end: a streaming HTTP upload to the web server, then real Celery worker
    processes, from the first byte sent to the job's ``SUCCESS``.

Every method starts from an empty table after a ``CHECKPOINT`` (so one method's dirty
pages are not flushed on the next one's clock) with the file in the page cache, and is
checked afterwards for exactly N rows. Results go to ``.conveyor/bench/import-<rows>.json``.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from bench import datagen
from bench.processes import Child, RssSampler, child_env, wait_http_ok, wait_log
from bench.services import BenchServices, bench_services, psql_binary
from shared.cli import web_command, worker_command
from shared.models import Feature, TokenScope
from shared.tokens import create_token

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".conveyor" / "bench"
COLUMNS = datagen.HEADER
ORM_BATCH = 1000  # the seed commits every 1000 rows
# (b) is slow (the seed's path ran at ~12k rows/s); past this many rows it runs on this
# prefix of the file and its rate stands in for the whole (labelled so in the table).
DEFAULT_B_ROWS = 1_000_000
POLL_S = 0.2
TARGET_C_OVER_A = 0.8
TARGET_C_OVER_B = 3.0
TARGET_RSS_MB = 200.0
TARGET_RSS_GROWTH = 0.10

# Wide enough for the tables when piped to a file or pasted into a closing note.
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Result:
    key: str  # "a", "b_plain", "b_render_nulls", "c_2x1", ...
    label: str
    rows: int
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --- helpers ---------------------------------------------------------------------------------


def _engine(services: BenchServices) -> Engine:
    return create_engine(services.database_url, pool_size=2, max_overflow=0)


def _checkpoint(engine: Engine) -> None:
    """Flush dirty pages now, so the next method does not pay for the previous one's."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        try:
            conn.execute(text("CHECKPOINT"))
        except Exception as exc:  # not a superuser on a managed server: measure anyway
            console.print(f"[yellow]CHECKPOINT refused ({type(exc).__name__}); continuing")


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def _verify(engine: Engine, table: str, expected: int, what: str) -> None:
    got = _count(engine, table)
    if got != expected:
        raise RuntimeError(f"{what}: {table} holds {got:,} rows, expected exactly {expected:,}")


def _reset_features(engine: Engine) -> None:
    """Empty ``features`` and everything an import leaves (jobs, uploads, large objects)."""
    with engine.begin() as conn:
        # This database is the benchmark's own: every large object in it is an upload of ours.
        conn.execute(text("SELECT lo_unlink(oid) FROM pg_largeobject_metadata"))
        conn.execute(
            text(
                "TRUNCATE features, import_errors, imports, uploads, jobs, api_tokens "
                "RESTART IDENTITY CASCADE"
            )
        )


def _warm(path: Path) -> None:
    """Read the file once so every method finds it in the page cache, not just the later ones."""
    with path.open("rb") as f:
        while f.read(8 << 20):
            pass


def _index_defs(engine: Engine, table: str) -> list[str]:
    """The table's index definitions without index and table names, to compare two tables."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table}
        ).scalars()
        return sorted(re.sub(r"INDEX \S+ ON \S+ ", "INDEX ON ", r) for r in rows)


def _cpu_sampler(services: BenchServices, **extra: Callable[[], list[int]]) -> RssSampler:
    """A sampler of CPU time: the bench database's backends (if local), plus ``extra``."""
    backends = services.backend_pids()
    return RssSampler({}, {**({"postgres": backends} if backends else {}), **extra})


# --- (a) psql \copy ------------------------------------------------------------------------------


def run_copy(path: Path, rows: int, services: BenchServices, engine: Engine) -> Result:
    """(a) ``psql \\copy`` of the whole file into an identical, empty table."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS features_copy"))
        # Same columns, defaults, check constraint and indexes (the primary key, the unique
        # external_id, (status, created_at DESC), created_at DESC): LIKE ... INCLUDING ALL.
        conn.execute(text("CREATE TABLE features_copy (LIKE features INCLUDING ALL)"))
        # COPY turns an empty CSV field into NULL and (before PostgreSQL 16's DEFAULT
        # option) cannot apply a column default instead, so the file's empty
        # complexity_points (≈10 %) and created_at (≈20 %) would violate NOT NULL. We drop
        # those two NOT NULLs on this table only: the same rows land, through the same
        # indexes, and COPY is spared the default expressions Conveyor has to evaluate,
        # which makes the baseline slightly faster than any honest import: a conservative
        # limit for c/a. (A BEFORE INSERT trigger filling the defaults would slow COPY down
        # and flatter c/a.)
        conn.execute(
            text(
                "ALTER TABLE features_copy ALTER COLUMN complexity_points DROP NOT NULL, "
                "ALTER COLUMN created_at DROP NOT NULL"
            )
        )
    same = _index_defs(engine, "features_copy") == _index_defs(engine, "features")
    if not same:
        raise RuntimeError("features_copy's indexes differ from features'")
    _checkpoint(engine)
    command = (
        f"\\copy features_copy({','.join(COLUMNS)}) FROM '{path}' WITH (FORMAT csv, HEADER true)"
    )
    argv = [psql_binary(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", services.libpq_url]
    psql: list[subprocess.Popen[bytes]] = []
    load = os.getloadavg()[0]
    with _cpu_sampler(services, psql=lambda: [p.pid for p in psql]) as sampler:
        started = time.perf_counter()
        psql.append(subprocess.Popen([*argv, "-c", command]))
        if psql[0].wait() != 0:
            raise RuntimeError(f"(a) psql \\copy failed (exit {psql[0].returncode})")
        seconds = time.perf_counter() - started
    _verify(engine, "features_copy", rows, "(a) psql \\copy")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE features_copy"))  # 10M rows are ~2 GB of disk
    cpu = sampler.cpu_seconds()
    return Result(
        "a",
        "(a) psql \\copy",
        rows,
        seconds,
        f"one transaction; CPU s: postgres {cpu.get('postgres', 0):.1f}",
        {"cpu_s": cpu, "load_1m": load},
    )


# --- (b) the seed's bulk_insert_mappings ------------------------------------------------------


def _records(path: Path, limit: int) -> Iterator[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        yield from itertools.islice(csv.DictReader(f), limit)


def run_orm(
    path: Path, rows: int, services: BenchServices, engine: Engine, *, render_nulls: bool
) -> Result:
    """(b) ``session.bulk_insert_mappings(Feature, batch)``, a commit every 1000 rows.

    The conversion is the minimal one a seed writes: empty description → None, an int for
    complexity_points (empty → 0), an ISO string → datetime (empty → None, i.e. the
    server default ``now()``). Without ``render_nulls`` SQLAlchemy leaves a None column
    out of the INSERT, so each batch is split wherever the set of None columns changes
    (that is the seed's slowness). With ``render_nulls=True`` None is sent as NULL, which
    the NOT NULL ``created_at`` refuses: that variant fills the default itself (``now()``
    of the batch, what the server default would have written).
    """
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE features RESTART IDENTITY CASCADE"))
    _checkpoint(engine)
    parse = datetime.fromisoformat
    load = os.getloadavg()[0]
    sampler = _cpu_sampler(services, python=lambda: [os.getpid()])
    started = time.perf_counter()
    written = 0
    with sampler, Session(engine) as session:
        batch: list[dict[str, Any]] = []
        now = datetime.now(UTC)
        for rec in _records(path, rows):
            created = rec["created_at"]
            batch.append(
                {
                    "external_id": rec["external_id"],
                    "name": rec["name"],
                    "description": rec["description"] or None,
                    "status": rec["status"],
                    "complexity_points": int(rec["complexity_points"] or 0),
                    "created_at": parse(created) if created else (now if render_nulls else None),
                }
            )
            if len(batch) == ORM_BATCH:
                session.bulk_insert_mappings(Feature, batch, render_nulls=render_nulls)
                session.commit()
                written += len(batch)
                batch = []
                now = datetime.now(UTC)
        if batch:
            session.bulk_insert_mappings(Feature, batch, render_nulls=render_nulls)
            session.commit()
            written += len(batch)
    seconds = time.perf_counter() - started
    key = "b_render_nulls" if render_nulls else "b_plain"
    label = "(b) bulk_insert_mappings" + (", render_nulls" if render_nulls else "")
    _verify(engine, "features", written, label)
    if written != rows:
        raise RuntimeError(f"{label}: wrote {written:,} rows, expected {rows:,}")
    cpu = sampler.cpu_seconds()
    return Result(
        key,
        label,
        rows,
        seconds,
        f"1000 rows/commit; CPU s: python {cpu['python']:.1f}, "
        f"postgres {cpu.get('postgres', 0):.1f}",
        {"cpu_s": cpu, "load_1m": load},
    )


# --- (c) Conveyor end to end --------------------------------------------------------------------


def _api(base: str, token: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def _upload(port: int, token: str, path: Path) -> tuple[dict[str, Any], float]:
    """POST the file as the raw body, streamed from disk in 1 MiB blocks; (job, seconds)."""
    size = path.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600, blocksize=1 << 20)
    started = time.perf_counter()
    try:
        with path.open("rb") as body:
            conn.request(
                "POST",
                "/api/v1/imports?target=features",
                body=body,  # a file object: http.client sends it block by block
                headers={
                    "Content-Type": "text/csv",
                    "Content-Length": str(size),
                    "Authorization": f"Bearer {token}",
                    "Idempotency-Key": f"bench-{uuid.uuid4()}",
                },
            )
            response = conn.getresponse()
            payload = response.read()
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    if response.status != 202:
        raise RuntimeError(f"upload answered {response.status}: {payload[:2000]!r}")
    job: dict[str, Any] = json.loads(payload)
    return job, seconds


def parse_layout(layout: str) -> tuple[int, int]:
    """``"2x1"`` → 2 worker processes (``celery worker``), each with concurrency 1."""
    procs, _, conc = layout.partition("x")
    return int(procs), int(conc or 1)


def run_conveyor(
    path: Path, rows: int, services: BenchServices, engine: Engine, layout: str, log_dir: Path
) -> Result:
    """(c) HTTP upload → job ``SUCCESS`` with web server and Celery worker processes."""
    procs, concurrency = parse_layout(layout)
    _reset_features(engine)
    settings = services.child_settings("import")
    state = settings.state_dir
    pepper = settings.secret("token_pepper")  # generated into state/ before any child reads it
    with Session(engine) as session:
        _, token = create_token(session, pepper, "bench", TokenScope.WRITE)
    env = child_env(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    web = Child("web", web_command(settings), env, log_dir / f"web-{layout}.log")
    workers = [
        Child(
            f"worker{i}",
            worker_command(
                settings,
                queues="imports",
                concurrency=concurrency,
                hostname=f"bench{i}-{uuid.uuid4().hex[:6]}@%h",
                extra=["--without-gossip", "--without-mingle"],
            ),
            env,
            log_dir / f"worker{i}-{layout}.log",
        )
        for i in range(procs)
    ]
    try:
        wait_http_ok(base + "/readyz", web)
        for worker in workers:
            wait_log(worker, b" ready.")
        _checkpoint(engine)
        timeline: list[tuple[float, str, Any]] = []
        backends = services.backend_pids()
        extra = {"postgres": backends} if backends else {}
        load = os.getloadavg()[0]
        with RssSampler({"web": [web], "worker": workers}, extra) as sampler:
            started = time.perf_counter()
            job, upload_s = _upload(settings.web_port, token, path)
            job_id = job["id"]
            deadline = time.monotonic() + max(900.0, rows / 2000)
            state_name = job.get("state", "PENDING")
            while True:
                body = _api(base, token, f"/api/v1/jobs/{job_id}")
                state_name = body["state"]
                progress = body.get("progress") or {}
                now = time.perf_counter() - started
                if not timeline or timeline[-1][1] != state_name or now - timeline[-1][0] > 5:
                    timeline.append((round(now, 2), state_name, progress.get("done")))
                if state_name in ("SUCCESS", "FAILURE", "REVOKED"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"(c) job {job_id} still {state_name} at the deadline")
                for child in (web, *workers):
                    if not child.alive():
                        raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
                time.sleep(POLL_S)
            seconds = time.perf_counter() - started
        if state_name != "SUCCESS":
            raise RuntimeError(f"(c) job ended {state_name}: {json.dumps(body)[:2000]}")
        summary = _api(base, token, f"/api/v1/imports/{job_id}")
    finally:
        for child in (web, *workers):
            child.stop()
        shutil.rmtree(state, ignore_errors=True)
    inserted = _find(summary, "rows_inserted")
    if inserted != rows:
        raise RuntimeError(f"(c) the summary says rows_inserted={inserted}, expected {rows:,}")
    _verify(engine, "features", rows, "(c) Conveyor")
    who = f"{procs} workers, -c {concurrency} each" if procs > 1 else f"1 worker, -c {concurrency}"
    label = f"(c) Conveyor, {who}"
    return Result(
        f"c_{layout}",
        label,
        rows,
        seconds,
        f"upload {upload_s:.1f} s, then {seconds - upload_s:.1f} s to SUCCESS",
        {
            "layout": layout,
            "upload_s": round(upload_s, 3),
            "process_s": round(seconds - upload_s, 3),
            "process_rows_per_s": round(rows / (seconds - upload_s)) if seconds > upload_s else 0,
            "upload_mb_per_s": round(path.stat().st_size / 1e6 / upload_s, 1),
            "rss": {name: peak.as_dict() for name, peak in sampler.peaks.items()},
            "rss_samples": sampler.samples,
            # CPU seconds per group over the run; against wall time and cores it shows who is busy.
            "cpu_s": sampler.cpu_seconds(),
            "wall_s": round(sampler.seconds, 2),
            "load_1m": load,
            "summary": summary,
            "timeline": timeline,
        },
    )


def _find(body: dict[str, Any], key: str) -> Any:
    """``key`` at the top of the import summary or one level down (e.g. under "summary")."""
    if key in body:
        return body[key]
    for value in body.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def conveyor_ready() -> tuple[bool, str]:
    missing = [p for p in ("worker/imports.py", "web/imports.py") if not (ROOT / p).exists()]
    return (not missing, ", ".join(missing))


# --- report -------------------------------------------------------------------------------------


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("[green]✓[/]" if ok else "[red]✗[/]")


def summarize(rows: int, results: list[Result], b_rows: int) -> dict[str, Any]:
    """Ratios and target checks for one file size."""
    by_key = {r.key: r for r in results}
    a = by_key.get("a")
    bs = [r for k, r in by_key.items() if k.startswith("b_")]
    cs = [r for k, r in by_key.items() if k.startswith("c_")]
    best_b = max(bs, key=lambda r: r.rate) if bs else None
    best_c = max(cs, key=lambda r: r.rate) if cs else None
    out: dict[str, Any] = {
        "rows": rows,
        "b_rows": b_rows,
        "best_b": best_b.key if best_b else None,
        "best_c": best_c.key if best_c else None,
        "per_c": {},
    }
    for c in cs:
        rss = c.extra["rss"]
        out["per_c"][c.key] = {
            "c_over_a": c.rate / a.rate if a else None,
            "c_over_b": c.rate / best_b.rate if best_b else None,
            "web_peak_process_mb": rss["web"]["peak_process_rss_mb"],
            "worker_peak_process_mb": rss["worker"]["peak_process_rss_mb"],
            "web_peak_child_mb": rss["web"].get("peak_child_rss_mb"),
            "worker_peak_child_mb": rss["worker"].get("peak_child_rss_mb"),
            "web_peak_tree_mb": rss["web"]["peak_tree_rss_mb"],
            "worker_peak_tree_mb": rss["worker"]["peak_tree_rss_mb"],
        }
    return out


def print_report(rows: int, results: list[Result], summary: dict[str, Any]) -> None:
    a = next((r for r in results if r.key == "a"), None)
    table = Table(title=f"Import benchmark: {rows:,} rows", title_justify="left")
    table.add_column("method")
    table.add_column("rows", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("rows/s", justify="right")
    table.add_column("vs (a)", justify="right")
    table.add_column("load", justify="right")  # 1-min load average when the method began
    table.add_column("notes")
    for r in results:
        vs = f"{r.rate / a.rate:.2f}" if a else "—"
        load = r.extra.get("load_1m")
        table.add_row(
            r.label,
            f"{r.rows:,}",
            f"{r.seconds:.1f}",
            f"{r.rate:,.0f}",
            vs,
            "—" if load is None else f"{load:.1f}",
            r.note,
        )
    console.print(table)

    per_c = summary["per_c"]
    if not per_c:
        return
    targets = Table(title="Targets (issue 3)", title_justify="left")
    targets.add_column("(c) layout")
    targets.add_column(f"c/a ≥ {TARGET_C_OVER_A}", justify="right")
    targets.add_column(f"c/b ≥ {TARGET_C_OVER_B:.0f} (b: {summary['best_b']})", justify="right")
    targets.add_column(f"web peak RSS < {TARGET_RSS_MB:.0f} MB", justify="right")
    targets.add_column(f"worker peak RSS < {TARGET_RSS_MB:.0f} MB", justify="right")
    targets.add_column("children web / worker (MB)", justify="right")
    targets.add_column("tree sums web / worker (MB)", justify="right")
    for key, s in per_c.items():
        ca, cb = s["c_over_a"], s["c_over_b"]
        targets.add_row(
            key.removeprefix("c_"),
            "—" if ca is None else f"{ca:.2f} {_mark(ca >= TARGET_C_OVER_A)}",
            "—" if cb is None else f"{cb:.2f} {_mark(cb >= TARGET_C_OVER_B)}",
            f"{s['web_peak_process_mb']:.0f} {_mark(s['web_peak_process_mb'] < TARGET_RSS_MB)}",
            f"{s['worker_peak_process_mb']:.0f} "
            f"{_mark(s['worker_peak_process_mb'] < TARGET_RSS_MB)}",
            f"{s['web_peak_child_mb'] or 0:.0f} / {s['worker_peak_child_mb'] or 0:.0f}",
            f"{s['web_peak_tree_mb']:.0f} / {s['worker_peak_tree_mb']:.0f}",
        )
    console.print(targets)
    cpus = os.cpu_count() or 1
    spent = Table(title="(c) where the time went", title_justify="left")
    for name in ("layout", "upload s", "upload MB/s", "after upload s", "rows/s after upload"):
        spent.add_column(name, justify="left" if name == "layout" else "right")
    for name in ("CPU s web", "CPU s workers", "CPU s postgres", f"CPU busy of {cpus}"):
        spent.add_column(name, justify="right")
    for r in results:
        if not r.key.startswith("c_"):
            continue
        x, cpu = r.extra, r.extra["cpu_s"]
        busy = sum(cpu.values()) / (x["wall_s"] * cpus) if x["wall_s"] else 0.0
        spent.add_row(
            x["layout"],
            f"{x['upload_s']:.1f}",
            f"{x['upload_mb_per_s']:.0f}",
            f"{x['process_s']:.1f}",
            f"{x['process_rows_per_s']:,}",
            f"{cpu.get('web', 0):.1f}",
            f"{cpu.get('worker', 0):.1f}",
            "—" if "postgres" not in cpu else f"{cpu['postgres']:.1f}",
            f"{busy:.0%}",
        )
    console.print(spent)
    console.print(
        "RSS: the targets use the largest single process (master or child); children are "
        "web server workers and Celery pool processes, which handle the data; tree sums count "
        "fork-shared pages once per process."
    )


GROWTH_METRICS = (
    ("web", "web_peak_process_mb", "largest process"),
    ("web", "web_peak_child_mb", "web server workers"),
    ("worker", "worker_peak_process_mb", "largest process"),
    ("worker", "worker_peak_child_mb", "pool processes + their children"),
)


def print_growth(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """RSS growth from the smallest to the largest size, per (c) layout present in both."""
    sizes = sorted(summaries)
    small, large = summaries[sizes[0]], summaries[sizes[-1]]
    growth: dict[str, Any] = {}
    table = Table(
        title=f"Peak RSS growth {sizes[0]:,} → {sizes[-1]:,} rows (target < "
        f"{TARGET_RSS_GROWTH:.0%})",
        title_justify="left",
    )
    for name in ("(c) layout", "side", "peak of", f"{sizes[0]:,} MB", f"{sizes[-1]:,} MB"):
        table.add_column(name, justify="right" if "MB" in name else "left")
    table.add_column("growth", justify="right")
    for key in large["per_c"]:
        if key not in small["per_c"]:
            continue
        s, g = small["per_c"][key], large["per_c"][key]
        growth[key] = {}
        for side, metric, what in GROWTH_METRICS:
            if not s.get(metric) or g.get(metric) is None:
                continue
            change = g[metric] / s[metric] - 1
            growth[key][metric] = change
            table.add_row(
                key.removeprefix("c_"),
                side,
                what,
                f"{s[metric]:.0f}",
                f"{g[metric]:.0f}",
                f"{change:+.1%} {_mark(change < TARGET_RSS_GROWTH)}",
            )
    console.print(table)
    return growth


def _machine(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        server = conn.execute(text("SHOW server_version")).scalar_one()
        sync = conn.execute(text("SHOW synchronous_commit")).scalar_one()
        shared_buffers = conn.execute(text("SHOW shared_buffers")).scalar_one()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": server,
        "synchronous_commit": sync,
        "shared_buffers": shared_buffers,
        "platform": platform.platform(),
    }


# --- entry --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rows",
        default="1000000",
        help="rows in the file; a comma list (1000000,10000000) runs each size and prints "
        "the RSS growth between the smallest and the largest (default 1000000)",
    )
    parser.add_argument("--seed", type=int, default=datagen.DEFAULT_SEED)
    parser.add_argument(
        "--layouts",
        help="(c) worker layouts as PROCESSESxCONCURRENCY, comma-separated; default "
        "'2x1,1x2' up to 2M rows, '2x1' above (one 10M run is enough)",
    )
    parser.add_argument(
        "--workers", type=int, help="shorthand for --layouts Nx1 (N worker processes, -c 1)"
    )
    parser.add_argument(
        "--b-rows",
        type=int,
        default=DEFAULT_B_ROWS,
        help="run (b) on at most this prefix of the file (default 1,000,000); its rows/s "
        "stands in for the whole file",
    )
    parser.add_argument(
        "--b-render-nulls-only",
        action="store_true",
        help="run only (b) with render_nulls=True, the faster variant the c/b target uses "
        "(plain (b) over 10M rows would take most of an hour)",
    )
    parser.add_argument("--skip-a", action="store_true", help="skip the psql \\copy baseline")
    parser.add_argument("--skip-b", "--skip-baseline-b", action="store_true", help="skip (b)")
    parser.add_argument("--skip-c", action="store_true", help="skip Conveyor end to end")
    parser.add_argument(
        "--keep-db", action="store_true", help="keep the conveyor_bench database afterwards"
    )


def run(args: argparse.Namespace) -> None:
    """Generate the files, then measure (a), (b) and (c) for each size in ``--rows``."""
    sizes = [int(s.replace("_", "")) for s in str(args.rows).split(",") if s.strip()]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = CACHE_DIR / "logs" / run_id
    # Generate first: a 10M file takes a couple of minutes and has nothing to measure.
    files = {n: datagen.ensure_file(n, args.seed, CACHE_DIR) for n in sizes}
    ready, missing = conveyor_ready()
    if not args.skip_c and not ready:
        console.print(f"[yellow](c) skipped: {missing} not there yet")
        args.skip_c = True
    summaries: dict[int, dict[str, Any]] = {}
    b_done: dict[tuple[int, bool], Result] = {}
    with bench_services(CACHE_DIR, keep_db=args.keep_db) as services:
        engine = _engine(services)
        machine = _machine(engine)
        console.print(
            f"services: {services.origin}; PostgreSQL {machine['postgresql']}, "
            f"{machine['cpus']} CPUs; logs in {log_dir}"
        )
        try:
            for rows in sizes:
                results = _run_size(args, rows, files[rows], services, engine, log_dir, b_done)
                summaries[rows] = summary = summarize(rows, results, min(rows, args.b_rows))
                print_report(rows, results, summary)
                out = CACHE_DIR / f"import-{rows}.json"
                report = {
                    "benchmark": "import",
                    "run": run_id,
                    "rows": rows,
                    "file": str(files[rows]),
                    "file_bytes": files[rows].stat().st_size,
                    "seed": args.seed,
                    "services": services.origin,
                    "machine": machine,
                    "results": [{**asdict(r), "rows_per_s": round(r.rate)} for r in results],
                    "summary": summary,
                    "targets": {
                        "c_over_a": TARGET_C_OVER_A,
                        "c_over_b": TARGET_C_OVER_B,
                        "rss_mb": TARGET_RSS_MB,
                        "rss_growth": TARGET_RSS_GROWTH,
                    },
                }
                out.write_text(json.dumps(report, indent=2, default=str))
                # The run's own copy: a later partial run (--skip-a ...) overwrites ``out``.
                log_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out, log_dir / out.name)
                console.print(f"results: {out}")
        finally:
            engine.dispose()
    if len(summaries) > 1 and any(s["per_c"] for s in summaries.values()):
        growth = print_growth(summaries)
        largest = CACHE_DIR / f"import-{max(summaries)}.json"
        data = json.loads(largest.read_text())
        data["rss_growth_from"] = {"rows": min(summaries), "growth": growth}
        largest.write_text(json.dumps(data, indent=2, default=str))
        shutil.copyfile(largest, log_dir / largest.name)


def _layouts(args: argparse.Namespace, rows: int) -> list[str]:
    if args.layouts:
        return [s.strip() for s in args.layouts.split(",") if s.strip()]
    if args.workers:
        return [f"{args.workers}x1"]
    return ["2x1", "1x2"] if rows <= 2_000_000 else ["2x1"]


def _run_size(
    args: argparse.Namespace,
    rows: int,
    path: Path,
    services: BenchServices,
    engine: Engine,
    log_dir: Path,
    b_done: dict[tuple[int, bool], Result],
) -> list[Result]:
    """Every method on one file; (b) on the same prefix is measured once per run."""
    b_rows = min(rows, args.b_rows)
    console.print(f"\n[bold]{rows:,} rows[/] from {path} ({path.stat().st_size / 1e6:,.0f} MB)")
    _warm(path)
    results: list[Result] = []

    def step(label: str) -> None:
        console.print(f"  {label} ...", end=" ")

    if not args.skip_a:
        step("(a) psql \\copy")
        results.append(run_copy(path, rows, services, engine))
        console.print(f"{results[-1].rate:,.0f} rows/s")
    if not args.skip_b:
        for render_nulls in (True,) if args.b_render_nulls_only else (False, True):
            step(f"(b) bulk_insert_mappings render_nulls={render_nulls} on {b_rows:,} rows")
            earlier = b_done.get((b_rows, render_nulls))
            if earlier is None:
                r = b_done[(b_rows, render_nulls)] = run_orm(
                    path, b_rows, services, engine, render_nulls=render_nulls
                )
            else:  # the files are prefixes of each other: the same rows, measured above
                r = replace(earlier, note=earlier.note + "; measured above, same rows")
            if b_rows < rows:
                r = replace(r, label=r.label + f" [{b_rows:,}-row prefix]")
            results.append(r)
            console.print(f"{r.rate:,.0f} rows/s" + (" (from above)" if earlier else ""))
    if not args.skip_c:
        for layout in _layouts(args, rows):
            step(f"(c) Conveyor {layout}")
            try:
                r = run_conveyor(path, rows, services, engine, layout, log_dir)
            except RuntimeError as exc:
                # A failed import is a result too: say so loudly, keep the other layouts.
                console.print(f"[red]FAILED[/]: {exc}\n  logs: {log_dir}")
                continue
            results.append(r)
            console.print(f"{r.rate:,.0f} rows/s ({r.note})")
    return results
