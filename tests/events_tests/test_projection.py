"""The projection runner, on the memory and SQLite stores."""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from berthd.events import (
    EventStore,
    Projection,
    ProjectionRunner,
    Recorded,
    StoreUnavailable,
    open_store,
)
from tests.events_tests.sample import REGISTRY, NoteAdded, ThingCreated, ThingRenamed, meta


class Everything(Projection):
    """Remembers every position it was given, and counts types."""

    def __init__(self, name: str = "everything") -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.positions: list[int] = []
        self.types: Counter[str] = Counter()

    def apply(self, rec: Recorded) -> None:
        self.positions.append(rec.position)
        self.types[rec.type] += 1


class NamesView(Projection):
    """Each thing's current name: a tiny real read model."""

    name = "names"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_id: dict[str, str] = {}

    def apply(self, rec: Recorded) -> None:
        if isinstance(rec.event, ThingCreated | ThingRenamed):
            self.by_id[rec.stream_id] = rec.event.name


class Exploding(Projection):
    """Fails on every rename."""

    name = "exploding"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.applied = 0

    def apply(self, rec: Recorded) -> None:
        if isinstance(rec.event, ThingRenamed):
            raise RuntimeError("boom")
        self.applied += 1


def eventually(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Wait for ``condition``: listeners are called right after ``wait_for`` wakes, on
    the runner thread, so a test must give them that instant."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def append_concurrently(store: EventStore, writers: int, per_writer: int) -> None:
    """``writers`` threads, each appending ``per_writer`` single-event appends to its own
    stream (a create, then renames)."""

    def writer(i: int) -> None:
        store.append(f"w{i}", 0, [ThingCreated(name=f"w{i}-0")], meta())
        for version in range(1, per_writer):
            store.append(f"w{i}", version, [ThingRenamed(name=f"w{i}-{version}")], meta())

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))


