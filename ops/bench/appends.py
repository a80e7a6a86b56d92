"""Benchmark 1 of issue 5: durable appends.

Events per second acknowledged durably (SQLite WAL with ``synchronous=FULL``; PostgreSQL
with the server's ``synchronous_commit``), by 1 and by 64 concurrent writer threads, each
append one event to the writer's own stream, for:

- the anchor: eventsourcing's plain one-save-per-event path, an eventsourcing
  application recorder called the plain way, ``recorder.insert_events([one event])``
  per event, with the same pragmas and pool sizes;
- berthd: ``EventStore.append(stream, expected_version, [event], meta)``, which adds
  the expected-version check and the encoding of the event and its metadata.

Both run in the same process, one right after the other, on fresh storage. The ratio is
the figure that counts; the absolute rates depend on the disk's fsync and the machine.

    .venv/bin/python -m ops.bench.appends            # SQLite (+ PostgreSQL if set)
    .venv/bin/python -m ops.bench.appends --quick    # a few seconds, for CI smoke
    BERTHD_TEST_POSTGRES=postgresql://u:p@127.0.0.1:5432/db \\
        .venv/bin/python -m ops.bench.appends --json appends.json

Target (issue 5): berthd >= 20,000 events/s at 64 writers on SQLite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgspec
import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
)
from psycopg.sql import SQL, Identifier

from berthd.domain.base import Event, Meta, registry_of
from berthd.events import EventStore, PostgresEventStore, SQLiteEventStore
from ops.bench._common import (
    Measured,
    combine,
    environment,
    format_table,
    run_writers,
    write_json,
)

TARGET_SQLITE_64 = 20_000.0
POOL_SIZE, MAX_OVERFLOW, LOCK_TIMEOUT = 5, 10, 10  # berthd's store defaults


class BenchRecorded(Event, frozen=True, kw_only=True):
    """The event every append writes: small, like most of berthd's."""

    kind: ClassVar[str] = "bench"

    n: int
    note: str


REGISTRY = registry_of(BenchRecorded)
NOTE = "container a1b2c3d4e5f6 started: exit code 0, 12 ms"
META = Meta(
    timestamp="2026-11-22T10:00:00.000000Z",
    node_id="bench",
    principal="key_bench",
    correlation_id="corr-bench",
)
_ENCODER = msgspec.json.Encoder()


def anchor_state(n: int) -> bytes:
    """The same JSON envelope berthd stores, encoded per event as an application would."""
    return _ENCODER.encode({"kind": "bench", "meta": META, "data": BenchRecorded(n=n, note=NOTE)})


@dataclass
class Side:
    """One side of a comparison, open: a writer per thread index, and counters."""

    make_writer: Callable[[int], Callable[[int], None]]
    stats: Callable[[], dict[str, Any]] = field(default=lambda: {})


def _batch_stats(store: Any) -> Callable[[], dict[str, Any]]:
    """Group commit counters of a berthd store (warm-up included), read at the end."""

    def stats() -> dict[str, Any]:
        if not hasattr(store, "commit_stats"):  # a berthd from before group commit
            return {}
        counts: dict[str, int] = store.commit_stats()
        return {"batches": counts["batches"], "appends": counts["appends"]}

    return stats


# --------------------------------------------------------------------- SQLite ------


class _FullSyncPool(SQLiteConnectionPool):
    """eventsourcing's pool with ``synchronous=FULL`` on each connection (the library's
    default under WAL is NORMAL, which is not durable on power loss)."""

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        conn.cursor().execute("PRAGMA synchronous=FULL")
        return conn


class _AnchorSQLiteDatastore(SQLiteDatastore):
    def __init__(self, path: str) -> None:
        super().__init__(path, originator_id_type="text")
        self.pool.close()
        self.pool = _FullSyncPool(
            db_name=path,
            lock_timeout=LOCK_TIMEOUT,
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            pool_timeout=2.0 * LOCK_TIMEOUT,
        )


