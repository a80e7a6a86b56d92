"""Group commit: the writer thread's batches on SQLite and PostgreSQL, and the
``GroupCommitter`` itself with a fake backend.

The backend tests make batches deterministic by holding the log's write lock from
outside (a SQLite ``BEGIN IMMEDIATE``, PostgreSQL's table lock): the writer thread blocks
in its transaction for a first append, the appends under test queue up behind it, and
they are all in the next batch once the lock is released.
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.sql import SQL, Composed, Identifier

from berthd.domain.base import Meta
from berthd.events import (
    ConcurrencyConflict,
    EventStore,
    PostgresEventStore,
    Recorded,
    SQLiteEventStore,
    StoreUnavailable,
    backends,
    open_store,
)
from berthd.events._group_commit import GroupCommitter, Outcome, PendingAppend, Release, plan
from tests.events_tests.sample import REGISTRY, ThingCreated, ThingRenamed, meta


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


class Call:
    """``store.append`` on a thread of its own; ``result()`` returns or raises."""

    def __init__(self, store: EventStore, stream: str, expected: int, name: str) -> None:
        self._value: list[Recorded] | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = store.append(stream, expected, [ThingRenamed(name=name)], meta())
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 15.0) -> list[Recorded]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "append did not return"
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def error(self) -> BaseException:
        with pytest.raises(Exception) as info:
            self.result()
        return info.value


def committer_of(store: EventStore) -> GroupCommitter:
    committer = store._committer  # type: ignore[attr-defined]
    assert isinstance(committer, GroupCommitter)
    return committer


class GroupCommitContract(abc.ABC):
    """What group commit must do on every backend that has it."""

    @abc.abstractmethod
    def open(self) -> EventStore:
        """A store on this test's storage (closed by the test's teardown)."""

    @abc.abstractmethod
    def hold_writes(self) -> contextlib.AbstractContextManager[None]:
        """Hold the log's write lock from outside the store while the block runs."""

    @abc.abstractmethod
    def poison(self, stream_id: str) -> None:
        """From now on, inserting an event of ``stream_id`` fails with a database
        error (not a key violation) whose message contains ``poison_message``."""

    poison_message: str

    @pytest.fixture
    def store(self) -> Iterator[EventStore]:
        store = self.open()
        yield store
        store.close()

    @contextlib.contextmanager
    def one_batch(self, store: EventStore) -> Iterator[Callable[[int], None]]:
        """While the block runs, the writer is stuck on a first append (stream
        ``blocker``); appends started in the block queue behind it, and the block's
        ``queued(n)`` waits until n of them are queued. On exit they are all released
        together, into one batch."""
        committer = committer_of(store)
        taken = committer.taken
        with self.hold_writes():
            blocker = Call(store, "blocker", 0, "blocker")
            wait_until(lambda: committer.taken == taken + 1, "the writer took the blocker")

            def queued(n: int) -> None:
                wait_until(lambda: len(committer._queue) == n, f"{n} appends are queued")

            yield queued
        blocker.result()

    def test_a_conflicting_append_fails_alone_in_its_batch(self, store: EventStore) -> None:
        store.append("s", 0, [ThingCreated(name="s")], meta())
        before = store.commit_stats()  # type: ignore[attr-defined]
        with self.one_batch(store) as queued:
            calls = [Call(store, f"n{i}", 0, f"n{i}") for i in range(3)]
            queued(3)
            stale = Call(store, "s", 0, "stale")  # s is at version 1
            queued(4)
            calls += [Call(store, f"n{i}", 0, f"n{i}") for i in range(3, 6)]
            queued(7)
        error = stale.error()
        assert isinstance(error, ConcurrencyConflict)
        assert (error.stream_id, error.expected_version) == ("s", 0)
        results = [call.result() for call in calls]
        after = store.commit_stats()  # type: ignore[attr-defined]
        assert after["batches"] - before["batches"] == 2  # the blocker's, then ours
        assert after["appends"] - before["appends"] == 8
        assert [r[0].stream_id for r in results] == [f"n{i}" for i in range(6)]
        positions = [r[0].position for r in results]
        assert positions == sorted(positions)  # in the order they were queued
        assert [r.event.name for r in store.read_stream("s")] == ["s"]
        assert store.read_all(after=positions[0] - 1) == [r[0] for r in results]

    def test_appends_to_one_stream_in_one_batch(self, store: EventStore) -> None:
        """Versions of appends accepted earlier in the same batch count."""
        with self.one_batch(store) as queued:
            first = Call(store, "s", 0, "a")
            queued(1)
            second = Call(store, "s", 1, "b")  # expects the batch's own first append
            queued(2)
            duplicate = Call(store, "s", 1, "dup")  # so does this one, too late
            queued(3)
            gap = Call(store, "s", 3, "gap")  # ahead of the batch's last version
            queued(4)
            third = Call(store, "s", 2, "c")
            queued(5)
        assert [first.result()[0].version, second.result()[0].version] == [1, 2]
        assert third.result()[0].version == 3
        assert isinstance(duplicate.error(), ConcurrencyConflict)
        assert isinstance(gap.error(), ConcurrencyConflict)
        assert [r.event.name for r in store.read_stream("s")] == ["a", "b", "c"]

    def test_a_database_error_fails_the_whole_batch(self, store: EventStore) -> None:
        kept = store.append("s", 0, [ThingCreated(name="s")], meta())
        self.poison("poison")
        with self.one_batch(store) as queued:
            calls = [Call(store, "s", 1, "x"), Call(store, "n1", 0, "y")]
            queued(2)
            calls.append(Call(store, "poison", 0, "p"))
            queued(3)
            calls.append(Call(store, "n2", 0, "z"))
            queued(4)
        blocker = store.read_stream("blocker")
        for call, stream in zip(calls, ["s", "n1", "poison", "n2"], strict=True):
            error = call.error()
            assert isinstance(error, StoreUnavailable), error
            assert f"cannot append to stream {stream}: " in str(error)
            assert self.poison_message in str(error)  # each caller learns why
        # Nothing of the batch was written, and the store goes on working.
        assert store.read_all() == kept + blocker
        assert store.head() == blocker[-1].position
        again = store.append("s", 1, [ThingRenamed(name="again")], meta())
        assert again[0].position > blocker[-1].position
        assert [r.event.name for r in store.read_stream("s")] == ["s", "again"]

    def test_a_failed_intent_commit_fails_its_queued_outcome(self, store: EventStore) -> None:
        """An intent and its outcome queued without waiting (``append_async``): the
        intent's batch fails, so the outcome is not appended and both callers get the
        error, whichever batch the outcome lands in."""
        kept = store.append("s", 0, [ThingCreated(name="s")], meta())
        self.poison("poison")
        with self.one_batch(store) as queued:
            intent = store.append_async("poison", 0, [ThingCreated(name="i")], meta())
            queued(1)
            outcome = store.append_async("poison", 1, [ThingRenamed(name="o")], meta())
            queued(2)
        for future in (intent, outcome):
            error = future.exception(timeout=15)
            assert isinstance(error, StoreUnavailable) and self.poison_message in str(error), error
        # and an outcome queued after the intent's batch was taken fails on its version
        late_intent = store.append_async("poison", 0, [ThingCreated(name="i")], meta())
        late_outcome = store.append_async("poison", 1, [ThingRenamed(name="o")], meta())
        assert isinstance(late_intent.exception(timeout=15), StoreUnavailable)
        assert isinstance(late_outcome.exception(timeout=15), (StoreUnavailable, ConcurrencyConflict))
        assert store.read_stream("poison") == []
        assert store.read_stream("s") == kept

    def test_a_batch_waiting_for_a_lock_does_not_hold_up_the_last_one(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A committed batch's callers wait to be told until the next batch commits;
        should another process hold the write lock when that next batch starts, they
        are told at once, not when the other process lets go."""
        writer = committer_of(store)._writer
        original = type(writer)._transaction  # type: ignore[attr-defined]
        other = contextlib.ExitStack()
        grabbed = threading.Event()

        def transaction(writer: Any, batch: Any, release: Release) -> Any:
            if release.pending and not grabbed.is_set():
                other.enter_context(self.hold_writes())  # another process gets in first
                grabbed.set()
            return original(writer, batch, release)

        monkeypatch.setattr(type(writer), "_transaction", transaction)
        committer = committer_of(store)
        try:
            with self.hold_writes():
                blocker = Call(store, "blocker", 0, "blocker")
                wait_until(lambda: committer.taken == 1, "the writer took the blocker")
                second = Call(store, "second", 0, "second")
                wait_until(lambda: len(committer._queue) == 1, "the second append is queued")
            # The blocker's batch commits; the next one finds the lock taken again.
            assert blocker.result(timeout=5)[0].version == 1
            assert grabbed.is_set()
            time.sleep(0.05)
            assert second._thread.is_alive()  # still waiting for the lock
        finally:
            other.close()
        assert second.result()[0].version == 1

    def test_key_violation_in_a_checked_batch_is_retried_one_by_one(
        self, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Should the version check ever pass an append the primary key then refuses,
        the batch is rolled back and retried append by append: the refused one is a
        conflict, the others are written."""
        store.append("s", 0, [ThingCreated(name="s")], meta())
        monkeypatch.setattr(backends, "plan", lambda batch, current: [True] * len(batch))
        with self.one_batch(store) as queued:
            good = Call(store, "n1", 0, "good")
            queued(1)
            bad = Call(store, "s", 0, "bad")  # s has version 1: the key refuses it
            queued(2)
            also_good = Call(store, "n2", 0, "also good")
            queued(3)
        assert isinstance(bad.error(), ConcurrencyConflict)
        assert good.result()[0].version == 1 and also_good.result()[0].version == 1
        assert [r.event.name for r in store.read_stream("s")] == ["s"]
        positions = [r.position for r in store.read_all()]
        assert positions == sorted(set(positions))

    def test_close_with_appends_in_flight(self) -> None:
        """close() while 32 threads append: it returns promptly, every append either
        was acknowledged (and is in the log) or failed with StoreUnavailable (and is
        not), and every thread stops."""
        store = self.open()
        writers = 32
        acknowledged: list[Recorded] = []
        failures: list[BaseException] = []
        lock = threading.Lock()
        started = threading.Barrier(writers + 1)

        def writer(i: int) -> None:
            started.wait(timeout=10)
            version = 0
            while True:
                try:
                    recs = store.append(f"w{i}", version, [ThingRenamed(name=str(i))], meta())
                except StoreUnavailable as exc:
                    with lock:
                        failures.append(exc)
                    return
                except BaseException as exc:  # anything else is a bug
                    with lock:
                        failures.append(exc)
                    raise
                with lock:
                    acknowledged.extend(recs)
                version += 1

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
        for thread in threads:
            thread.start()
        started.wait(timeout=10)
        wait_until(lambda: len(acknowledged) >= 200, "200 appends were acknowledged")
        closing = time.monotonic()
        store.close()
        assert time.monotonic() - closing < 10
        for thread in threads:
            thread.join(timeout=10)
            assert not thread.is_alive()
        assert len(failures) == writers
        assert all(isinstance(f, StoreUnavailable) for f in failures), failures[:3]
        assert not committer_of(store)._alive()

        again = self.open()
        try:
            logged = {(r.stream_id, r.version): r for r in again.read_all(limit=1_000_000)}
            assert {(r.stream_id, r.version) for r in acknowledged} == set(logged)
            assert all(
                logged[(r.stream_id, r.version)].position == r.position for r in acknowledged
            )
        finally:
            again.close()

    def test_close_waits_for_the_batch_in_flight(self) -> None:
        """Appends queued before close() get their real outcome; later ones fail."""
        store = self.open()
        try:
            with self.one_batch(store) as queued:
                calls = [Call(store, f"n{i}", 0, f"n{i}") for i in range(4)]
                queued(4)
                closer = threading.Thread(target=store.close)
                closer.start()
                wait_until(lambda: committer_of(store)._closing, "close() has begun")
                with pytest.raises(StoreUnavailable, match="closed"):
                    store.append("late", 0, [ThingCreated(name="late")], meta())
            closer.join(timeout=15)
            assert not closer.is_alive()
            assert [call.result()[0].version for call in calls] == [1, 1, 1, 1]
        finally:
            store.close()
        again = self.open()
        try:
            assert {r.stream_id for r in again.read_all()} == {"blocker", "n0", "n1", "n2", "n3"}
        finally:
            again.close()


# ------------------------------------------------------------------------- SQLite ------


class TestSQLiteGroupCommit(GroupCommitContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "events.db"

    def open(self) -> EventStore:
        return open_store(str(self.path), REGISTRY)

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10, check_same_thread=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    poison_message = "integer overflow"

    def poison(self, stream_id: str) -> None:
        # abs() of the smallest integer is a run-time "integer overflow" error.
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON stored_events "
                f"WHEN NEW.originator_id = '{stream_id}' "
                "BEGIN SELECT abs(-9223372036854775807 - 1); END"
            )

    def test_writer_uses_full_sync_and_extra_pragmas(self) -> None:
        store = SQLiteEventStore(self.path, REGISTRY, Meta, pragmas=("PRAGMA cache_size=-4096",))
        try:
            store.append("s", 0, [ThingCreated(name="s")], meta())
            writer = committer_of(store)._writer
            assert isinstance(writer, backends._SQLiteBatchWriter)
            conn = writer._conn
            assert conn is not None
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -4096
        finally:
            store.close()
        assert writer._conn is None  # closed by the writer thread as it stopped

    def test_a_full_disk_fails_the_batch_and_keeps_the_log(self) -> None:
        store = SQLiteEventStore(self.path, REGISTRY, Meta, pragmas=("PRAGMA max_page_count=16",))
        try:
            kept = store.append("s", 0, [ThingCreated(name="s")], meta())
            with self.one_batch(store) as queued:
                small = Call(store, "small", 0, "small")
                queued(1)
                big: list[BaseException] = []

                def append_big() -> None:
                    try:
                        store.append("s", 1, [ThingRenamed(name="x" * 4000)] * 40, meta())
                    except BaseException as exc:
                        big.append(exc)

                big_thread = threading.Thread(target=append_big)
                big_thread.start()
                queued(2)
            big_thread.join(timeout=15)
            assert isinstance(big[0], StoreUnavailable) and "full" in str(big[0])
            assert isinstance(small.error(), StoreUnavailable)
            assert store.read_all() == kept + store.read_stream("blocker")
            assert store.append("small", 0, [ThingCreated(name="ok")], meta())[0].version == 1
        finally:
            store.close()


# --------------------------------------------------------------------- PostgreSQL ------


@pytest.mark.integration
class TestPostgresGroupCommit(GroupCommitContract):
    @pytest.fixture(autouse=True)
    def _url(self, pg_url: str, postgres_url: str) -> None:
        self.url = pg_url
        self.admin_url = postgres_url
        self.schema = pg_url.rsplit("schema=", 1)[1]

    def open(self) -> EventStore:
        return open_store(self.url, REGISTRY)

    def _table(self) -> Composed:
        return SQL("{}.{}").format(Identifier(self.schema), Identifier("stored_events"))

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        with psycopg.connect(self.admin_url) as conn:
            conn.execute(SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(self._table()))
            yield
            conn.rollback()

    poison_message = "poisoned stream poison"

    def poison(self, stream_id: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                SQL(
                    "CREATE FUNCTION {}.poison() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'poisoned stream %', NEW.originator_id; END $$"
                ).format(Identifier(self.schema))
            )
            conn.execute(
                SQL(
                    "CREATE TRIGGER poison BEFORE INSERT ON {} FOR EACH ROW "
                    "WHEN (NEW.originator_id = {}) EXECUTE FUNCTION {}.poison()"
                ).format(self._table(), stream_id, Identifier(self.schema))
            )

    def test_a_killed_writer_connection_is_replaced(
        self, store: EventStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A server restart since the last batch: the writer's connection is dead; the
        next batch notices before anything is sent for writing and retries on a new
        connection."""
        assert isinstance(store, PostgresEventStore)
        store.append("s", 0, [ThingCreated(name="s")], meta())
        writer = committer_of(store)._writer
        assert isinstance(writer, backends._PostgresBatchWriter)
        assert writer._conn is not None
        pid = writer._conn.info.backend_pid
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(
                lambda: (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                    == (0,)
                ),
                "the backend is gone",
            )
        with caplog.at_level("INFO", logger="berthd.events.backends"):
            recs = store.append("s", 1, [ThingRenamed(name="after")], meta())
        assert recs[0].version == 2
        assert "retrying the batch on a new one" in caplog.text
        assert writer._conn is not None and writer._conn.info.backend_pid != pid

    def test_batch_sends_one_notify(self, store: EventStore) -> None:
        """Other processes' LISTENers learn of each batch (cross-process wake-up)."""
        with psycopg.connect(self.admin_url, autocommit=True) as listener:
            listener.execute('LISTEN "stored_events"')
            store.append("s", 0, [ThingCreated(name="s")], meta())
            got = list(listener.notifies(timeout=5, stop_after=1))
        assert got and got[0].channel == "stored_events"


# ----------------------------------------------------------- the committer alone ------


def pending(stream: str, expected: int, n: int = 1) -> PendingAppend:
    from eventsourcing.persistence import StoredEvent

    return PendingAppend(
        stream,
        expected,
        [StoredEvent(stream, expected + k, "T", b"{}") for k in range(1, n + 1)],
    )


def test_plan_counts_the_batchs_own_appends() -> None:
    batch = [
        pending("a", 0),
        pending("a", 1, n=2),
        pending("a", 1),  # a is at 3 by now
        pending("b", 4),
        pending("b", 5),  # b is at 5 only if the previous one was accepted
        pending("c", 1),  # c does not exist
        pending("a", 3),
    ]
    assert plan(batch, {"b": 4}) == [True, True, False, True, True, False, True]
    assert plan(batch, {"a": 1}) == [False, True, False, False, False, False, True]


class FakeWriter:
    """A BatchWriter that numbers events, optionally blocking or failing on demand."""

    def __init__(self) -> None:
        self.head = 0
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next: BaseException | None = None
        self.closed = False
        self.pending_at_commit: list[bool] = []
        self.on_commit: Callable[[Release], None] | None = None

    def commit(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        self.gate.wait()
        self.batches.append([p.stream_id for p in batch])
        self.pending_at_commit.append(release.pending)
        if self.on_commit is not None:
            self.on_commit(release)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        out: list[Outcome] = []
        for p in batch:
            out.append(list(range(self.head + 1, self.head + 1 + len(p.events))))
            self.head += len(p.events)
        return out

    def close(self) -> None:
        self.closed = True


def submit_async(committer: GroupCommitter, stream: str, n: int = 1) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["ok"] = committer.submit(stream, 0, pending(stream, 0, n).events)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    box["thread"] = thread
    return box


def test_committer_acknowledges_after_on_commit() -> None:
    writer = FakeWriter()
    heads: list[int] = []
    committer = GroupCommitter(writer, on_commit=heads.append, name="t")
    assert committer.submit("a", 0, pending("a", 0, 2).events) == [1, 2]
    assert heads == [2]
    committer.close()
    assert writer.closed
    with pytest.raises(StoreUnavailable, match="closed"):
        committer.submit("b", 0, pending("b", 0).events)


def test_committer_batches_respect_max_events() -> None:
    writer = FakeWriter()
    committer = GroupCommitter(writer, on_commit=lambda head: None, name="t", max_events=3)
    writer.gate.clear()
    first = submit_async(committer, "first")
    wait_until(lambda: committer.taken == 1, "the first append was taken")
    boxes = [submit_async(committer, f"s{i}", n) for i, n in enumerate([2, 1, 2, 5])]
    wait_until(lambda: len(committer._queue) == 4, "4 appends queued")
    writer.gate.set()
    for box in [first, *boxes]:
        box["thread"].join(timeout=5)
        assert "ok" in box
    # 2+1 fit in 3 events; 2 alone (2+5 > 3); 5 alone although above the limit.
    assert writer.batches == [["first"], ["s0", "s1"], ["s2"], ["s3"]]
    committer.close()


def test_committer_failure_fails_the_batch_and_goes_on() -> None:
    writer = FakeWriter()
    committer = GroupCommitter(writer, on_commit=lambda head: None, name="t")
    writer.fail_next = RuntimeError("boom")
    with pytest.raises(StoreUnavailable, match="RuntimeError: boom") as info:
        committer.submit("a", 0, pending("a", 0).events)
    assert isinstance(info.value.__cause__, RuntimeError)
    writer.fail_next = StoreUnavailable("disk full")
    with pytest.raises(StoreUnavailable, match="stream b: disk full"):
        committer.submit("b", 0, pending("b", 0).events)
    assert committer.submit("c", 0, pending("c", 0).events) == [1]
    committer.close()


def test_committer_close_gives_up_on_a_stuck_writer() -> None:
    writer = FakeWriter()
    committer = GroupCommitter(writer, on_commit=lambda head: None, name="t", close_timeout=0.2)
    writer.gate.clear()
    stuck = submit_async(committer, "stuck")
    wait_until(lambda: committer.taken == 1, "the append was taken")
    queued = submit_async(committer, "queued")
    wait_until(lambda: len(committer._queue) == 1, "a second append queued")
    started = time.monotonic()
    committer.close()
    assert time.monotonic() - started < 2
    queued["thread"].join(timeout=5)
    assert isinstance(queued.get("error"), StoreUnavailable)
    writer.gate.set()  # the stuck batch finishes after all: its caller hears the truth
    stuck["thread"].join(timeout=5)
    assert stuck.get("ok") == [1]


def test_committer_on_commit_error_still_acknowledges() -> None:
    def broken(head: int) -> None:
        raise RuntimeError("listener bug")

    committer = GroupCommitter(FakeWriter(), on_commit=broken, name="t")
    assert committer.submit("a", 0, pending("a", 0).events) == [1]
    committer.close()


def test_committer_tells_a_batch_when_the_next_one_commits() -> None:
    """The callers of a committed batch are told while the next batch is being
    committed (after the writer's database work, before its fsync), or at once when
    nothing else is queued."""
    writer = FakeWriter()
    committer = GroupCommitter(writer, on_commit=lambda head: None, name="t")
    assert committer.submit("alone", 0, pending("alone", 0).events) == [1]  # told at once
    writer.gate.clear()
    first = submit_async(committer, "first")
    wait_until(lambda: committer.taken == 2, "the first append was taken")
    second = submit_async(committer, "second")
    wait_until(lambda: len(committer._queue) == 1, "the second append queued")
    seen: list[bool] = []

    def check(release: Release) -> None:  # called in the second batch's commit
        seen.append(first["thread"].is_alive())  # not told yet
        release()
        first["thread"].join(timeout=5)
        seen.append(first["thread"].is_alive())  # told now

    writer.on_commit = lambda release: check(release) if release.pending else None
    writer.gate.set()
    second["thread"].join(timeout=5)
    assert first.get("ok") == [2] and second.get("ok") == [3]
    assert seen == [True, False]
    assert writer.pending_at_commit == [False, False, True]
    committer.close()


def test_committer_tells_a_batch_whose_writer_never_releases() -> None:
    writer = FakeWriter()  # never calls release(): the committer does, after commit()
    committer = GroupCommitter(writer, on_commit=lambda head: None, name="t")
    writer.gate.clear()
    boxes = [submit_async(committer, "a")]
    wait_until(lambda: committer.taken == 1, "taken")
    boxes += [submit_async(committer, "b"), submit_async(committer, "c")]
    wait_until(lambda: len(committer._queue) == 2, "queued")
    writer.gate.set()
    for box in boxes:
        box["thread"].join(timeout=5)
        assert "ok" in box
    committer.close()
