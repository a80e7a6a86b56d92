"""The event store contract on SQLite, plus what only SQLite has: per-connection
pragmas, a file shared by processes, disk-full handling."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from berthd.domain.base import Meta
from berthd.events import (
    ConcurrencyConflict,
    EventStore,
    SQLiteEventStore,
    StoreUnavailable,
    open_store,
)
from tests.events_tests.contract import EventStoreContract, SharedStorageContract
from tests.events_tests.sample import REGISTRY, ThingCreated, ThingRenamed, meta

REPO = Path(__file__).resolve().parents[2]


class TestSQLiteStore(EventStoreContract, SharedStorageContract):
    @pytest.fixture(autouse=True)
    def _db_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "events.db"

    def new_store(self, registry: Mapping[str, type[Any]]) -> EventStore:
        return open_store(str(self.path), registry)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Any:
    store = SQLiteEventStore(tmp_path / "events.db", REGISTRY, Meta)
    yield store
    store.close()


def test_durability_pragmas_on_every_connection(sqlite_store: SQLiteEventStore) -> None:
    assert sqlite_store.pragmas() == {"synchronous": 2, "journal_mode": "wal"}  # 2 == FULL
    # Hold several connections at once so the pool has to create new ones.
    with contextlib.ExitStack() as stack:
        conns = [
            stack.enter_context(sqlite_store.datastore.get_connection(commit=False))
            for _ in range(4)
        ]
        assert len({id(c) for c in conns}) == 4
        for conn in conns:
            with conn.cursor() as cur:
                assert cur.execute("PRAGMA synchronous").fetchone()[0] == 2
                assert cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_url_forms(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = open_store(f"sqlite://{path}", REGISTRY)
    assert isinstance(store, SQLiteEventStore) and store.path == str(path)
    store.append("s1", 0, [ThingCreated(name="a")], meta())
    store.close()
    again = open_store(str(path), REGISTRY)
    assert [r.event for r in again.read_all()] == [ThingCreated(name="a")]
    again.close()
    for bad in ("sqlite://relative.db", ":memory:", "file::memory:", "mysql://x/y", ""):
        with pytest.raises(ValueError):
            open_store(bad, REGISTRY)


def test_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="does not exist"):
        open_store(str(tmp_path / "nope" / "events.db"), REGISTRY)


def test_unwritable_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "events.db").mkdir()  # a directory where the database file should be
    with pytest.raises(StoreUnavailable):
        open_store(str(tmp_path / "events.db"), REGISTRY)


def test_disk_full_leaves_nothing_half_written(tmp_path: Path) -> None:
    # max_page_count caps the database file as a full disk would (SQLITE_FULL).
    store = SQLiteEventStore(
        tmp_path / "events.db", REGISTRY, Meta, pragmas=("PRAGMA max_page_count=16",)
    )
    try:
        first = store.append("s1", 0, [ThingCreated(name="a")], meta())
        big = [ThingRenamed(name="x" * 4000) for _ in range(40)]
        with pytest.raises(StoreUnavailable, match="full"):
            store.append("s1", 1, big, meta())
        assert store.read_stream("s1") == first
        assert store.head() == first[-1].position
        more = store.append("s1", 1, [ThingRenamed(name="b")], meta())  # still usable
        assert [r.version for r in store.read_stream("s1")] == [1, 2]
        assert more[0].position == first[-1].position + 1
    finally:
        store.close()


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from berthd.domain.base import Meta
    from berthd.events import ConcurrencyConflict, open_store
    from tests.events_tests.sample import REGISTRY, ThingRenamed, meta

    path, go, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_store(path, REGISTRY)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    version = conflicts = 0
    done = 0
    while done < count:
        try:
            store.append("hot", version, [ThingRenamed(name=f"child-{done}")], meta())
            version += 1
            done += 1
        except ConcurrencyConflict:
            conflicts += 1
            version = store.read_stream("hot")[-1].version
    store.close()
    print("conflicts", conflicts, flush=True)
    """
)


def test_two_processes_append_to_one_stream(tmp_path: Path) -> None:
    """A real second process on the same file: every append lands exactly once, versions
    stay contiguous, positions stay unique and ordered."""
    path, go, count = tmp_path / "events.db", tmp_path / "go", 150
    store = SQLiteEventStore(path, REGISTRY, Meta)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(go), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        seen_from_child = threading.Event()

        def watch() -> None:  # the parent's waiter must notice the child's appends
            if store.wait_for_append(0, timeout=20):
                seen_from_child.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        go.touch()
        version = done = 0
        while done < count:
            try:
                store.append("hot", version, [ThingRenamed(name=f"parent-{done}")], meta())
                version += 1
                done += 1
            except ConcurrencyConflict:
                version = store.read_stream("hot")[-1].version
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0, out
        watcher.join(timeout=20)
        assert seen_from_child.is_set()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    stream = store.read_stream("hot")
    assert [r.version for r in stream] == list(range(1, 2 * count + 1))
    names = [r.event.name for r in stream]
    assert sorted(names) == sorted(
        [f"parent-{i}" for i in range(count)] + [f"child-{i}" for i in range(count)]
    )
    for who in ("parent", "child"):  # each writer's own events stay in its order
        mine = [int(n.split("-")[1]) for n in names if n.startswith(who)]
        assert mine == list(range(count))
    positions = [r.position for r in store.read_all(limit=10_000)]
    assert positions == list(range(1, 2 * count + 1))  # rowids: gap-free, in commit order
    store.close()


def test_append_throughput_smoke(sqlite_store: SQLiteEventStore) -> None:
    """Not a benchmark (see the report): catches an accidental fsync storm or lock
    convoy that would make appends orders of magnitude slower."""
    started = time.monotonic()
    for version in range(200):
        sqlite_store.append("s1", version, [ThingRenamed(name=str(version))], meta())
    assert time.monotonic() - started < 10
