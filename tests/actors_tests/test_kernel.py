"""Kernel actors on the fake runtime (whose main commands are real host processes, so the
agent really runs) and the in-memory log: intent then outcome, caps, death, reconnection."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from berthd.actors import CommandContext, Supervisor, system_clock
from berthd.actors.kernel import KernelSupervisor
from berthd.domain import EVENT_TYPES
from berthd.domain import kernel as k
from berthd.domain.errors import (
    Conflict,
    DeadKernel,
    KernelNotFound,
    StoreUnavailable,
    Unprocessable,
)
from berthd.events import open_store
from berthd.events.store import EventStore
from berthd.runtime.base import SandboxNotFound
from berthd.runtime.fake import FakeRuntime
from tests.actors_tests.faults import FailingIntent

CTX = CommandContext(principal="k1", owner="k1", is_admin=False, correlation_id="corr-k")
NODE = "node0kernel0"


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


@pytest.fixture
def containers(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor) -> Iterator[Supervisor]:
    sup = Supervisor(store=store, runtimes={"fake": runtime}, default_runtime="fake", workers=workers,
                     clock=system_clock, node_id=NODE, name_taken=lambda _n: False)
    sup.start()
    yield sup
    sup.stop()


def kernels_for(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor, containers: Supervisor,
                **kw: int) -> KernelSupervisor:
    names: set[str] = set()
    return KernelSupervisor(
        store=store, runtimes={"fake": runtime}, default_runtime="fake", containers=containers,
        workers=workers, clock=system_clock, node_id=NODE, kernel_images={"fake": "host"},
        find_container=lambda ref: containers.container_state(ref), name_taken=names.__contains__, **kw)


@pytest.fixture
def kernels(store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor,
            containers: Supervisor) -> Iterator[KernelSupervisor]:
    sup = kernels_for(store, runtime, workers, containers)
    yield sup
    for state in list(_kernels(store)):
        if state.status != "destroyed":
            try:
                sup.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
            except Exception:
                pass
    sup.stop()


def _kernels(store: EventStore) -> Iterator[k.KernelState]:
    ids = {r.stream_id for r in store.read_all() if r.kind == "kernel"}
    for stream in ids:
        state = k.replay(r.event for r in store.read_stream(stream))
        if state is not None:
            yield state


def types(store: EventStore, stream: str) -> list[str]:
    return [r.type for r in store.read_stream(stream)]


def create(kernels: KernelSupervisor, language: str = "python") -> k.KernelState:
    state: k.KernelState = kernels.create_kernel(k.CreateKernel(language=language), CTX).result(timeout=60).state  # type: ignore[arg-type]
    return state


def run(kernels: KernelSupervisor, kernel_id: str, code: str, **kw: object) -> object:
    return kernels.kernel_command(kernel_id, k.ExecuteCode(code=code, **kw), CTX).result(timeout=60).result  # type: ignore[arg-type]


def test_create_goes_through_the_container_path(kernels: KernelSupervisor, store: EventStore) -> None:
    state = create(kernels)
    assert state.status == "idle" and state.owner == "k1" and state.runtime == "fake"
    assert types(store, state.id) == ["KernelCreateRequested", "KernelStarted"]
    assert types(store, state.container_id) == ["ContainerCreateRequested", "ContainerCreated",
                                                "ContainerStartRequested", "ContainerStarted"]
    result = run(kernels, state.id, "1+1")
    assert result.return_value == "2" and result.status == "ok"  # type: ignore[attr-defined]
    assert types(store, state.id)[-2:] == ["ExecutionStarted", "ExecutionFinished"]
    finished = store.read_stream(state.id)[-1]
    assert finished.event.return_value == "2" and finished.meta.correlation_id == "corr-k"


def test_output_is_capped_on_the_log_not_in_the_answer(store: EventStore, runtime: FakeRuntime,
                                                       workers: ThreadPoolExecutor, containers: Supervisor) -> None:
    kernels = kernels_for(store, runtime, workers, containers, log_cap=100)
    try:
        state = create(kernels)
        result = run(kernels, state.id, "print('a' * 1000)")
        assert len(result.stdout) == 1001 and not result.truncated  # type: ignore[attr-defined]
        finished = store.read_stream(state.id)[-1].event
        assert isinstance(finished, k.ExecutionFinished)
        assert len(finished.stdout) == 100 and finished.truncated
        kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
    finally:
        kernels.stop()


def test_a_dead_sandbox_is_found_at_the_next_execute(kernels: KernelSupervisor, store: EventStore,
                                                     runtime: FakeRuntime) -> None:
    state = create(kernels)
    run(kernels, state.id, "1")
    runtime.exit_behind_our_back(state.container_id, 137)  # the exit hook is not wired here
    with pytest.raises(DeadKernel):
        kernels.kernel_command(state.id, k.ExecuteCode(code="2"), CTX).result(timeout=30)
    assert types(store, state.id)[-3:] == ["ExecutionStarted", "ExecutionFinished", "KernelDied"]
    assert store.read_stream(state.id)[-2].event.status == "dead"
    with pytest.raises(DeadKernel):  # refused at once now, nothing appended
        kernels.kernel_command(state.id, k.ExecuteCode(code="3"), CTX).result(timeout=30)
    assert types(store, state.id)[-1] == "KernelDied"
    # restart starts its container again: a fresh interpreter
    restarted = kernels.kernel_command(state.id, k.RestartKernel(), CTX).result(timeout=60)
    assert restarted.state.status == "idle"
    assert run(kernels, state.id, "5").return_value == "5"  # type: ignore[attr-defined]


def test_restart_does_not_depend_on_the_exit_being_recorded_yet(kernels: KernelSupervisor, containers: Supervisor,
                                                                store: EventStore, runtime: FakeRuntime) -> None:
    """The container's exit notice may still be on its way when a restart asks to start
    the container again (seen under load): the restart has the exit recorded itself."""
    state = create(kernels)
    runtime.watch(lambda _notice: None)  # exit notices are lost: the container's log lags
    runtime.exit_behind_our_back(state.container_id, 137)
    assert containers.container_state(state.container_id).status == "running"  # type: ignore[union-attr]
    restarted = kernels.kernel_command(state.id, k.RestartKernel(), CTX).result(timeout=60)
    assert restarted.state.status == "idle"
    assert run(kernels, state.id, "6 * 7").return_value == "42"  # type: ignore[attr-defined]
    assert types(store, state.container_id)[-3:] == ["ContainerExited", "ContainerStartRequested",
                                                     "ContainerStarted"]


def test_container_exit_is_routed_to_its_kernel(kernels: KernelSupervisor, containers: Supervisor,
                                                store: EventStore, runtime: FakeRuntime) -> None:
    containers.exit_listeners.append(kernels.on_container_exit)
    kernels.kernel_of_container = lambda cid: next(
        (s.id for s in _kernels(store) if s.container_id == cid), None)
    state = create(kernels)
    runtime.exit_behind_our_back(state.container_id, 137)
    deadline = time.monotonic() + 10
    while "KernelDied" not in types(store, state.id):
        assert time.monotonic() < deadline, types(store, state.id)
        time.sleep(0.02)


def test_interrupt_while_running_and_busy_refusal(kernels: KernelSupervisor, store: EventStore) -> None:
    state = create(kernels)
    long = kernels.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(30)"), CTX)
    deadline = time.monotonic() + 5
    while kernels.kernel_command(state.id, k.InterruptKernel(), CTX).result(timeout=10).result is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = long.result(timeout=15).result
    assert result.status == "error" and result.error.ename == "KeyboardInterrupt"
    before = len(types(store, state.id))
    blocker = kernels.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(1)"), CTX)
    waiting = kernels.kernel_command(state.id, k.ExecuteCode(code="1"), CTX)  # waits its turn
    assert blocker.result(timeout=15).result.status == "ok"
    assert waiting.result(timeout=15).result.return_value == "1"
    assert types(store, state.id)[before:] == ["ExecutionStarted", "ExecutionFinished"] * 2


def test_concurrent_executions_queue_in_order(kernels: KernelSupervisor, store: EventStore) -> None:
    state = create(kernels)
    run(kernels, state.id, "order = []")
    first = kernels.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(0.3)\n'first'"), CTX)
    futures = [kernels.kernel_command(state.id, k.ExecuteCode(code=f"order.append({i})\n{i} * 10"), CTX)
               for i in range(8)]
    assert first.result(timeout=30).result.return_value == "'first'"
    assert [f.result(timeout=30).result.return_value for f in futures] == [str(i * 10) for i in range(8)]
    assert run(kernels, state.id, "order").return_value == str(list(range(8)))  # type: ignore[attr-defined]
    kinds = [t for t in types(store, state.id) if t.startswith("Execution")]
    assert kinds == ["ExecutionStarted", "ExecutionFinished"] * 11  # never two at once


def test_a_full_queue_is_refused_and_a_destroy_answers_the_waiting(
        store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor, containers: Supervisor) -> None:
    kernels = kernels_for(store, runtime, workers, containers, queue_depth=2)
    try:
        state = create(kernels)
        running = kernels.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(30)"), CTX)
        waiting = [kernels.kernel_command(state.id, k.ExecuteCode(code=f"{i}"), CTX) for i in range(2)]
        before = store.head()
        with pytest.raises(k.QueueFull) as refused:
            kernels.kernel_command(state.id, k.ExecuteCode(code="3"), CTX).result(timeout=10)
        assert refused.value.status == 429 and refused.value.code == "QUEUE_FULL"
        assert refused.value.details["retry_after"] == 1
        assert store.head() == before  # nothing appended for a refusal
        kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
        for f in waiting:
            with pytest.raises(Conflict, match="destroyed before this code ran"):
                f.result(timeout=10)
        with pytest.raises(Exception):  # noqa: B017 - the running one ends with its kernel, never a success
            running.result(timeout=30)
        assert types(store, state.id).count("ExecutionStarted") == 1
    finally:
        kernels.stop()


def test_an_interrupted_destroy_is_finished_at_boot(store: EventStore, runtime: FakeRuntime,
                                                    workers: ThreadPoolExecutor, containers: Supervisor) -> None:
    first = kernels_for(store, runtime, workers, containers)
    state = create(first)
    first.stop()  # the daemon "dies" right after recording the intent:
    version = len(store.read_stream(state.id))
    store.append(state.id, version, [k.KernelDestroyRequested()], CTX.meta(system_clock, NODE))
    assert runtime.inspect(state.container_id).state == "running"
    second = kernels_for(store, runtime, workers, containers)
    try:
        assert second.reconcile(_kernels(store)) == {"checked": 1, "failed": 0}
        assert types(store, state.id)[-2:] == ["KernelDestroyRequested", "KernelDestroyed"]
        assert types(store, state.container_id)[-1] == "ContainerRemoved"
        with pytest.raises(SandboxNotFound):
            runtime.inspect(state.container_id)
        assert second.reconcile(_kernels(store)) == {"checked": 0, "failed": 0}  # nothing left to do
    finally:
        second.stop()


def test_an_idle_kernel_is_passivated_and_keeps_its_agent(kernels: KernelSupervisor, store: EventStore) -> None:
    state = create(kernels)
    run(kernels, state.id, "x = 41")
    assert kernels.passivate_idle(3600) == 0  # not idle for that long
    assert kernels.passivate_idle(0) == 1 and kernels.live_actors == 0
    activations = kernels.activations
    assert run(kernels, state.id, "x + 1").return_value == "42"  # type: ignore[attr-defined]
    assert kernels.activations == activations + 1
    assert "KernelRestarted" not in types(store, state.id) and types(store, state.id).count("KernelStarted") == 1


def test_a_busy_kernel_is_not_passivated(kernels: KernelSupervisor) -> None:
    state = create(kernels)
    running = kernels.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(0.5)\n7"), CTX)
    assert kernels.passivate_idle(0) == 0 and kernels.live_actors == 1
    assert running.result(timeout=30).result.return_value == "7"


def test_a_passivated_kernel_hears_of_its_container_exit(kernels: KernelSupervisor, containers: Supervisor,
                                                         store: EventStore, runtime: FakeRuntime) -> None:
    containers.exit_listeners.append(kernels.on_container_exit)
    kernels.kernel_of_container = lambda cid: next(
        (s.id for s in _kernels(store) if s.container_id == cid), None)
    state = create(kernels)
    assert kernels.passivate_idle(0) == 1
    runtime.exit_behind_our_back(state.container_id, 137)
    deadline = time.monotonic() + 10
    while "KernelDied" not in types(store, state.id):
        assert time.monotonic() < deadline, types(store, state.id)
        time.sleep(0.02)


def test_state_survives_a_new_supervisor_and_open_executions_are_finished(
        store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor, containers: Supervisor) -> None:
    first = kernels_for(store, runtime, workers, containers)
    state = create(first)
    run(first, state.id, "x = 41")
    first.kernel_command(state.id, k.ExecuteCode(code="import time\ntime.sleep(0.5)\nprint('late')"), CTX)
    time.sleep(0.1)
    first.stop()  # the daemon "dies": the running execution is not recorded by it
    assert types(store, state.id)[-1] == "ExecutionStarted"
    second = kernels_for(store, runtime, workers, containers)
    try:
        assert second.reconcile(_kernels(store)) == {"checked": 1, "failed": 0}
        deadline = time.monotonic() + 10
        while types(store, state.id)[-1] != "ExecutionFinished":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert store.read_stream(state.id)[-1].event.stdout == "late\n"
        assert run(second, state.id, "x + 1").return_value == "42"  # type: ignore[attr-defined]
        second.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
    finally:
        second.stop()


def test_destroy_removes_its_own_container(kernels: KernelSupervisor, store: EventStore) -> None:
    state = create(kernels)
    reply = kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
    assert reply.state.status == "destroyed"
    assert types(store, state.id)[-2:] == ["KernelDestroyRequested", "KernelDestroyed"]
    assert types(store, state.container_id)[-1] == "ContainerRemoved"


def test_unknown_kernel_and_join_without_shared_dir_are_refused(kernels: KernelSupervisor,
                                                               containers: Supervisor, store: EventStore) -> None:
    with pytest.raises(KernelNotFound):
        kernels.kernel_command("nope", k.ExecuteCode(code="1"), CTX)
    from berthd.domain import container as c
    box = containers.create_container(c.CreateContainer(image="host", command=["sleep", "30"]), CTX,
                                      berth_dir=False).result(timeout=30).state
    before = store.head()
    with pytest.raises(Unprocessable):  # no shared directory for the agent's socket
        kernels.create_kernel(k.CreateKernel(container=box.id), CTX)
    assert store.head() == before
    containers.container_command(box.id, c.RemoveContainer(force=True), CTX).result(timeout=30)


def test_concurrent_creates_with_one_name_one_wins(kernels: KernelSupervisor) -> None:
    errors: list[BaseException] = []
    done: list[k.KernelState] = []

    def go() -> None:
        try:
            done.append(kernels.create_kernel(k.CreateKernel(name="same"), CTX).result(timeout=60).state)
        except Conflict as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 1 and len(errors) == 1


# ---------------------------------------------------------------------- pipelined intent


@pytest.mark.parametrize("after", [None, 0.3], ids=["fails-at-once", "fails-after-the-code-ran"])
def test_a_failed_intent_commit_appends_no_outcome_and_answers_the_error(
        after: float | None, store: EventStore, runtime: FakeRuntime, workers: ThreadPoolExecutor,
        containers: Supervisor) -> None:
    """ExecutionStarted is committed while the code runs; if that commit fails, the
    caller gets the error, ExecutionFinished is not appended (whether the outcome came
    before or after the failure), and the kernel works again from its log."""
    faulty = FailingIntent(store, k.ExecutionStarted, after=after)
    kernels = kernels_for(faulty, runtime, workers, containers)
    try:
        state = create(kernels)
        before = types(store, state.id)
        faulty.arm()
        with pytest.raises(StoreUnavailable, match="injected"):
            run(kernels, state.id, "x = 1\n1+1")
        assert faulty.failed == 1
        time.sleep(after or 0.05)  # let a late outcome try (and fail) to follow
        assert types(store, state.id) == before
        result = run(kernels, state.id, "2+2")
        assert result.return_value == "4"  # type: ignore[attr-defined]
        assert types(store, state.id) == [*before, "ExecutionStarted", "ExecutionFinished"]
        kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
    finally:
        kernels.stop()


def test_pipelined_executions_on_a_durable_log(tmp_path: pathlib.Path, runtime: FakeRuntime,
                                               workers: ThreadPoolExecutor) -> None:
    """On SQLite (group commit, commits really pending while the code runs): every
    answered execution has its intent and its outcome on the log, in order, as another
    reader of the file sees it."""
    path = tmp_path / "log.db"
    store = open_store(f"sqlite://{path}", EVENT_TYPES)
    containers = Supervisor(store=store, runtimes={"fake": runtime}, default_runtime="fake", workers=workers,
                            clock=system_clock, node_id=NODE, name_taken=lambda _n: False)
    containers.start()
    kernels = kernels_for(store, runtime, workers, containers)
    try:
        state = create(kernels)
        futures = [kernels.kernel_command(state.id, k.ExecuteCode(code=f"{i} * 2"), CTX) for i in range(10)]
        answers = [f.result(timeout=60).result.return_value for f in futures]  # type: ignore[union-attr]
        assert answers == [str(i * 2) for i in range(10)]
        reader = open_store(f"sqlite://{path}", EVENT_TYPES)
        try:
            events = [r.event for r in reader.read_stream(state.id)][2:]
        finally:
            reader.close()
        assert [type(e).__name__ for e in events] == ["ExecutionStarted", "ExecutionFinished"] * 10
        assert [e.return_value for e in events[1::2]] == answers
        assert all(a.result_id == b.result_id for a, b in zip(events[0::2], events[1::2], strict=True))
        kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
    finally:
        kernels.stop()
        containers.stop()
        store.close()
