"""A deterministic, realistic features CSV, streamed to a file.

The same ``seed`` always yields the same bytes, and a file of N rows is the first N rows
of every longer file with that seed (one random stream, consumed row by row), so a 1M
benchmark can run on the prefix of a 10M file. Files are cached under
``.conveyor/bench/`` keyed by generator version, rows and seed.

What makes it realistic rather than uniform: names of varying length, some with commas
and double quotes (RFC 4180 quoting); descriptions empty about 30 % of the time, long
(a few hundred characters, sometimes several paragraphs, i.e. newlines inside a quoted
field) about 3 %; a few non-ASCII characters; ``complexity_points`` empty about 10 %,
``created_at`` empty about 20 %.

``python -m bench.datagen --rows 1000 --out -`` prints a sample.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

# Bump when the output changes, so cached files from an older generator are not reused.
VERSION = 1
HEADER = ("external_id", "name", "description", "status", "complexity_points", "created_at")
STATUSES = ("planned", "in_progress", "testing", "done", "cancelled")
# Skewed like a real backlog: most work is planned or done.
STATUS_WEIGHTS = (30, 15, 10, 40, 5)
DEFAULT_SEED = 20240601
CACHE_DIR = Path(".conveyor/bench")

_WORD_LIST = (
    "account admin alert api archive audit backup batch billing build cache calendar cart "
    "catalog checkout cleanup client cluster config console cookie coupon cron dashboard "
    "data deploy digest discount domain draft email endpoint event export feed filter "
    "flag form gateway graph health history hook import index invoice job key label "
    "layout ledger limit list locale lock log login market merge message metric migration "
    "mobile module monitor notify oauth order page partner payment permission pipeline "
    "plan policy portal preview pricing profile proxy queue quota rate receipt refund "
    "region release report request retry review role rollout route schedule schema search "
    "secret session settings shipping signup sitemap snapshot sso stock storage stream "
    "subscription support sync tax team template tenant theme ticket timeline token trace "
    "tracking translation upload user vault vendor webhook widget workflow workspace"
)
_VERB_LIST = (
    "Add Allow Support Improve Fix Refactor Remove Migrate Show Hide Export Import "
    "Validate Cache Retry Paginate Localize Audit Rename Split Merge Limit Track"
)
_WORDS = tuple(_WORD_LIST.split())
_VERBS = tuple(_VERB_LIST.split())
_FLAVOUR = (
    "v2",
    "(beta)",
    "for EU customers",
    "— phase 2",
    "on mobile",
    "for admins",
    "behind a flag",
    "in the café app",
    "🚀",
    "for Zürich office",
)
_SENTENCE_TAILS = (
    "so that users stop filing tickets about it.",
    "as discussed in the planning meeting.",
    "because the current behaviour confuses new customers.",
    "without breaking the public API.",
    "and keep the old endpoint working until Q3.",
    "— see the design doc for the trade-offs.",
    "(the legacy job does this nightly, which is too late).",
    'which the customer called "the most annoying bug, ever".',
)
_EPOCH_START = int(datetime(2019, 1, 1, tzinfo=UTC).timestamp())
_EPOCH_SPAN = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()) - _EPOCH_START


def cached_path(rows: int, seed: int = DEFAULT_SEED, cache_dir: Path = CACHE_DIR) -> Path:
    """Where the file for (rows, seed) lives in the cache."""
    return cache_dir / f"features-v{VERSION}-{rows}-s{seed}.csv"


def _name(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(1, 6))
    name = f"{rng.choice(_VERBS)} {' '.join(words)}"
    roll = rng.random()
    if roll < 0.06:
        name = f"{name}, {rng.choice(_WORDS)} and {rng.choice(_WORDS)}"  # a comma: quoted
    elif roll < 0.09:
        name = f'{name} "{rng.choice(_WORDS)}"'  # embedded quotes: doubled when quoted
    elif roll < 0.15:
        name = f"{name} {rng.choice(_FLAVOUR)}"
    return name


def _sentence(rng: random.Random, tail: float = 1.0) -> str:
    words = " ".join(rng.choices(_WORDS, k=rng.randint(2, 7)))
    if rng.random() < tail:
        return f"{rng.choice(_VERBS)} {words} {rng.choice(_SENTENCE_TAILS)}"
    return f"{rng.choice(_VERBS)} {words}."


def _description(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.30:
        return ""
    if roll < 0.97:
        return _sentence(rng, tail=0.25)
    # Long: a few hundred characters; some in paragraphs (newlines inside a quoted field).
    sentences = [_sentence(rng) for _ in range(rng.randint(3, 6))]
    sep = "\n\n" if rng.random() < 0.3 else " "
    return sep.join(sentences)


def _created_at(rng: random.Random) -> str:
    if rng.random() < 0.20:
        return ""
    moment = datetime.fromtimestamp(_EPOCH_START + rng.randrange(_EPOCH_SPAN), tz=UTC)
    return moment.isoformat()  # 2021-03-04T05:06:07+00:00


def rows(count: int, seed: int = DEFAULT_SEED) -> Iterator[tuple[str, str, str, str, str, str]]:
    """The data rows (without header), deterministic for ``seed``."""
    rng = random.Random(seed)
    statuses = rng.choices  # bound once: this loop runs 10M times
    for n in range(1, count + 1):
        points = "" if rng.random() < 0.10 else str(rng.choice((0, 1, 2, 3, 5, 8, 13, 21, 40, 100)))
        if points and rng.random() < 0.2:
            points = str(rng.randint(0, 100))
        yield (
            f"FEAT-{n:07d}",
            _name(rng),
            _description(rng),
            statuses(STATUSES, STATUS_WEIGHTS)[0],
            points,
            _created_at(rng),
        )


def write_csv(out: io.TextIOBase, count: int, seed: int = DEFAULT_SEED) -> None:
    """Write header and ``count`` rows to ``out`` (a text stream opened with newline='')."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    batch: list[tuple[str, ...]] = []
    for row in rows(count, seed):
        batch.append(row)
        if len(batch) == 10_000:
            writer.writerows(batch)
            batch.clear()
    writer.writerows(batch)


def ensure_file(
    count: int, seed: int = DEFAULT_SEED, cache_dir: Path = CACHE_DIR, *, quiet: bool = False
) -> Path:
    """The cached CSV for (count, seed), generated first if missing."""
    path = cached_path(count, seed, cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    started = time.monotonic()
    if not quiet:
        print(f"generating {count:,} rows → {path} ...", flush=True)
    with tmp.open("w", encoding="utf-8", newline="", buffering=1 << 20) as f:
        write_csv(f, count, seed)  # type: ignore[arg-type]
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cached file
    if not quiet:
        size = path.stat().st_size
        print(
            f"generated {size / 1e6:,.0f} MB in {time.monotonic() - started:.1f} s",
            flush=True,
        )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.datagen", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", help="a path, or - for stdout (default: the cache)")
    args = parser.parse_args(argv)
    if args.out == "-":
        out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
        write_csv(out, args.rows, args.seed)
        out.flush()
    elif args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            write_csv(f, args.rows, args.seed)
    else:
        print(ensure_file(args.rows, args.seed))


if __name__ == "__main__":
    main()
