"""The ``EventStore`` contract: every backend runs these same tests (STYLE.md §7).

A concrete test class subclasses ``EventStoreContract`` and provides the ``open_store``
fixture: a callable ``(registry) -> EventStore``. Backends whose storage outlives a
store object (SQLite, PostgreSQL) also subclass ``SharedStorageContract``: each call then
opens another store object on the same storage, which is how two processes are simulated.
Stores opened through the fixture are closed by it.
"""

from __future__ import annotations

import abc
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent

from berthd.events import (
    ConcurrencyConflict,
    EventStore,
    Recorded,
    StoreUnavailable,
    UndecodedEvent,
)
from tests.events_tests.sample import (
    NEWER_REGISTRY,
    REGISTRY,
    NoteAdded,
    ThingArchived,
    ThingCreated,
    ThingRenamed,
    Unregistered,
    meta,
)

OpenStore = Callable[..., EventStore]


def follow_until(
    store: EventStore, count: int, stop: threading.Event
) -> tuple[threading.Thread, list[Recorded]]:
    """Start a thread following ``store`` from 0 until it has seen ``count`` events or
    ``stop`` is set."""
    seen: list[Recorded] = []

    def run() -> None:
        for rec in store.follow(0, stop):
            seen.append(rec)
            if len(seen) >= count:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


