"""Actors and supervisor on the fake runtime and the in-memory log (one layer, unit level)."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from berthd.actors import CommandContext, Supervisor, rfc3339, system_clock
from berthd.actors.context import SYSTEM
from berthd.domain import EVENT_TYPES
from berthd.domain import container as c
from berthd.domain.errors import (
    Conflict,
    ContainerNotFound,
    ImageNotFound,
    RuntimeFailed,
    RuntimeUnavailable,
    StoreUnavailable,
)
from berthd.events import open_store
from berthd.events.store import EventStore
from berthd.runtime import base as rt
from berthd.runtime.fake import FakeRuntime
from tests.actors_tests.faults import FailingIntent

CTX = CommandContext(principal="k1", owner="k1", is_admin=False, correlation_id="corr-1")
NODE = "node0test000"


@pytest.fixture
def store() -> Iterator[EventStore]:
    s = open_store("memory", EVENT_TYPES)
    yield s
    s.close()


@pytest.fixture
def runtime() -> Iterator[FakeRuntime]:
    r = FakeRuntime(NODE)
    yield r
    r.close()


@pytest.fixture
def workers() -> Iterator[ThreadPoolExecutor]:
    w = ThreadPoolExecutor(max_workers=32)
    yield w
    w.shutdown(wait=False, cancel_futures=True)


def make(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor, **kw: object) -> Supervisor:
    names: set[str] = set()
    sup = Supervisor(store=store, runtimes={"fake": runtime}, default_runtime="fake", workers=workers,
                     clock=system_clock, node_id=NODE, name_taken=names.__contains__, **kw)  # type: ignore[arg-type]
    sup.start()
    return sup


@pytest.fixture
def sup(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor) -> Iterator[Supervisor]:
    s = make(store, runtime, workers)
    yield s
    s.stop()


def types(store: EventStore, stream: str) -> list[str]:
    return [r.type for r in store.read_stream(stream)]


def create(sup: Supervisor, **kw: object) -> c.ContainerState:
    cmd = c.CreateContainer(image="host", command=["sleep", "60"], **kw)  # type: ignore[arg-type]
    return sup.create_container(cmd, CTX).result(timeout=30).state


def test_create_and_start_records_intent_then_outcome(sup: Supervisor, store: EventStore) -> None:
    state = create(sup)
    assert state.status == "running" and state.owner == "k1"
    assert types(store, state.id) == ["ContainerCreateRequested", "ContainerCreated",
                                      "ContainerStartRequested", "ContainerStarted"]
    recs = store.read_stream(state.id)
    assert all(r.meta.principal == "k1" and r.meta.correlation_id == "corr-1" and r.meta.node_id == NODE
               for r in recs)


def test_runtime_refusal_is_recorded_and_returned(sup: Supervisor, store: EventStore, runtime: FakeRuntime) -> None:
    runtime.fail_next("create", rt.ImageMissing("no such image: nope"))
    with pytest.raises(ImageNotFound):
        sup.create_container(c.CreateContainer(image="nope"), CTX).result(timeout=30)
    created = [r for r in store.read_all() if r.type == "ContainerCreateFailed"]
    assert len(created) == 1


def test_unavailable_runtime_is_503(sup: Supervisor, runtime: FakeRuntime) -> None:
    state = create(sup)
    runtime.set_unavailable(True)
    try:
        with pytest.raises(RuntimeUnavailable):
            sup.container_command(state.id, c.StopContainer(timeout=1), CTX).result(timeout=30)
    finally:
        runtime.set_unavailable(False)
    # the failed stop put the state back: stop works now
    assert sup.container_command(state.id, c.StopContainer(timeout=1), CTX).result(timeout=30).state.status == "exited"


def test_exit_behind_our_back_is_recorded(sup: Supervisor, store: EventStore, runtime: FakeRuntime) -> None:
    state = create(sup)
    runtime.exit_behind_our_back(state.id, 9)
    deadline = time.monotonic() + 5
    while "ContainerExited" not in types(store, state.id):
        assert time.monotonic() < deadline, types(store, state.id)
        time.sleep(0.02)
    exited = store.read_stream(state.id)[-1]
    assert exited.event.exit_code == 9 and exited.meta.principal == "system"


def test_long_exec_does_not_block_kill(sup: Supervisor) -> None:
    state = create(sup)
    long_exec = sup.container_command(state.id, c.ExecInContainer(command=["sleep", "20"]), CTX, output_cap=1024)
    time.sleep(0.2)
    started = time.monotonic()
    killed = sup.container_command(state.id, c.KillContainer(), CTX).result(timeout=10)
    assert time.monotonic() - started < 5
    assert killed.state.status == "exited"
    long_exec.result(timeout=30)  # finishes (the fake kills its execs with the container)


def test_refusals_append_nothing(sup: Supervisor, store: EventStore) -> None:
    state = create(sup, start=False)
    before = store.head()
    with pytest.raises(Conflict):
        sup.container_command(state.id, c.StopContainer(), CTX).result(timeout=10)
    with pytest.raises(ContainerNotFound):
        sup.container_command("nosuchid0000", c.StartContainer(), CTX)
    assert store.head() == before


def test_passivation_and_transparent_reactivation(store: EventStore, runtime: FakeRuntime,
                                                  workers: ThreadPoolExecutor) -> None:
    sup = make(store, runtime, workers, passivate_after=0.2)
    try:
        state = create(sup)
        deadline = time.monotonic() + 5
        while sup.live_actors:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sup.passivations >= 1
        before = sup.activations
        reply = sup.container_command(state.id, c.StopContainer(timeout=1), CTX).result(timeout=10)
        assert reply.state.status == "exited" and sup.activations == before + 1
        assert reply.state.version == len(store.read_stream(state.id))
    finally:
        sup.stop()


def test_concurrent_commands_one_writer(sup: Supervisor, store: EventStore) -> None:
    state = create(sup)
    errors: list[Exception] = []

    def run() -> None:
        for _ in range(10):
            try:
                sup.container_command(state.id, c.ExecInContainer(command=["true"]), CTX,
                                      output_cap=1024).result(timeout=30)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = [r.version for r in store.read_stream(state.id)]
    assert versions == list(range(1, len(versions) + 1))
    assert types(store, state.id).count("ExecFinished") == 60


def test_reconcile_after_a_crash(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor) -> None:
    # a crash left: one create intent the runtime never saw, one that it did, one that exited
    meta = SYSTEM.meta(system_clock, NODE)
    now = rfc3339(system_clock())
    lost = c.ContainerCreateRequested(id="aaaaaaaaaaaa", name="lost", image="host", runtime="fake", created_at=now)
    store.append("aaaaaaaaaaaa", 0, [lost], meta)
    half = c.ContainerCreateRequested(id="bbbbbbbbbbbb", name="half", image="host", runtime="fake",
                                      command=["sleep", "60"], created_at=now)
    store.append("bbbbbbbbbbbb", 0, [half], meta)
    runtime.create(rt.ContainerSpec(berth_id="bbbbbbbbbbbb", node_id=NODE, image="host", command=("sleep", "60")))
    runtime.start("bbbbbbbbbbbb")
    gone = [c.ContainerCreateRequested(id="cccccccccccc", name="gone", image="host", runtime="fake", created_at=now),
            c.ContainerCreated(), c.ContainerStartRequested(), c.ContainerStarted(started_at=now)]
    store.append("cccccccccccc", 0, gone, meta)
    # and a container of this node the log knows nothing of
    runtime.create(rt.ContainerSpec(berth_id="dddddddddddd", node_id=NODE, image="host"))

    sup = make(store, runtime, workers)
    try:
        states = [c.replay(r.event for r in store.read_stream(i))
                  for i in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc")]
        counts = sup.reconcile([s for s in states if s is not None])
        assert counts == {"checked": 3, "failed": 0, "orphans": 1}
        assert types(store, "aaaaaaaaaaaa")[-1] == "ContainerCreateFailed"
        assert types(store, "bbbbbbbbbbbb")[-2:] == ["ContainerCreated", "ContainerStarted"]
        assert types(store, "cccccccccccc")[-1] == "ContainerLost"
        orphans = [r for r in store.read_stream(f"node-{NODE}") if r.type == "OrphanContainerFound"]
        assert [o.event.berth_id for o in orphans] == ["dddddddddddd"]
        runtime.inspect("dddddddddddd")  # left alone
        # a second boot reports nothing new
        assert sup.reconcile([])["orphans"] == 0
    finally:
        sup.stop()


def test_passivation_under_load_never_stalls_commands(store: EventStore, runtime: FakeRuntime,
                                                      workers: ThreadPoolExecutor) -> None:
    """The passivator runs constantly while 16 threads create containers: no request
    stalls, no actor is activated twice (a lock cycle here once cost 40-70 s)."""
    sup = make(store, runtime, workers, passivate_after=0.05)
    slow: list[float] = []
    errors: list[Exception] = []

    def run() -> None:
        for _ in range(4):
            started = time.monotonic()
            try:
                sup.create_container(c.CreateContainer(image="host", command=["true"]), CTX).result(timeout=30)
            except Exception as exc:
                errors.append(exc)
            slow.append(time.monotonic() - started)

    try:
        threads = [threading.Thread(target=run) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert max(slow) < 5, f"slowest create took {max(slow):.1f} s"
        versions: dict[str, list[int]] = {}
        for r in store.read_all(limit=100000):
            versions.setdefault(r.stream_id, []).append(r.version)
        assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
    finally:
        sup.stop()


def test_vanished_container_is_lost_not_a_success(sup: Supervisor, store: EventStore, runtime: FakeRuntime) -> None:
    state = create(sup)
    runtime.vanish(state.id)
    with pytest.raises(Conflict):
        sup.container_command(state.id, c.ExecInContainer(command=["true"]), CTX, output_cap=1024).result(timeout=10)
    # the watcher may record the loss first (then the exec is refused), or the exec meets it
    seen = types(store, state.id)
    assert seen[-1] == "ContainerLost" and "ExecFinished" not in seen


def test_kill_refused_by_the_runtime_is_recorded_and_clears(sup: Supervisor, store: EventStore,
                                                           runtime: FakeRuntime) -> None:
    state = create(sup)
    runtime.fail_next("kill", rt.RuntimeFailure("engine said no"))
    with pytest.raises(RuntimeFailed):
        sup.container_command(state.id, c.KillContainer(signal="TERM"), CTX).result(timeout=10)
    assert types(store, state.id)[-2:] == ["ContainerKillRequested", "ContainerOperationFailed"]
    reply = sup.container_command(state.id, c.StopContainer(timeout=1), CTX).result(timeout=10)
    assert store.read_stream(state.id)[-1].event.reason == "stopped"
    assert reply.state.status == "exited"


@pytest.mark.parametrize("after", [None, 0.3], ids=["fails-at-once", "fails-after-the-exec-ran"])
def test_a_failed_exec_intent_commit_appends_no_outcome_and_answers_the_error(
        after: float | None, store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor) -> None:
    """ExecStarted is committed while the command runs; if that commit fails, the caller
    gets the error, ExecFinished is not appended, and the container works again."""
    faulty = FailingIntent(store, c.ExecStarted, after=after)
    sup = make(faulty, runtime, workers)
    try:
        state = create(sup)
        before = types(store, state.id)
        faulty.arm()
        with pytest.raises(StoreUnavailable, match="injected"):
            sup.container_command(state.id, c.ExecInContainer(command=["true"]), CTX,
                                  output_cap=1024).result(timeout=10)
        time.sleep(after or 0.05)  # let a late outcome try (and fail) to follow
        assert types(store, state.id) == before
        done = sup.container_command(state.id, c.ExecInContainer(command=["true"]), CTX,
                                     output_cap=1024).result(timeout=10)
        assert done.result.result.exit_code == 0
        assert done.state.execs_running == 0
        assert types(store, state.id) == [*before, "ExecStarted", "ExecFinished"]
    finally:
        sup.stop()


def test_pipelined_execs_on_a_durable_log(tmp_path: pathlib.Path, runtime: FakeRuntime,
                                          workers: ThreadPoolExecutor) -> None:
    """On SQLite (group commit): every answered exec has ExecStarted and ExecFinished on
    the log, as another reader of the file sees it."""
    path = tmp_path / "log.db"
    store = open_store(f"sqlite://{path}", EVENT_TYPES)
    sup = make(store, runtime, workers)
    try:
        state = create(sup)
        futures = [sup.container_command(state.id, c.ExecInContainer(command=["true"]), CTX, output_cap=1024)
                   for _ in range(10)]
        assert [f.result(timeout=30).result.result.exit_code for f in futures] == [0] * 10
        reader = open_store(f"sqlite://{path}", EVENT_TYPES)
        try:
            kinds = [r.type for r in reader.read_stream(state.id) if r.type.startswith("Exec")]
        finally:
            reader.close()
        assert sorted(kinds) == ["ExecFinished"] * 10 + ["ExecStarted"] * 10
        assert kinds.count("ExecStarted") == 10
    finally:
        sup.stop()
        store.close()