class ProjectionRunnerContract(abc.ABC):
    @abc.abstractmethod
    def new_store(self) -> EventStore: ...

    @pytest.fixture
    def store(self) -> Iterator[EventStore]:
        store = self.new_store()
        yield store
        store.close()

    @pytest.fixture
    def make_runner(self, store: EventStore) -> Iterator[Any]:
        runners: list[ProjectionRunner] = []

        def make(projections: Sequence[Projection]) -> ProjectionRunner:
            runner = ProjectionRunner(store, projections)
            runners.append(runner)
            return runner

        yield make
        for runner in runners:
            runner.stop()

    def test_follows_the_log_and_wait_for_wakes_at_once(
        self, store: EventStore, make_runner: Any
    ) -> None:
        names = NamesView()
        runner = make_runner([names])
        runner.start()
        assert runner.wait_for(0, timeout=0)  # nothing to wait for
        for i in range(20):
            (rec,) = store.append(f"s{i}", 0, [ThingCreated(name=f"n{i}")], meta())
            appended = time.monotonic()
            assert runner.wait_for(rec.position, timeout=5)
            waited = time.monotonic() - appended
            assert waited < 0.05, f"read-your-writes took {waited:.3f}s"
            assert names.by_id[f"s{i}"] == f"n{i}"  # visible as soon as wait_for returns
        assert runner.position == store.head()

    def test_wait_for_times_out(self, store: EventStore, make_runner: Any) -> None:
        runner = make_runner([Everything()])
        runner.start()
        started = time.monotonic()
        assert not runner.wait_for(store.head() + 1, timeout=0.2)
        assert 0.19 <= time.monotonic() - started < 0.6

    def test_catch_up_then_follow(self, store: EventStore, make_runner: Any) -> None:
        append_concurrently(store, writers=3, per_writer=10)
        everything = Everything()
        runner = make_runner([everything, NamesView()])
        assert runner.catch_up() == 30
        assert runner.position == store.head()
        assert runner.catch_up() == 0
        runner.start()
        (rec,) = store.append("late", 0, [NoteAdded(text="x")], meta())
        assert runner.wait_for(rec.position, timeout=5)
        assert everything.positions == [r.position for r in store.read_all()]

    def test_rebuild_equals_live_state(self, store: EventStore, make_runner: Any) -> None:
        everything, names = Everything(), NamesView()
        runner = make_runner([everything, names])
        runner.start()
        append_concurrently(store, writers=8, per_writer=15)
        assert runner.wait_for(store.head(), timeout=10)
        live_names, live_positions = dict(names.by_id), list(everything.positions)
        assert len(live_names) == 8 and all(v.endswith("-14") for v in live_names.values())

        counts = runner.rebuild()
        assert counts == dict(Counter(r.type for r in store.read_all()))
        assert counts == {"ThingCreated": 8, "ThingRenamed": 8 * 14}
        assert names.by_id == live_names
        assert everything.positions == live_positions
        assert runner.position == store.head()
        # and the runner carries on after the rebuild
        (rec,) = store.append("w0", 15, [ThingRenamed(name="after")], meta())
        assert runner.wait_for(rec.position, timeout=5)
        assert names.by_id["w0"] == "after"

    def test_rebuild_during_live_appends_applies_each_event_once(
        self, store: EventStore, make_runner: Any
    ) -> None:
        everything = Everything()
        runner = make_runner([everything])
        runner.start()
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(append_concurrently, store, 4, 25)
            while not writing.done():
                runner.rebuild()
                time.sleep(0.005)
            writing.result()
        assert runner.wait_for(store.head(), timeout=10)
        assert everything.positions == [r.position for r in store.read_all()]

    def test_a_failing_projection_does_not_stop_the_others(
        self, store: EventStore, make_runner: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        exploding, everything = Exploding(), Everything()
        runner = make_runner([exploding, everything])
        runner.start()
        store.append("s1", 0, [ThingCreated(name="a"), ThingRenamed(name="b")], meta())
        (last,) = store.append("s2", 0, [NoteAdded(text="c")], meta())
        assert runner.wait_for(last.position, timeout=5)
        assert everything.positions == [r.position for r in store.read_all()]
        assert exploding.applied == 2
        assert runner.failures == {"exploding": 1}
        assert runner.running
        failed_at = store.read_all(types=["ThingRenamed"])[0].position
        assert any(
            "exploding" in r.getMessage() and f"position {failed_at}" in r.getMessage()
            for r in caplog.records
        )

    def test_listeners_see_every_event_once_in_order(
        self, store: EventStore, make_runner: Any
    ) -> None:
        names = NamesView()
        runner = make_runner([names])
        heard: list[int] = []
        late: list[Recorded] = []
        lagging: list[int] = []

        def listener(rec: Recorded) -> None:
            if runner.position < rec.position:
                lagging.append(rec.position)  # projections must already reflect rec
            heard.append(rec.position)

        def broken(rec: Recorded) -> None:
            if rec.position % 40 == 1:
                raise RuntimeError("listener bug")

        runner.add_listener(broken)
        runner.add_listener(listener)
        runner.start()
        append_concurrently(store, writers=8, per_writer=20)
        assert runner.wait_for(store.head(), timeout=10)
        eventually(lambda: len(heard) >= 160)  # listeners run just after wait_for wakes
        assert heard == [r.position for r in store.read_all()]
        assert lagging == []

        runner.remove_listener(listener)
        runner.remove_listener(listener)  # removing twice is harmless
        runner.add_listener(late.append)
        runner.rebuild()  # replays history into projections, not to listeners
        assert late == []
        (rec,) = store.append("new", 0, [NoteAdded(text="x")], meta())
        eventually(lambda: bool(late))
        assert late == [rec]
        assert len(heard) == 160

    def test_stop_is_prompt_and_start_resumes(self, store: EventStore, make_runner: Any) -> None:
        everything = Everything()
        runner = make_runner([everything])
        runner.start()
        with pytest.raises(RuntimeError):
            runner.start()
        (rec,) = store.append("s1", 0, [ThingCreated(name="a")], meta())
        assert runner.wait_for(rec.position, timeout=5)
        started = time.monotonic()
        runner.stop()
        assert time.monotonic() - started < 0.5
        assert not runner.running
        (rec,) = store.append("s1", 1, [ThingRenamed(name="b")], meta())
        time.sleep(0.1)
        assert runner.position == rec.position - 1
        runner.start()
        assert runner.wait_for(rec.position, timeout=5)
        assert everything.positions == [r.position for r in store.read_all()]


class TestRunnerOnMemory(ProjectionRunnerContract):
    def new_store(self) -> EventStore:
        return open_store("memory", REGISTRY)


class TestRunnerOnSQLite(ProjectionRunnerContract):
    @pytest.fixture(autouse=True)
    def _db_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "events.db"

    def new_store(self) -> EventStore:
        return open_store(str(self.path), REGISTRY)


class _FlakyStore(EventStore):
    """Delegates to a real store, but the first ``failures`` reads fail."""

    def __init__(self, inner: EventStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.lock = threading.Lock()

    def read_all(
        self, after: int = 0, limit: int = 1000, types: Sequence[str] = ()
    ) -> list[Recorded]:
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise StoreUnavailable("database is having a moment")
        return self.inner.read_all(after, limit, types)

    def append(self, stream_id: str, expected_version: int, events: Any, meta: Any) -> Any:
        return self.inner.append(stream_id, expected_version, events, meta)

    def read_stream(self, stream_id: str, after_version: int = 0) -> list[Recorded]:
        return self.inner.read_stream(stream_id, after_version)

    def head(self) -> int:
        return self.inner.head()

    def wait_for_append(self, after: int, timeout: float) -> bool:
        return self.inner.wait_for_append(after, timeout)

    def close(self) -> None:
        self.inner.close()


def test_runner_survives_a_store_outage(caplog: pytest.LogCaptureFixture) -> None:
    store = _FlakyStore(open_store("memory", REGISTRY), failures=3)
    everything = Everything()
    runner = ProjectionRunner(store, [everything])
    with caplog.at_level(logging.WARNING, logger="berthd.events.projection"):
        runner.start()
        try:
            (rec,) = store.append("s1", 0, [ThingCreated(name="a")], meta())
            assert runner.wait_for(rec.position, timeout=5)  # after ~0.1+0.2+0.4 s of backoff
        finally:
            runner.stop()
    assert everything.positions == [rec.position]
    assert sum("cannot read the log" in r.getMessage() for r in caplog.records) == 3
    store.close()


def test_duplicate_projection_names_are_refused() -> None:
    store = open_store("memory", REGISTRY)
    with pytest.raises(ValueError, match="duplicate"):
        ProjectionRunner(store, [Everything("x"), Everything("x")])
    assert (
        ProjectionRunner(store, [Everything("x"), NamesView()]).projection("names").name == "names"
    )