@contextlib.contextmanager
def sqlite_anchor(directory: Path) -> Iterator[Side]:
    datastore = _AnchorSQLiteDatastore(str(directory / f"anchor-{uuid.uuid4().hex}.db"))
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    with datastore.transaction(commit=False) as c:
        c.execute("PRAGMA synchronous")
        assert c.fetchone()[0] == 2, "the anchor must run with synchronous=FULL"
    try:
        yield Side(lambda i: _recorder_writer(recorder, f"w{i}"))
    finally:
        datastore.close()


@contextlib.contextmanager
def sqlite_berthd(directory: Path) -> Iterator[Side]:
    store = SQLiteEventStore(directory / f"berthd-{uuid.uuid4().hex}.db", REGISTRY, Meta)
    assert store.pragmas() == {"synchronous": 2, "journal_mode": "wal"}
    try:
        yield Side(lambda i: _store_writer(store, f"w{i}"), _batch_stats(store))
    finally:
        store.close()


# ----------------------------------------------------------------- PostgreSQL ------


@contextlib.contextmanager
def _fresh_schema(url: str) -> Iterator[str]:
    schema = f"berthd_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SQL("CREATE SCHEMA {}").format(Identifier(schema)))
    try:
        yield schema
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))


@contextlib.contextmanager
def postgres_anchor(url: str) -> Iterator[Side]:
    info = psycopg.conninfo.conninfo_to_dict(url)
    with _fresh_schema(url) as schema:
        datastore = PostgresDatastore(
            dbname=str(info["dbname"]),
            host=str(info.get("host", "127.0.0.1")),
            port=int(info.get("port") or 5432),
            user=str(info.get("user", "")),
            password=str(info.get("password", "")),
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            lock_timeout=LOCK_TIMEOUT,
            schema=schema,
            originator_id_type="text",
        )
        try:
            recorder = PostgresApplicationRecorder(datastore)
            recorder.create_table()
            yield Side(lambda i: _recorder_writer(recorder, f"w{i}"))
        finally:
            datastore.close()


@contextlib.contextmanager
def postgres_berthd(url: str) -> Iterator[Side]:
    with _fresh_schema(url) as schema:
        separator = "&" if "?" in url else "?"
        store = PostgresEventStore.from_url(f"{url}{separator}schema={schema}", REGISTRY, Meta)
        try:
            yield Side(lambda i: _store_writer(store, f"w{i}"), _batch_stats(store))
        finally:
            store.close()


# -------------------------------------------------------------------- writers ------


def _recorder_writer(recorder: Any, stream: str) -> Callable[[int], None]:
    def op(n: int) -> None:
        recorder.insert_events([StoredEvent(stream, n, "BenchRecorded", anchor_state(n))])

    return op


def _store_writer(store: EventStore, stream: str) -> Callable[[int], None]:
    def op(n: int) -> None:
        store.append(stream, n - 1, [BenchRecorded(n=n, note=NOTE)], META)

    return op


# ----------------------------------------------------------------------- main ------


def _derive(m: Measured) -> None:
    """Per-event figures from the totals ``combine`` added up."""
    x = m.extra
    if x.get("batches"):
        x["mean_batch"] = round(x["appends"] / x["batches"], 1)
    if m.ops:
        x["cpu_us_per_event"] = round(x.get("cpu_s", 0.0) / m.ops * 1e6, 1)
        if "thread_cpu_s" in x:
            x["writer_thread_cpu_us_per_event"] = round(x["thread_cpu_s"] / m.ops * 1e6, 1)
    x["cpu_utilisation"] = round(x.get("cpu_s", 0.0) / m.seconds, 2) if m.seconds else 0.0


def _ms(m: Measured) -> str:
    return f"{m.p50_ms:.2f} / {m.p95_ms:.2f} / {m.p99_ms:.2f}"