class EventStoreContract(abc.ABC):
    """What every ``EventStore`` must do."""

    @abc.abstractmethod
    def new_store(self, registry: Mapping[str, type[Any]]) -> EventStore:
        """Open a store on this test's storage (a fresh one for each test)."""

    @pytest.fixture
    def open_store(self) -> Iterator[OpenStore]:
        """``new_store`` as a callable ``(registry=REGISTRY)``; closes what it opened."""
        opened: list[EventStore] = []

        def factory(registry: Mapping[str, type[Any]] = REGISTRY) -> EventStore:
            store = self.new_store(registry)
            opened.append(store)
            return store

        yield factory
        for store in reversed(opened):
            store.close()

    @pytest.fixture
    def store(self, open_store: OpenStore) -> EventStore:
        return open_store(REGISTRY)

    # -- append and read a stream -------------------------------------------------------

    def test_append_and_read_stream(self, store: EventStore) -> None:
        recs = store.append(
            "a1b2c3d4e5f6",
            0,
            [ThingCreated(name="web", size=3), ThingRenamed(name="api"), ThingRenamed(name="app")],
            meta(),
        )
        assert [r.version for r in recs] == [1, 2, 3]
        positions = [r.position for r in recs]
        assert positions == sorted(positions) and len(set(positions)) == 3 and positions[0] >= 1
        assert recs[0].kind == "thing" and recs[0].type == "ThingCreated"
        assert recs[0].event == ThingCreated(name="web", size=3)

        assert store.read_stream("a1b2c3d4e5f6") == recs
        assert store.read_stream("a1b2c3d4e5f6", after_version=1) == recs[1:]
        assert store.read_stream("a1b2c3d4e5f6", after_version=3) == []
        assert store.read_stream("000000000000") == []

    def test_streams_are_independent(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        store.append("s2", 0, [NoteAdded(text="x")], meta())
        store.append("s1", 1, [ThingRenamed(name="b")], meta())
        assert [r.event for r in store.read_stream("s1")] == [
            ThingCreated(name="a"),
            ThingRenamed(name="b"),
        ]
        assert [(r.kind, r.version) for r in store.read_stream("s2")] == [("note", 1)]

    def test_empty_append_writes_nothing(self, store: EventStore) -> None:
        assert store.append("s1", 0, [], meta()) == []
        assert store.head() == 0

    def test_bad_arguments_are_refused(self, store: EventStore) -> None:
        with pytest.raises(ValueError):
            store.append("s1", -1, [ThingCreated(name="a")], meta())
        with pytest.raises(ValueError):
            store.append("", 0, [ThingCreated(name="a")], meta())
        assert store.head() == 0

    def test_unregistered_type_is_refused_and_nothing_written(self, store: EventStore) -> None:
        with pytest.raises(TypeError, match="registry"):
            store.append("s1", 0, [ThingCreated(name="a"), Unregistered()], meta())
        assert store.read_stream("s1") == []
        assert store.head() == 0

    # -- expected versions ----------------------------------------------------------------

    def test_conflict_when_stream_moved_on(self, store: EventStore) -> None:
        """The stream is ahead of what the writer expected (someone appended first)."""
        store.append("s1", 0, [ThingCreated(name="a"), ThingRenamed(name="b")], meta())
        head = store.head()
        for expected in (0, 1):
            with pytest.raises(ConcurrencyConflict) as info:
                store.append("s1", expected, [ThingRenamed(name="lost")], meta())
            assert info.value.stream_id == "s1"
            assert info.value.expected_version == expected
        assert [r.version for r in store.read_stream("s1")] == [1, 2]
        assert store.read_stream("s1")[-1].event == ThingRenamed(name="b")  # never overwritten
        assert store.head() == head

    def test_conflict_when_stream_is_behind_expected(self, store: EventStore) -> None:
        """Expecting a version the stream has not reached must not leave a gap."""
        with pytest.raises(ConcurrencyConflict):
            store.append("new", 1, [ThingCreated(name="a")], meta())
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        with pytest.raises(ConcurrencyConflict):
            store.append("s1", 5, [ThingRenamed(name="b")], meta())
        assert store.read_stream("new") == []
        assert [r.version for r in store.read_stream("s1")] == [1]

    def test_multi_event_append_is_all_or_nothing(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        before = store.head()
        # A conflicting batch writes none of its events.
        with pytest.raises(ConcurrencyConflict):
            store.append("s1", 0, [ThingCreated(name="x"), ThingRenamed(name="y")], meta())
        assert store.head() == before
        recs = store.append(
            "s1", 1, [ThingRenamed(name=f"n{i}") for i in range(5)], meta(request_id="r1")
        )
        assert [r.version for r in recs] == [2, 3, 4, 5, 6]
        # The batch sits together in the global log, in order.
        tail = store.read_all(after=before)
        assert [(r.stream_id, r.version) for r in tail] == [("s1", v) for v in range(2, 7)]
        assert [r.position for r in tail] == [r.position for r in recs]

    def test_concurrent_appenders_exactly_one_wins_per_version(self, store: EventStore) -> None:
        rounds, writers = 10, 8
        barrier = threading.Barrier(writers)

        def writer(i: int) -> list[int]:
            won = []
            for version in range(rounds):
                barrier.wait(timeout=10)
                try:
                    store.append("hot", version, [ThingRenamed(name=f"w{i}v{version}")], meta())
                    won.append(version)
                except ConcurrencyConflict:
                    pass
                barrier.wait(timeout=10)
            return won

        with ThreadPoolExecutor(writers) as pool:
            results = list(pool.map(writer, range(writers)))
        winners: dict[int, list[int]] = defaultdict(list)
        for i, won in enumerate(results):
            for version in won:
                winners[version].append(i)
        assert {v: len(ws) for v, ws in winners.items()} == dict.fromkeys(range(rounds), 1)
        stream = store.read_stream("hot")
        assert [r.version for r in stream] == list(range(1, rounds + 1))
        assert [r.event.name for r in stream] == [f"w{winners[v][0]}v{v}" for v in range(rounds)]

    def test_many_writers_with_deliberate_conflicts(self, store: EventStore) -> None:
        """64 threads at once (on SQLite and PostgreSQL their appends share group-commit
        batches): each appends to its own stream, races the others on a shared one, and
        sends appends with a stale or a future expected version. Exactly the appends
        that had to fail fail; nothing is lost or written twice; versions stay
        contiguous and positions strictly increasing."""
        writers, rounds = 64, 6
        barrier = threading.Barrier(writers)
        acknowledged: list[list[Recorded]] = [[] for _ in range(writers)]
        refused: list[list[tuple[str, int]]] = [[] for _ in range(writers)]
        hot_wins: list[list[int]] = [[] for _ in range(writers)]

        def expect_conflict(i: int, stream: str, expected: int) -> None:
            with pytest.raises(ConcurrencyConflict) as info:
                store.append(stream, expected, [ThingRenamed(name=f"bad-{i}")], meta())
            assert (info.value.stream_id, info.value.expected_version) == (stream, expected)
            refused[i].append((stream, expected))

        def writer(i: int) -> None:
            own = f"own-{i}"
            for r in range(rounds):
                barrier.wait(timeout=30)
                acknowledged[i] += store.append(own, r, [ThingRenamed(name=f"{i}-{r}")], meta())
                try:  # every writer expects version r: one of them per round gets it
                    acknowledged[i] += store.append(
                        "hot", r, [ThingRenamed(name=f"hot-{i}-{r}")], meta()
                    )
                    hot_wins[i].append(r)
                except ConcurrencyConflict:
                    pass
                expect_conflict(i, own, r)  # stale: the stream is at r + 1 now
                if i % 4 == 0:
                    expect_conflict(i, own, r + 3)  # from the future: must not leave a gap
                barrier.wait(timeout=30)

        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(writer, range(writers)))

        assert sorted(r for wins in hot_wins for r in wins) == list(range(rounds))
        for i in range(writers):
            assert len(refused[i]) == rounds + (rounds if i % 4 == 0 else 0)
            stream = store.read_stream(f"own-{i}")
            assert [r.version for r in stream] == list(range(1, rounds + 1))
            assert [r.event.name for r in stream] == [f"{i}-{r}" for r in range(rounds)]
        hot = store.read_stream("hot")
        assert [r.version for r in hot] == list(range(1, rounds + 1))

        log = store.read_all(limit=100_000)
        mine = [rec for recs in acknowledged for rec in recs]
        assert len(log) == len(mine) == writers * rounds + rounds
        positions = [r.position for r in log]
        assert positions == sorted(set(positions)), "positions not strictly increasing"
        assert len({(r.stream_id, r.version) for r in log}) == len(log), "duplicated"
        by_position = {r.position: r for r in log}
        assert all(by_position[rec.position] == rec for rec in mine), "acknowledged != logged"
        assert store.head() == positions[-1]

    # -- the global log -------------------------------------------------------------------

    def test_head(self, store: EventStore) -> None:
        assert store.head() == 0
        recs = store.append("s1", 0, [ThingCreated(name="a"), ThingRenamed(name="b")], meta())
        assert store.head() == recs[-1].position
        recs = store.append("s2", 0, [NoteAdded(text="n")], meta())
        assert store.head() == recs[-1].position

    def test_read_all_after_limit_and_types(self, store: EventStore) -> None:
        appended: list[Recorded] = []
        for i in range(5):
            appended += store.append(
                f"t{i}", 0, [ThingCreated(name=str(i)), ThingRenamed(name=f"r{i}")], meta()
            )
            appended += store.append(f"n{i}", 0, [NoteAdded(text=str(i))], meta())
        everything = store.read_all()
        assert everything == appended
        positions = [r.position for r in everything]
        assert positions == sorted(set(positions))

        assert store.read_all(after=positions[3], limit=4) == appended[4:8]
        assert store.read_all(after=positions[-1]) == []
        assert store.read_all(limit=0) == []
        notes = store.read_all(types=["NoteAdded"])
        assert [r.event.text for r in notes] == ["0", "1", "2", "3", "4"]
        some = store.read_all(after=positions[2], limit=3, types=("NoteAdded", "ThingRenamed"))
        assert [r.type for r in some] == ["ThingRenamed", "NoteAdded", "ThingRenamed"]
        assert [r.position for r in some] == [positions[4], positions[5], positions[7]]
        assert store.read_all(types=["NoSuchType"]) == []

    def test_metadata_round_trip(self, store: EventStore) -> None:
        full = meta(
            timestamp="2026-11-22T10:11:12.123456Z",
            node_id="node-1",
            principal="key_4f2a",
            correlation_id="corr-9",
            request_id="req-7",
        )
        store.append("s1", 0, [ThingCreated(name="a")], full)
        store.append("s2", 0, [NoteAdded(text="x", tags=("a", "b"))], meta())
        first, second = store.read_all()
        assert first.meta == full
        assert second.meta == meta()
        assert second.event == NoteAdded(text="x", tags=("a", "b"))
        served = first.as_served()
        assert served == {
            "position": first.position,
            "type": "ThingCreated",
            "entity": {"kind": "thing", "id": "s1"},
            "version": 1,
            "timestamp": "2026-11-22T10:11:12.123456Z",
            "principal": "key_4f2a",
            "correlation_id": "corr-9",
            "data": {"name": "a", "size": 0},
        }

    def test_unknown_and_undecodable_rows_do_not_stop_readers(self, store: EventStore) -> None:
        """Rows a newer berthd wrote (unknown type, or data this version cannot read)
        come back as UndecodedEvent; the rows around them decode normally."""
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        recorder = store._recorder  # type: ignore[attr-defined]  # write as another version would
        envelope = b'{"kind":"thing","meta":{"timestamp":"2026-11-22T10:00:00Z"},"data":%s}'
        recorder.insert_events(
            [
                StoredEvent("s1", 2, "ThingExploded", envelope % b'{"force":9}'),
                StoredEvent("s1", 3, "ThingRenamed", envelope % b'{"name":42}'),
            ]
        )
        store.append("s1", 3, [ThingRenamed(name="b")], meta())

        log = store.read_all()
        assert [r.type for r in log] == [
            "ThingCreated",
            "ThingExploded",
            "ThingRenamed",
            "ThingRenamed",
        ]
        unknown, mistyped = log[1].event, log[2].event
        assert isinstance(unknown, UndecodedEvent) and isinstance(mistyped, UndecodedEvent)
        assert unknown.type_name == "ThingExploded" and unknown.data == {"force": 9}
        assert unknown.error == "unknown event type"
        assert mistyped.data == {"name": 42} and "name" in mistyped.error
        assert log[1].kind == "thing" and log[1].meta == meta()
        assert log[3].event == ThingRenamed(name="b")
        assert [r.type for r in store.read_stream("s1")] == [r.type for r in log]
        assert log[1].as_served()["data"]["data"] == {"force": 9}

    # -- following ------------------------------------------------------------------------

    def test_follow_sees_concurrent_appends_in_order(self, store: EventStore) -> None:
        writers, per_writer = 8, 25
        total = writers * per_writer
        stop = threading.Event()
        follower, seen = follow_until(store, total, stop)
        time.sleep(0.05)  # the follower is now waiting for appends

        def writer(i: int) -> None:
            for version in range(per_writer):
                store.append(f"w{i}", version, [ThingRenamed(name=f"{i}-{version}")], meta())

        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(writer, range(writers)))
        follower.join(timeout=30)
        stop.set()
        assert not follower.is_alive(), f"follower saw only {len(seen)} of {total}"
        positions = [r.position for r in seen]
        assert positions == sorted(set(positions)), "out of order or repeated"
        assert seen == store.read_all(limit=total + 1), "missed or invented events"
        by_stream: dict[str, list[int]] = defaultdict(list)
        for rec in seen:
            by_stream[rec.stream_id].append(rec.version)
        assert by_stream == {f"w{i}": list(range(1, per_writer + 1)) for i in range(writers)}

    def test_wait_for_append_wakes_at_once(self, store: EventStore) -> None:
        woke: list[tuple[bool, float]] = []
        head = store.head()

        def waiter() -> None:
            ok = store.wait_for_append(head, timeout=5)
            woke.append((ok, time.monotonic()))

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.1)  # the waiter is blocked, between polls
        started = time.monotonic()
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        thread.join(timeout=5)
        ((ok, at),) = woke
        assert ok
        assert at - started < 0.1, f"woke {at - started:.3f}s after the append started"

    def test_wait_for_append_returns_at_once_when_already_beyond(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        started = time.monotonic()
        assert store.wait_for_append(0, timeout=5)
        assert time.monotonic() - started < 0.05

    def test_wait_for_append_times_out(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        started = time.monotonic()
        assert not store.wait_for_append(store.head(), timeout=0.3)
        elapsed = time.monotonic() - started
        assert 0.28 <= elapsed < 0.8

    # -- append without waiting (append_async) -------------------------------------------

    def test_append_async_commits_in_submission_order(self, store: EventStore) -> None:
        """An intent and its outcome submitted back to back, the outcome counting the
        intent's version before the intent is durable."""
        intent = store.append_async("s1", 0, [ThingCreated(name="a")], meta())
        outcome = store.append_async("s1", 1, [ThingRenamed(name="b"), ThingRenamed(name="c")], meta())
        first, second = intent.result(timeout=15), outcome.result(timeout=15)
        assert [r.version for r in first] == [1] and [r.version for r in second] == [2, 3]
        assert first[0].position < second[0].position < second[1].position
        assert second[0].kind == "thing" and second[0].type == "ThingRenamed"
        assert store.read_stream("s1") == first + second
        assert store.append("s1", 3, [ThingRenamed(name="d")], meta())[0].version == 4

    def test_append_async_conflict_fails_its_future_and_writes_nothing(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        head = store.head()
        late = store.append_async("s1", 0, [ThingRenamed(name="lost")], meta())
        with pytest.raises(ConcurrencyConflict) as info:
            late.result(timeout=15)
        assert info.value.stream_id == "s1" and info.value.expected_version == 0
        assert store.head() == head

    def test_append_async_after_a_failed_intent_appends_nothing(self, store: EventStore) -> None:
        """The outcome's expected version follows its intent's: if the intent is not
        committed, the outcome cannot be either, and both callers hear why."""
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        head = store.head()
        intent = store.append_async("s1", 5, [ThingRenamed(name="intent")], meta())
        outcome = store.append_async("s1", 6, [ThingRenamed(name="outcome")], meta())
        for future in (intent, outcome):
            with pytest.raises(ConcurrencyConflict):
                future.result(timeout=15)
        assert [r.version for r in store.read_stream("s1")] == [1]
        assert store.head() == head

    def test_append_async_refuses_bad_arguments_at_once(self, store: EventStore) -> None:
        with pytest.raises(ValueError):
            store.append_async("s1", -1, [ThingCreated(name="a")], meta())
        with pytest.raises(TypeError, match="registry"):
            store.append_async("s1", 0, [ThingCreated(name="a"), Unregistered()], meta())
        assert store.append_async("s1", 0, [], meta()).result(timeout=15) == []
        assert store.head() == 0

    def test_append_async_on_a_closed_store_fails_its_future(self, store: EventStore) -> None:
        store.close()
        future = store.append_async("s1", 0, [ThingCreated(name="a")], meta())
        with pytest.raises(StoreUnavailable):
            future.result(timeout=15)

    # -- lifecycle ------------------------------------------------------------------------

    def test_closed_store_is_unavailable(self, store: EventStore) -> None:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        store.close()
        store.close()  # idempotent
        with pytest.raises(StoreUnavailable):
            store.append("s1", 1, [ThingRenamed(name="b")], meta())
        with pytest.raises(StoreUnavailable):
            store.read_all()
        with pytest.raises(StoreUnavailable):
            store.wait_for_append(0, timeout=1)


class SharedStorageContract:
    """For backends whose storage outlives a store object: two store objects on the same
    storage behave like two processes sharing it. Mixed into a concrete class that also
    subclasses ``EventStoreContract`` (which provides ``open_store``)."""

    def test_two_stores_see_each_others_appends(self, open_store: OpenStore) -> None:
        a, b = open_store(REGISTRY), open_store(REGISTRY)
        recs = a.append("s1", 0, [ThingCreated(name="a")], meta())
        assert b.read_stream("s1") == recs
        assert b.head() == recs[-1].position

        woke: list[float] = []
        thread = threading.Thread(
            target=lambda: woke.append(time.monotonic()) if b.wait_for_append(b.head(), 5) else None
        )
        thread.start()
        time.sleep(0.05)
        started = time.monotonic()
        more = a.append("s1", 1, [ThingRenamed(name="b")], meta())
        thread.join(timeout=6)
        assert woke and woke[0] - started < 1.0  # another process: the slow poll (or NOTIFY)
        assert b.read_all(after=recs[-1].position) == more

        with pytest.raises(ConcurrencyConflict):
            b.append("s1", 1, [ThingRenamed(name="stale")], meta())
        b.append("s1", 2, [ThingRenamed(name="c")], meta())
        with pytest.raises(ConcurrencyConflict):
            a.append("s1", 2, [ThingRenamed(name="stale")], meta())
        assert [r.event.name for r in a.read_stream("s1")] == ["a", "b", "c"]

    def test_two_stores_race_on_one_stream(self, open_store: OpenStore) -> None:
        stores = [open_store(REGISTRY), open_store(REGISTRY)]
        rounds, writers = 10, 6
        barrier = threading.Barrier(writers)

        def writer(i: int) -> list[int]:
            store = stores[i % 2]
            won = []
            for version in range(rounds):
                barrier.wait(timeout=20)
                try:
                    store.append("hot", version, [ThingRenamed(name=f"w{i}")], meta())
                    won.append(version)
                except ConcurrencyConflict:
                    pass
                barrier.wait(timeout=20)
            return won

        with ThreadPoolExecutor(writers) as pool:
            wins = sorted(v for won in pool.map(writer, range(writers)) for v in won)
        assert wins == list(range(rounds))
        assert [r.version for r in stores[0].read_stream("hot")] == list(range(1, rounds + 1))

    def test_reopen_keeps_everything(self, open_store: OpenStore) -> None:
        first = open_store(REGISTRY)
        written = first.append("s1", 0, [ThingCreated(name="a"), ThingRenamed(name="b")], meta())
        written += first.append("s2", 0, [NoteAdded(text="n")], meta(principal="admin"))
        first.close()
        again = open_store(REGISTRY)
        assert again.read_all() == written
        assert again.head() == written[-1].position
        more = again.append("s1", 2, [ThingRenamed(name="c")], meta())
        assert more[0].position > written[-1].position

    def test_events_from_a_newer_writer_are_tolerated(self, open_store: OpenStore) -> None:
        newer, older = open_store(NEWER_REGISTRY), open_store(REGISTRY)
        newer.append("s1", 0, [ThingCreated(name="a"), ThingArchived(why="old")], meta())
        created, archived = older.read_stream("s1")
        assert created.event == ThingCreated(name="a")
        assert archived.event == UndecodedEvent(
            type_name="ThingArchived", data={"why": "old"}, error="unknown event type"
        )
        assert archived.kind == "thing" and archived.version == 2
        # The older writer still respects versions.
        older.append("s1", 2, [ThingRenamed(name="b")], meta())
        assert newer.read_stream("s1")[-1].event == ThingRenamed(name="b")
