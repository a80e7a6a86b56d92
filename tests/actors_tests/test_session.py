"""Session actors on the fake runtime (real kernel agents as host processes) and the
in-memory log, with a clock advanced by hand: the kernel opened on demand, code and
commands, denial, retry, expiry at a command and by the supervisor, close."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import freezegun
import pytest

from berthd.actors import Clock, CommandContext, Reply, Supervisor, system_clock
from berthd.actors.kernel import KernelSupervisor
from berthd.actors.session import SessionOutcome, SessionSupervisor
from berthd.domain import EVENT_TYPES
from berthd.domain import kernel as k
from berthd.domain import session as se
from berthd.domain.errors import Conflict, ExpiredSession, PolicyDenied, SessionNotFound
from berthd.events import open_store
from berthd.events.store import EventStore
from berthd.runtime.fake import FakeRuntime

CTX = CommandContext(principal="k1", owner="k1", is_admin=False, correlation_id="corr-s")
NODE = "node0session"


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(request: pytest.FixtureRequest) -> Clock:
    """A ``ManualClock``; ``system`` (indirect parametrization): the real one, for freezegun."""
    return system_clock if getattr(request, "param", "manual") == "system" else ManualClock()


@pytest.fixture
def store() -> Iterator[EventStore]:
    s = open_store("memory", EVENT_TYPES)
    yield s
    s.close()


@pytest.fixture
def sessions(store: EventStore, clock: ManualClock) -> Iterator[SessionSupervisor]:
    runtime = FakeRuntime(NODE)
    workers = ThreadPoolExecutor(max_workers=32)
    containers = Supervisor(store=store, runtimes={"fake": runtime}, default_runtime="fake", workers=workers,
                            clock=clock, node_id=NODE, name_taken=lambda _n: False)
    containers.start()
    kernels = KernelSupervisor(
        store=store, runtimes={"fake": runtime}, default_runtime="fake", containers=containers,
        workers=workers, clock=clock, node_id=NODE, kernel_images={"fake": "host"},
        find_container=lambda ref: containers.container_state(ref), name_taken=lambda _n: False)
    sup = SessionSupervisor(store=store, kernels=kernels, containers=containers, workers=workers, clock=clock,
                            node_id=NODE, name_taken=lambda _n: False, active=lambda: _states(store))
    yield sup
    sup.stop()
    for state in _kernels(store):
        if state.status != "destroyed":
            try:
                kernels.kernel_command(state.id, k.DestroyKernel(), CTX).result(timeout=30)
            except Exception:
                pass
    kernels.stop()
    containers.stop()
    workers.shutdown(wait=False, cancel_futures=True)
    runtime.close()


def _states(store: EventStore) -> list[se.SessionState]:
    ids = {r.stream_id for r in store.read_all() if r.kind == "session"}
    out = [se.replay(r.event for r in store.read_stream(i)) for i in ids]
    return [s for s in out if s is not None and s.status == "active"]


def _kernels(store: EventStore) -> list[k.KernelState]:
    ids = {r.stream_id for r in store.read_all() if r.kind == "kernel"}
    out = [k.replay(r.event for r in store.read_stream(i)) for i in ids]
    return [s for s in out if s is not None]


def types(store: EventStore, stream: str) -> list[str]:
    return [r.type for r in store.read_stream(stream)]


def open_session(sessions: SessionSupervisor, **kw: object) -> se.SessionState:
    state: se.SessionState = sessions.create_session(
        se.CreateSession(**kw), CTX).result(timeout=30).state  # type: ignore[arg-type]
    return state


def ask(sessions: SessionSupervisor, sid: str, command: se.Command) -> Reply:
    return sessions.session_command(sid, command, CTX).result(timeout=60)


def run(sessions: SessionSupervisor, sid: str, **kw: object) -> SessionOutcome:
    outcome: SessionOutcome = ask(sessions, sid, se.ExecuteInSession(**kw)).result  # type: ignore[arg-type]
    return outcome


def test_kernel_opens_on_demand_and_keeps_state(sessions: SessionSupervisor, store: EventStore,
                                                clock: ManualClock) -> None:
    s = open_session(sessions, ttl_seconds=60)
    assert s.owner == "k1" and s.expires_at == "2026-01-01T00:01:00.000Z" and s.kernel_id is None
    assert types(store, s.id) == ["SessionOpened"]
    clock.advance(10)
    first = run(sessions, s.id, code="x = 41")
    assert first.result.status == "ok" and first.executed_at == "2026-01-01T00:00:10.000Z"
    assert run(sessions, s.id, code="x + 1").result.return_value == "42"
    assert types(store, s.id) == ["SessionOpened", "SessionKernelAttached", "CommandExecuted", "CommandExecuted"]
    state = sessions._get(s.id).proxy().get_state().get()
    assert state.commands_executed == 2 and state.expires_at == "2026-01-01T00:01:10.000Z"
    assert state.kernel_id is not None
    executed = store.read_stream(s.id)[-1]
    assert executed.meta.correlation_id == "corr-s" and executed.event.result_id  # type: ignore[attr-defined]


def test_concurrent_executions_queue_and_share_one_kernel(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions, policy=se.Policy(allow=["echo"]))
    first = sessions.session_command(s.id, se.ExecuteInSession(code="order = []"), CTX)
    futures = [sessions.session_command(s.id, se.ExecuteInSession(code=f"order.append({i})\n{i}"), CTX)
               for i in range(10)]
    command = sessions.session_command(s.id, se.ExecuteInSession(command=["echo", "in turn"]), CTX)
    assert first.result(timeout=60).result.result.status == "ok"
    assert [f.result(timeout=60).result.result.return_value for f in futures] == [str(i) for i in range(10)]
    assert command.result(timeout=60).result.result.stdout == "in turn\n"
    assert run(sessions, s.id, code="order").result.return_value == str(list(range(10)))
    assert types(store, s.id).count("SessionKernelAttached") == 1
    assert types(store, s.id).count("CommandExecuted") == 13
    assert len(_kernels(store)) == 1


def test_a_full_session_queue_is_refused(sessions: SessionSupervisor, store: EventStore,
                                         clock: ManualClock) -> None:
    small = SessionSupervisor(store=store, kernels=sessions.kernels, containers=sessions.containers,
                              workers=sessions.workers, clock=clock, node_id=NODE, name_taken=lambda _n: False,
                              active=lambda: _states(store), queue_depth=1)
    try:
        s = small.create_session(se.CreateSession(), CTX).result(timeout=30).state
        running = small.session_command(s.id, se.ExecuteInSession(code="import time\ntime.sleep(1)\n1"), CTX)
        waiting = small.session_command(s.id, se.ExecuteInSession(code="2"), CTX)
        with pytest.raises(k.QueueFull):
            small.session_command(s.id, se.ExecuteInSession(code="3"), CTX).result(timeout=10)
        assert running.result(timeout=60).result.result.return_value == "1"
        assert waiting.result(timeout=60).result.result.return_value == "2"
        small.session_command(s.id, se.CloseSession(), CTX).result(timeout=60)
        assert types(store, s.id) == ["SessionOpened", "SessionKernelAttached", "CommandExecuted",
                                      "CommandExecuted", "SessionClosed"]  # the refusal left no trace
    finally:
        small.stop()


def test_close_answers_the_waiting(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions)
    running = sessions.session_command(s.id, se.ExecuteInSession(code="import time\ntime.sleep(0.5)\n1"), CTX)
    waiting = sessions.session_command(s.id, se.ExecuteInSession(code="2"), CTX)
    ask(sessions, s.id, se.CloseSession())
    with pytest.raises(Conflict, match="closed"):
        waiting.result(timeout=30)
    with pytest.raises(Exception):  # noqa: B017 - its kernel is destroyed under it: never a success
        running.result(timeout=30)
    assert types(store, s.id).count("CommandExecuted") == 0


def test_a_kernel_destroyed_from_outside_is_replaced(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions, policy=se.Policy(allow=["echo"]))
    run(sessions, s.id, code="x = 1")
    old = sessions._get(s.id).proxy().get_state().get()
    sessions.kernels.kernel_command(old.kernel_id, k.DestroyKernel(), CTX).result(timeout=30)
    fresh = run(sessions, s.id, code="'x' in dir()")
    assert fresh.result.status == "ok" and fresh.result.return_value == "False"  # a new interpreter
    now = sessions._get(s.id).proxy().get_state().get()
    assert now.kernel_id not in (None, old.kernel_id) and now.container_id != old.container_id
    assert types(store, s.id)[-3:] == ["SessionKernelLost", "SessionKernelAttached", "CommandExecuted"]
    lost = store.read_stream(s.id)[-3].event
    assert isinstance(lost, se.SessionKernelLost) and lost.kernel_id == old.kernel_id
    assert "destroyed" in lost.reason
    # a command runs in the new kernel's sandbox
    assert run(sessions, s.id, command=["echo", "ok"]).result.stdout == "ok\n"


def test_a_dead_kernel_is_replaced_and_its_sandbox_removed(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions)
    run(sessions, s.id, code="1")
    old = sessions._get(s.id).proxy().get_state().get()
    runtime = sessions.kernels.runtimes["fake"]
    runtime.exit_behind_our_back(old.container_id, 137)  # type: ignore[attr-defined]
    # the kernel finds out at its next execution (the exit hook is not wired here)
    with pytest.raises(Conflict):
        sessions.kernels.kernel_command(old.kernel_id, k.ExecuteCode(code="2"), CTX).result(timeout=30)
    assert run(sessions, s.id, code="3").result.return_value == "3"
    assert "SessionKernelLost" in types(store, s.id)
    assert _wait(lambda: types(store, old.kernel_id)[-1] == "KernelDestroyed")


def test_a_close_cut_short_by_a_crash_is_finished_at_boot(sessions: SessionSupervisor, store: EventStore,
                                                         clock: ManualClock) -> None:
    s = open_session(sessions)
    run(sessions, s.id, code="1")
    kernel_id = sessions._get(s.id).proxy().get_state().get().kernel_id
    sessions.stop()  # the daemon "dies" just after recording the close:
    version = len(store.read_stream(s.id))
    store.append(s.id, version, [se.SessionClosed(at="2026-01-01T00:00:00.000Z")], CTX.meta(clock, NODE))
    assert types(store, kernel_id)[-1] == "ExecutionFinished"

    def ended() -> list[se.SessionState]:
        ids = {r.stream_id for r in store.read_all() if r.kind == "session"}
        states = [se.replay(r.event for r in store.read_stream(i)) for i in ids]
        return [x for x in states if x is not None and x.status in se.FINAL]

    again = SessionSupervisor(store=store, kernels=sessions.kernels, containers=sessions.containers,
                              workers=sessions.workers, clock=clock, node_id=NODE, name_taken=lambda _n: False,
                              active=lambda: _states(store), ended=ended)
    try:
        again.start()
        assert again.kernels_closed == 1
        assert types(store, kernel_id)[-2:] == ["KernelDestroyRequested", "KernelDestroyed"]
        container_id = next(x.container_id for x in _kernels(store) if x.id == kernel_id)
        assert types(store, container_id)[-1] == "ContainerRemoved"
        assert again.close_kernels_of_ended() == 0  # done once
    finally:
        again.stop()


def test_a_passivated_session_comes_back_and_still_expires(sessions: SessionSupervisor, store: EventStore,
                                                           clock: ManualClock) -> None:
    s = open_session(sessions, ttl_seconds=60)
    run(sessions, s.id, code="y = 5")
    assert sessions.passivate_idle(0) == 1 and sessions.live_actors == 0
    assert run(sessions, s.id, code="y").result.return_value == "5"  # activated again, same kernel
    assert types(store, s.id).count("SessionKernelAttached") == 1
    kernel_id = sessions._get(s.id).proxy().get_state().get().kernel_id
    assert sessions.passivate_idle(0) == 1 and sessions.live_actors == 0
    clock.advance(61)
    assert sessions.expire_due() == 1  # due sessions come from the log's view, not from live actors
    assert types(store, s.id)[-1] == "SessionExpired"
    assert types(store, kernel_id)[-1] == "KernelDestroyed"


def test_commands_run_in_the_sandbox_and_are_stored(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions, policy=se.Policy(allow=["sh -c", "echo"]))
    ok = run(sessions, s.id, command=["echo", "hi"]).result
    assert (ok.status, ok.stdout, ok.exit_code, ok.return_value, ok.error) == ("ok", "hi\n", 0, None, None)
    bad = run(sessions, s.id, command=["sh", "-c", "exit 4"]).result
    assert bad.status == "error" and bad.exit_code == 4 and bad.execution_count == 2
    last = store.read_stream(s.id)[-1].event
    assert isinstance(last, se.CommandExecuted)
    assert last.mode == "command" and last.command == ["sh", "-c", "exit 4"] and last.exit_code == 4
    assert last.result_id == bad.result_id

    before = types(store, s.id)
    with pytest.raises(PolicyDenied):
        ask(sessions, s.id, se.ExecuteInSession(command=["rm", "-rf", "/"]))
    assert types(store, s.id) == [*before, "CommandDenied"]


def test_retry_runs_the_fix_up_between_attempts(sessions: SessionSupervisor) -> None:
    s = open_session(sessions)
    reply = ask(sessions, s.id, se.ExecuteWithRetry(code="x + 1", on_error_code="x = 41", max_attempts=3))
    outcome: SessionOutcome = reply.result
    assert outcome.result.return_value == "42" and outcome.attempts is not None
    assert [a.result.status for a in outcome.attempts] == ["error", "ok"]
    reply = ask(sessions, s.id, se.ExecuteWithRetry(code="1/0", max_attempts=3))
    assert [a.result.status for a in reply.result.attempts] == ["error"] * 3
    assert reply.result.result.error.ename == "ZeroDivisionError"


def test_a_command_after_expires_at_expires_the_session(sessions: SessionSupervisor, store: EventStore,
                                                        clock: ManualClock) -> None:
    s = open_session(sessions, ttl_seconds=30)
    run(sessions, s.id, code="1")
    kernel_id = sessions._get(s.id).proxy().get_state().get().kernel_id
    clock.advance(29)
    run(sessions, s.id, code="2")  # activity: expires 30 s from now
    clock.advance(29)
    run(sessions, s.id, code="3")
    clock.advance(30)
    with pytest.raises(ExpiredSession):
        ask(sessions, s.id, se.ExecuteInSession(code="4"))
    assert types(store, s.id)[-1] == "SessionExpired"
    assert _wait(lambda: types(store, kernel_id)[-1] == "KernelDestroyed")
    with pytest.raises(ExpiredSession):  # refused, nothing more appended
        ask(sessions, s.id, se.ExecuteInSession(code="5"))
    assert types(store, s.id)[-1] == "SessionExpired"


def test_the_supervisor_expires_due_sessions(sessions: SessionSupervisor, store: EventStore,
                                             clock: ManualClock) -> None:
    short = open_session(sessions, ttl_seconds=5)
    long = open_session(sessions, ttl_seconds=500)
    run(sessions, short.id, code="1")
    kernel_id = sessions._get(short.id).proxy().get_state().get().kernel_id
    assert sessions.expire_due() == 0
    clock.advance(6)
    assert sessions.expire_due() == 1  # it waits for the kernel to close
    assert types(store, short.id)[-1] == "SessionExpired"
    assert types(store, kernel_id)[-1] == "KernelDestroyed"
    assert types(store, long.id) == ["SessionOpened"]
    assert sessions.expire_due() == 0


def test_a_session_running_code_past_its_ttl_is_not_expired_under_it(
        sessions: SessionSupervisor, store: EventStore, clock: ManualClock) -> None:
    s = open_session(sessions, ttl_seconds=5)
    run(sessions, s.id, code="import time")
    running = sessions.session_command(s.id, se.ExecuteInSession(code="time.sleep(1.5); 'done'"), CTX)
    queued = sessions.session_command(s.id, se.ExecuteInSession(code="'next'"), CTX)
    time.sleep(0.3)
    clock.advance(60)  # long past expires_at while the code runs and the next one waits
    assert sessions.expire_due() == 0
    assert running.result(timeout=30).result.result.return_value == "'done'"
    assert queued.result(timeout=30).result.result.return_value == "'next'"
    assert "SessionExpired" not in types(store, s.id)
    state = sessions._get(s.id).proxy().get_state().get()
    assert state.status == "active" and state.expires_at == "2026-01-01T00:01:05.000Z"
    clock.advance(5)  # idle for its TTL after the last activity: now it expires
    assert sessions.expire_due() == 1


def test_close_destroys_the_kernel(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions)
    run(sessions, s.id, code="1")
    reply = ask(sessions, s.id, se.CloseSession())
    assert reply.state.status == "closed"
    kernel_id = reply.state.kernel_id
    assert types(store, kernel_id)[-1] == "KernelDestroyed"
    assert ask(sessions, s.id, se.CloseSession()).state.status == "closed"  # nothing more happens
    with pytest.raises(Conflict):
        ask(sessions, s.id, se.ExecuteInSession(code="1"))
    with pytest.raises(SessionNotFound):
        sessions.session_command("nope", se.CloseSession(), CTX)


def test_state_comes_back_from_the_log(sessions: SessionSupervisor, store: EventStore) -> None:
    s = open_session(sessions, name="again")
    run(sessions, s.id, code="z = 7")
    sessions.stop()  # actors go; a new one replays the stream
    assert run(sessions, s.id, code="z").result.return_value == "7"
    assert types(store, s.id).count("SessionKernelAttached") == 1


@pytest.mark.parametrize("clock", ["system"], indirect=True)
def test_expiry_under_freezegun(sessions: SessionSupervisor, store: EventStore) -> None:
    """The daemon's own clock, frozen and moved by freezegun (pykka's threads left alone)."""
    with freezegun.freeze_time("2026-03-01T12:00:00Z", ignore=["pykka"]) as frozen:
        s = open_session(sessions, ttl_seconds=60)
        assert s.expires_at == "2026-03-01T12:01:00.000Z"
        frozen.tick(timedelta(seconds=59))
        assert sessions.expire_due() == 0
        frozen.tick(timedelta(seconds=1))
        assert sessions.expire_due() == 1
        expired = store.read_stream(s.id)[-1].event
        assert isinstance(expired, se.SessionExpired) and expired.at == "2026-03-01T12:01:00.000Z"


def _wait(fn: object, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False