def sqlite_commit_latency(directory: Path, commits: int = 200) -> dict[str, float]:
    """What one durable commit costs on this disk right now: p50/p90 ms of
    ``BEGIN IMMEDIATE; INSERT one row; COMMIT`` in WAL with ``synchronous=FULL``, and
    the same with 32 rows. The rates above are bounded by it (shared disks vary a lot)."""
    import sqlite3
    import time

    path = directory / f"probe-{uuid.uuid4().hex}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    out: dict[str, float] = {}
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (k TEXT, v INTEGER, s BLOB, PRIMARY KEY (k, v))")
        state = anchor_state(1)
        for rows in (1, 32):
            times = []
            for n in range(commits):
                began = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                for i in range(rows):
                    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (f"r{rows}-{i}", n, state))
                conn.execute("COMMIT")
                times.append(time.perf_counter() - began)
            times.sort()
            out[f"commit_{rows}_p50_ms"] = round(times[len(times) // 2] * 1e3, 3)
            out[f"commit_{rows}_p90_ms"] = round(times[len(times) * 9 // 10] * 1e3, 3)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{path}{suffix}")
    return out


def _on_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype in ("tmpfs", "ramfs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.appends", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds in all (CI smoke)")
    parser.add_argument(
        "--seconds", type=float, help="measured seconds per side and cell (default 6; quick 0.4)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="alternate anchor and berthd this many times per cell (default 3; quick 1)",
    )
    parser.add_argument("--writers", default="1,64", help="comma-separated (default 1,64)")
    parser.add_argument(
        "--backends", default="sqlite,postgres", help="sqlite and/or postgres (default both)"
    )
    parser.add_argument(
        "--dir", type=Path, help="where the SQLite files go (default: a temporary directory)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)

    seconds = args.seconds or (0.4 if args.quick else 6.0)
    warmup = 0.1 if args.quick else 0.5
    args.rounds = max(1, args.rounds or (1 if args.quick else 3))
    writer_counts = [int(w) for w in args.writers.split(",") if w]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    pg_url = os.environ.get("BERTHD_TEST_POSTGRES", "")
    if "postgres" in backends and not pg_url:
        print("PostgreSQL skipped: BERTHD_TEST_POSTGRES is not set", file=sys.stderr)
        backends.remove("postgres")

    directory = args.dir or Path(tempfile.mkdtemp(prefix="berthd-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    if _on_tmpfs(directory.resolve()):
        print(f"warning: {directory} is on tmpfs: fsync costs nothing there", file=sys.stderr)
    disk_before = sqlite_commit_latency(directory, 50 if args.quick else 200)

    sides: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "sqlite": (lambda: sqlite_anchor(directory), lambda: sqlite_berthd(directory)),
        "postgres": (lambda: postgres_anchor(pg_url), lambda: postgres_berthd(pg_url)),
    }
    results: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    try:
        for backend in backends:
            anchor_side, berthd_side = sides[backend]
            for writers in writer_counts:
                rounds: dict[str, list[Measured]] = {"anchor": [], "berthd": []}
                order = [("anchor", anchor_side), ("berthd", berthd_side)]
                for n in range(args.rounds):  # alternate, so drift hits both sides alike
                    for label, side in order if n % 2 == 0 else order[::-1]:
                        with side() as opened:
                            m = run_writers(
                                f"{backend}-{label}-{writers}",
                                writers,
                                opened.make_writer,
                                seconds=seconds / args.rounds,
                                warmup=warmup,
                                thread_prefix="berthd-store-commit" if label == "berthd" else "",
                            )
                            m.extra.update(opened.stats())
                            rounds[label].append(m)
                anchor, ours = combine(rounds["anchor"]), combine(rounds["berthd"])
                _derive(anchor)
                _derive(ours)
                ratio = ours.rate / anchor.rate if anchor.rate else float("inf")
                results.append(
                    {
                        "backend": backend,
                        "writers": writers,
                        "anchor": anchor.as_json(),
                        "berthd": ours.as_json(),
                        "ratio": round(ratio, 2),
                    }
                )
                rows.append(
                    [
                        backend,
                        str(writers),
                        f"{anchor.rate:,.0f}",
                        f"{ours.rate:,.0f}",
                        f"{ratio:.2f}x",
                        _ms(anchor),
                        _ms(ours),
                        str(ours.extra.get("mean_batch", "")),
                    ]
                )
                print(
                    f"{backend:8} {writers:3} writers: anchor {anchor.rate:9,.0f}/s  "
                    f"berthd {ours.rate:9,.0f}/s  ratio {ratio:5.2f}x",
                    file=sys.stderr,
                )
        disk_after = sqlite_commit_latency(directory, 50 if args.quick else 200)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    print()
    print("Durable appends, events/s acknowledged (one event per append, own stream each)")
    print()
    print(
        format_table(
            [
                "store",
                "writers",
                "anchor ev/s",
                "berthd ev/s",
                "ratio",
                "anchor p50/p95/p99 ms",
                "berthd p50/p95/p99 ms",
                "berthd batch",
            ],
            rows,
        )
    )
    print()
    print("CPU per acknowledged event (process; berthd's writer thread), and CPUs busy")
    print()
    print(
        format_table(
            [
                "store",
                "writers",
                "anchor us",
                "berthd us",
                "berthd writer us",
                "anchor/berthd CPUs",
            ],
            [
                [
                    r["backend"],
                    str(r["writers"]),
                    f"{r['anchor']['extra'].get('cpu_us_per_event', 0):.1f}",
                    f"{r['berthd']['extra'].get('cpu_us_per_event', 0):.1f}",
                    f"{r['berthd']['extra'].get('writer_thread_cpu_us_per_event', 0):.1f}",
                    f"{r['anchor']['extra'].get('cpu_utilisation', 0):.2f} / "
                    f"{r['berthd']['extra'].get('cpu_utilisation', 0):.2f}",
                ]
                for r in results
            ],
        )
    )
    print()
    print(
        "SQLite durable commit on this disk, before / after the runs (p50 ms): "
        f"1 row {disk_before['commit_1_p50_ms']:.2f} / {disk_after['commit_1_p50_ms']:.2f}, "
        f"32 rows {disk_before['commit_32_p50_ms']:.2f} / {disk_after['commit_32_p50_ms']:.2f}"
    )
    target = next((r for r in results if r["backend"] == "sqlite" and r["writers"] == 64), None)
    met: bool | None = None
    if target is not None:
        met = target["berthd"]["rate"] >= TARGET_SQLITE_64
        print()
        print(
            f"target: >= {TARGET_SQLITE_64:,.0f} events/s at 64 writers on SQLite: "
            f"{target['berthd']['rate']:,.0f} -> {'met' if met else 'NOT met'}"
        )
    if args.json:
        write_json(
            args.json,
            {
                "name": "appends",
                "benchmark": "appends",
                "command": " ".join(
                    [Path(sys.executable).name, "-m", "ops.bench.appends", *sys.argv[1:]]
                ),
                "seconds_per_side": seconds,
                "rounds": args.rounds,
                "warmup_per_round": warmup,
                "environment": environment(),
                "disk": {"before": disk_before, "after": disk_after},
                "cells": results,
                # the shared interface of ops/bench (see ops/bench/run)
                "results": [
                    {"label": f"{r['backend']} {r['writers']} writers {side}", "unit": "events/s",
                     "value": r[side]["rate"]}
                    for r in results
                    for side in ("anchor", "berthd")
                ],
                "ratios": {f"{r['backend']}_{r['writers']}_writers": r["ratio"] for r in results},
                "summary": [
                    {"measure": f"{r['backend']}, {r['writers']} writers (events/s)",
                     "anchor": r["anchor"]["rate"], "berthd": r["berthd"]["rate"], "ratio": r["ratio"],
                     "target": f">= {TARGET_SQLITE_64:,.0f}"
                     if (r["backend"], r["writers"]) == ("sqlite", 64) else "",
                     "met": met if (r["backend"], r["writers"]) == ("sqlite", 64) else None}
                    for r in results
                ],
                "target": {"sqlite_64_writers": TARGET_SQLITE_64, "met": met},
            },
        )
    failed = any(r[side]["errors"] for r in results for side in ("anchor", "berthd"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
