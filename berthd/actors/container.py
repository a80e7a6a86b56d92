"""``ContainerActor``: the one writer of a container's stream.

``decide`` (pure) turns a command into the intent event, which is appended before the
runtime is touched; the runtime call runs on a worker thread, off the mailbox, and its
outcome comes back to the actor as a message, which appends the outcome event and
completes the caller's future. So a long exec never blocks ``stop`` or ``kill``: the
mailbox is only ever busy for the time of an append.

An exec is pipelined: its command starts while ``ExecStarted`` is being committed, the
mailbox does not wait for ``ExecFinished``'s commit either, and the caller is answered
(from the store's writer thread) once both are durable. If ``ExecStarted`` cannot be
committed, ``ExecFinished`` is not appended and the caller gets the error, although the
command may have run: that window only holds execs nobody was told about. The actor's
state is then ahead of its log, so it stops; the next command activates it again from
the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import pykka

from berthd.actors._registry import EntityActor, Retired
from berthd.actors._stream import append_evolved, append_evolved_async, when_durable
from berthd.actors.context import (
    SYSTEM,
    Clock,
    CommandContext,
    Reply,
    check_if_match,
    new_id,
    rfc3339,
    settle,
)
from berthd.domain import container as c
from berthd.domain.base import Command, Event
from berthd.domain.errors import (
    BerthdError,
    Conflict,
    ImageNotFound,
    RuntimeFailed,
    RuntimeUnavailable,
    StoreUnavailable,
    for_code,
)
from berthd.events.store import EventStore
from berthd.events.store import StoreUnavailable as StoreDown
from berthd.kernel.exec_agent import exec_agents
from berthd.runtime import base as rt

__all__ = ["POOL_LABEL", "ContainerActor", "ExecOutcome", "Retired", "map_runtime_error"]

POOL_LABEL = "berth.pool"
"""Label on every sandbox the warm pool made (``berthd.actors.pool``)."""

log = logging.getLogger(__name__)


def map_runtime_error(exc: BaseException) -> BerthdError:
    """A runtime exception as the error a client should see."""
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, rt.RuntimeUnavailable):
        return RuntimeUnavailable(f"the runtime is unavailable: {exc}; retry when it is back")
    if isinstance(exc, rt.ImageMissing):
        return ImageNotFound(f"{exc}; pull the image first (POST /v1/images/pull)")
    if isinstance(exc, rt.SandboxNotFound):
        return Conflict(f"the container is gone from the runtime: {exc}")
    if isinstance(exc, rt.RuntimeError_) and (client := for_code(exc.code, str(exc), **exc.details)):
        return client  # a refusal that is the client's fault (a missing file, a forbidden path)
    if isinstance(exc, rt.RuntimeError_):
        return RuntimeFailed(str(exc))
    return RuntimeFailed(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class ExecOutcome:
    exec_id: str
    result: rt.ExecResult


@dataclass(slots=True)
class _Done:
    """A worker finished a runtime call; ``then`` turns its result into events."""

    value: Any
    error: BaseException | None
    then: Callable[[Any, BaseException | None], list[Event]]
    future: Future[Reply] | None
    ctx: CommandContext
    result_of: Callable[[Any], Any] | None = None
    missing_ok: bool = False  # SandboxNotFound is this operation's own outcome (stop, kill, remove)
    intent: Future[int] | None = None  # the intent's commit, not waited for (exec)


@dataclass(slots=True)
class _Observed:
    """The runtime's view of the container, fetched off the mailbox."""

    status: rt.SandboxStatus | None  # None: the runtime does not have it
    error: BaseException | None


class ContainerActor(EntityActor):
    """One container's behaviour; its state is rebuilt from its stream on activation."""

    kind = "container"

    def __init__(
        self,
        stream_id: str,
        state: c.ContainerState | None,
        *,
        store: EventStore,
        runtimes: dict[str, rt.Runtime],
        workers: Executor,
        clock: Clock,
        node_id: str,
        position: int = 0,
    ) -> None:
        super().__init__(stream_id, workers)
        self.state = state
        self.store = store
        self.runtimes = runtimes
        self.clock = clock
        self.node_id = node_id
        self.last_position = position

    # ------------------------------------------------------------------ asked by others

    def get_state(self) -> c.ContainerState | None:
        return self.state

    def is_idle(self) -> bool:
        s = self.state
        return super().is_idle() and (s is None or (s.pending is None and s.execs_running == 0))

    def handle(self, command: Command, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Decide, append the intent, start the side effect; the future completes with
        the outcome. Refusals complete it with the ``BerthdError`` at once."""
        self.touch()
        future: Future[Reply] = Future()
        try:
            ctx = check_if_match(ctx, self.state)
            self._handle(command, ctx, future, extra)
        except BaseException as exc:  # never let a command kill the actor
            if not future.done():
                future.set_exception(_as_error(exc))
        return future

    def observe(self) -> None:
        """Look at the runtime and record what changed (an exit, a vanished container)."""
        if self.retired:
            raise Retired(self.stream_id)
        s = self.state
        if s is None or s.status in c.FINAL or s.status == "creating":
            return
        runtime = self.runtimes.get(s.runtime)
        if runtime is None:
            return
        self._submit_observe(runtime)

    def reconcile(self) -> Future[Reply]:
        """Boot-time check: finish what a crash left half-done, record what changed."""
        if self.retired:
            raise Retired(self.stream_id)
        future: Future[Reply] = Future()
        s = self.state
        try:
            if s is None or s.status in c.FINAL:
                future.set_result(Reply(self.last_position, s))
            else:
                runtime = self._runtime()
                self._run(lambda: _inspect_or_none(runtime, s.id), self._after_reconcile,
                          future, SYSTEM)
        except BaseException as exc:
            future.set_exception(_as_error(exc))
        return future

    # ------------------------------------------------------------------ messages

    def on_message(self, message: Any) -> None:
        if isinstance(message, _Done):
            if self.retired:  # its state is ahead of the log: it must not append
                self.in_flight -= 1
                _settle(message.future, None, Conflict("the container's actor restarted; retry"))
            elif message.intent is not None:
                self._finish_pipelined(message)
            else:
                self._finish(message)
        elif isinstance(message, _Observed):
            self._record_observed(message)

    # ------------------------------------------------------------------ internals

    def _runtime(self) -> rt.Runtime:
        assert self.state is not None
        runtime = self.runtimes.get(self.state.runtime)
        if runtime is None:
            raise RuntimeUnavailable(f"runtime {self.state.runtime} is not enabled on this node")
        return runtime

    def _append(self, events: list[Event], ctx: CommandContext) -> int:
        if not events:
            return self.last_position
        self.state, self.last_position = append_evolved(
            self.store, self.stream_id, "container", self.state, events,
            ctx.meta(self.clock, self.node_id), c.evolve)
        return self.last_position

    def _append_async(self, events: list[Event], ctx: CommandContext) -> Future[int]:
        """Evolve at once, commit without waiting; on a failure the actor stops (its
        state is ahead of the log) and the next command activates it again."""
        self.state, committed = append_evolved_async(
            self.store, self.stream_id, "container", self.state, events,
            ctx.meta(self.clock, self.node_id), c.evolve)
        self.watch_commit(committed)  # a failure stops the actor (EntityActor.resync)

        def done(f: Future[int]) -> None:
            if f.exception() is None:
                self.last_position = max(self.last_position, f.result())

        committed.add_done_callback(done)
        return committed

    def _run(
        self,
        call: Callable[[], Any],
        then: Callable[[Any, BaseException | None], list[Event]],
        future: Future[Reply] | None,
        ctx: CommandContext,
        result_of: Callable[[Any], Any] | None = None,
        missing_ok: bool = False,
        intent: Future[int] | None = None,
    ) -> None:
        """Run ``call`` on a worker; its outcome comes back as a message."""
        self.in_flight += 1
        ref = self.actor_ref

        def work() -> None:
            try:
                value, error = call(), None
            except BaseException as exc:
                value, error = None, exc
            try:
                ref.tell(_Done(value, error, then, future, ctx, result_of, missing_ok, intent))
            except pykka.ActorDeadError:
                if future is not None and not future.done():
                    future.set_exception(Conflict("the container's actor stopped; retry"))

        self.workers.submit(work)

    def _finish(self, done: _Done) -> None:
        self.in_flight -= 1
        vanished = isinstance(done.error, rt.SandboxNotFound) and not done.missing_ok
        try:
            events = done.then(done.value, done.error)
            if vanished and self.state is not None and self.state.status not in c.FINAL:
                events = [*events, c.ContainerLost(reason=f"vanished from the runtime: {done.error}")]
            position = self._append(events, done.ctx)
        except BaseException as exc:
            if done.future is not None and not done.future.done():
                done.future.set_exception(_as_error(exc))
            return
        if done.future is None or done.future.done():
            return
        if vanished:
            done.future.set_exception(Conflict(
                f"container {self.stream_id} vanished from the runtime; it is now 'lost'",
                id=self.stream_id, status="lost"))
            return
        if done.error is not None and not isinstance(done.error, rt.SandboxNotFound) \
                and not self._reached(done):
            # the failure is recorded; the caller gets the error
            done.future.set_exception(map_runtime_error(done.error))
            return
        result = done.result_of(done.value) if done.result_of else None
        if self._chain_start(done, position):
            return
        done.future.set_result(Reply(position, self.state, result))

    def _finish_pipelined(self, done: _Done) -> None:
        """An exec's outcome: appended without waiting; the caller is answered once it
        and its intent are durable (see the module docstring)."""
        self.in_flight -= 1
        intent = done.intent
        assert intent is not None
        if intent.done() and intent.exception() is not None:  # not on the log: no outcome either
            _settle(done.future, None, intent.exception())
            return
        vanished = isinstance(done.error, rt.SandboxNotFound)
        try:
            events = done.then(done.value, done.error)
            if vanished and self.state is not None and self.state.status not in c.FINAL:
                events = [*events, c.ContainerLost(reason=f"vanished from the runtime: {done.error}")]
            committed = self._append_async(events, done.ctx)
            result = done.result_of(done.value) if done.result_of and done.error is None else None
        except BaseException as exc:
            _settle(done.future, None, _as_error(exc))
            return
        state, error = self.state, done.error

        def answer(position: int, err: BaseException | None) -> None:
            if err is not None:
                _settle(done.future, None, err)
            elif vanished:
                _settle(done.future, None, Conflict(
                    f"container {self.stream_id} vanished from the runtime; it is now 'lost'",
                    id=self.stream_id, status="lost"))
            elif error is not None:
                _settle(done.future, None, map_runtime_error(error))
            else:
                _settle(done.future, Reply(position, state, result), None)

        when_durable(intent, committed, answer)

    def _reached(self, done: _Done) -> bool:
        """A stop that failed because the process had already ended did what was asked."""
        return done.then == self._after_stop and self.state is not None and self.state.status == "exited"

    def _chain_start(self, done: _Done, position: int) -> bool:
        """After a create with ``start: true``, go on with the start in the same request."""
        s = self.state
        if s is None or s.status != "created" or not s.start or done.then != self._after_create:
            return False
        self._start(done.ctx, done.future)
        return True

    def _handle(self, command: Command, ctx: CommandContext, future: Future[Reply], extra: dict[str, Any]) -> None:
        s = self.state
        now = rfc3339(self.clock())
        fresh_id = extra.get("new_id") or (new_id() if isinstance(command, c.ExecInContainer) else self.stream_id)
        events = c.decide(s, command, now=now, new_id=fresh_id,
                          owner=ctx.owner, runtime=extra.get("runtime", ""), name=extra.get("name", ""))
        if isinstance(command, c.CreateContainer):
            self._append(events, ctx)
            spec = _spec(self.state, self.node_id, extra.get("network", True),
                         bool(extra.get("berth_dir", False)))
            runtime = self._runtime()
            self._run(lambda: runtime.create(spec), self._after_create, future, ctx)
        elif isinstance(command, c.StartContainer):
            self._start(ctx, future, events)
        elif isinstance(command, c.StopContainer):
            self._append(events, ctx)
            runtime = self._runtime()
            timeout = command.timeout
            self._run(lambda: runtime.stop(self.stream_id, timeout), self._after_stop, future, ctx,
                      missing_ok=True)
        elif isinstance(command, c.RestartContainer):
            was = self.state.status if self.state else "exited"
            self._append(events, ctx)
            runtime = self._runtime()
            timeout = command.timeout
            self._run(lambda: _restart(runtime, self.stream_id, timeout, was == "running"),
                      self._after_restart(was), future, ctx)
        elif isinstance(command, c.KillContainer):
            self._append(events, ctx)
            runtime = self._runtime()
            signal = command.signal
            self._run(lambda: _kill(runtime, self.stream_id, signal), self._after_kill, future, ctx,
                      missing_ok=True)
        elif isinstance(command, c.RemoveContainer):
            was = self.state.status if self.state else "exited"
            self._append(events, ctx)
            runtime = self._runtime()
            force = command.force
            stream_id = self.stream_id

            def remove() -> None:
                exec_agents(runtime).forget(stream_id)
                runtime.remove(stream_id, force=force)

            self._run(remove, self._after_remove(was), future, ctx, missing_ok=True)
        elif isinstance(command, c.ExecInContainer):
            runtime = self._runtime()
            intent = self._append_async(events, ctx)  # pipelined: see the module docstring
            intent.add_done_callback(lambda f: _settle(future, None, f.exception()) if f.exception() else None)
            exec_id = events[0].exec_id  # type: ignore[attr-defined]
            exec_spec = rt.ExecSpec(
                command=tuple(command.command), env=dict(command.env), workdir=command.workdir,
                stdin=command.stdin.encode() if command.stdin is not None else None,
                timeout=command.timeout, output_cap=int(extra.get("output_cap", 1 << 20)),
            )
            attach = extra.get("attach")
            tty = bool(extra.get("tty", False))
            stream_id = self.stream_id
            agents = exec_agents(runtime)
            # Start an agent for the next execs (berthd.kernel.exec_agent), but not in a pool
            # sandbox (removed after its one run; the pool warms one before handing it out)
            # nor under a pids limit (the agent and its guardian would count against it).
            s = self.state
            warm = s is not None and POOL_LABEL not in s.labels and not s.limits.pids

            def run_exec() -> rt.ExecResult:
                if attach is None:
                    return agents.exec(stream_id, exec_spec, warm=warm)
                # interactive: the caller pumps the stream and returns the result
                result: rt.ExecResult = attach(exec_id, runtime.exec_stream(stream_id, exec_spec, tty=tty))
                return result

            self._run(run_exec, self._after_exec(exec_id), future, ctx,
                      result_of=lambda r: ExecOutcome(exec_id, r), intent=intent)
        elif isinstance(command, c.WriteFile):
            runtime = self._runtime()
            data: bytes = extra["data"]
            path = command.path

            def put() -> None:
                runtime.put_file(self.stream_id, path, data)

            # the write is the fact: recorded once it happened
            self._run(put, lambda _v, err: [] if err else events, future, ctx)
        else:
            raise Conflict(f"unsupported command {type(command).__name__}")

    def _start(self, ctx: CommandContext, future: Future[Reply] | None,
               events: list[Event] | None = None) -> None:
        was = self.state.status if self.state else "created"
        self._append(events or [c.ContainerStartRequested()], ctx)
        runtime = self._runtime()
        self._run(lambda: runtime.start(self.stream_id), self._after_start(was), future, ctx)

    def _recheck_soon(self) -> None:
        runtime = self.runtimes.get(self.state.runtime) if self.state else None
        if runtime is not None:
            self._submit_observe(runtime)

    def _submit_observe(self, runtime: rt.Runtime) -> None:
        ref = self.actor_ref
        stream_id = self.stream_id

        def work() -> None:
            try:
                status, error = _inspect_or_none(runtime, stream_id), None
            except BaseException as exc:
                status, error = None, exc
            try:
                ref.tell(_Observed(status, error))
            except pykka.ActorDeadError:
                pass

        self.workers.submit(work)

    def _record_observed(self, obs: _Observed) -> None:
        if obs.error is not None:
            log.warning("container %s: could not inspect: %s", self.stream_id, obs.error)
            return
        try:
            self._append(self._events_for_observed(obs.status), SYSTEM)
        except BerthdError as exc:
            log.warning("container %s: could not record observation: %s", self.stream_id, exc)

    def _events_for_observed(self, status: rt.SandboxStatus | None) -> list[Event]:
        s = self.state
        if s is None or s.status in c.FINAL or s.pending in ("create", "remove", "restart", "start"):
            return []
        if status is None:
            return [c.ContainerLost()]
        if status.state == "exited":
            return c.observe_exit(s, status.exit_code, status.finished_at or rfc3339(self.clock()))
        return []

    # ------------------------------------------------------------------ outcomes

    def _after_create(self, status: rt.SandboxStatus | None, err: BaseException | None) -> list[Event]:
        if err is not None:
            mapped = map_runtime_error(err)
            return [c.ContainerCreateFailed(reason=mapped.message, code=mapped.code)]
        return [c.ContainerCreated(runtime_ref=status.runtime_ref if status else None)]

    def _after_reconcile(self, status: rt.SandboxStatus | None, err: BaseException | None) -> list[Event]:
        if err is not None:
            raise map_runtime_error(err)
        seen = None if status is None else c.Observed(
            state=status.state, exit_code=status.exit_code, started_at=status.started_at,
            finished_at=status.finished_at)
        return c.reconcile(self.state, seen, rfc3339(self.clock()))

    def _after_start(self, was: str) -> Callable[[Any, BaseException | None], list[Event]]:
        def then(status: rt.SandboxStatus | None, err: BaseException | None) -> list[Event]:
            if err is not None:
                mapped = map_runtime_error(err)
                return [c.ContainerOperationFailed(operation="start", reason=mapped.message,
                                                   code=mapped.code, status=was)]
            started = (status.started_at if status else None) or rfc3339(self.clock())
            events: list[Event] = [c.ContainerStarted(started_at=started)]
            # an exit seen while the start was pending was set aside: look again once started
            self._recheck_soon()
            if status is not None and status.state == "exited":
                # it already ran to its end: record that too
                events.append(c.ContainerExited(exit_code=status.exit_code, finished_at=status.finished_at))
            return events

        return then

    def _after_stop(self, status: rt.SandboxStatus | None, err: BaseException | None) -> list[Event]:
        s = self.state
        assert s is not None
        if err is not None:
            if s.status != "stopping":  # the exit was already seen: nothing failed
                return []
            if isinstance(err, rt.SandboxNotFound):
                return [c.ContainerLost()]
            mapped = map_runtime_error(err)
            return [c.ContainerOperationFailed(operation="stop", reason=mapped.message, code=mapped.code,
                                               status="running")]
        finished = (status.finished_at if status else None) or rfc3339(self.clock())
        return c.observe_exit(s, status.exit_code if status else None, finished)

    def _after_restart(self, was: str) -> Callable[[Any, BaseException | None], list[Event]]:
        def then(result: tuple[rt.SandboxStatus | None, rt.SandboxStatus] | None,
                 err: BaseException | None) -> list[Event]:
            if err is not None:
                mapped = map_runtime_error(err)
                return [c.ContainerOperationFailed(operation="restart", reason=mapped.message,
                                                   code=mapped.code, status=was)]
            assert result is not None
            stopped, started = result
            events: list[Event] = []
            if stopped is not None and self.state is not None and self.state.status == "running":
                events.append(c.ContainerExited(exit_code=stopped.exit_code,
                                                finished_at=stopped.finished_at, reason="restart"))
            events.append(c.ContainerStarted(started_at=started.started_at or rfc3339(self.clock())))
            self._recheck_soon()
            return events

        return then

    def _after_kill(self, status: rt.SandboxStatus | None, err: BaseException | None) -> list[Event]:
        s = self.state
        assert s is not None
        if err is not None:
            if isinstance(err, rt.SandboxNotFound):
                return [c.ContainerLost()]
            mapped = map_runtime_error(err)
            return [c.ContainerOperationFailed(operation="kill", reason=mapped.message, code=mapped.code,
                                               status=s.status)]
        if status is not None and status.state == "exited":
            return c.observe_exit(s, status.exit_code, status.finished_at or rfc3339(self.clock()))
        return []

    def _after_remove(self, was: str) -> Callable[[Any, BaseException | None], list[Event]]:
        def then(_value: Any, err: BaseException | None) -> list[Event]:
            if err is not None and not isinstance(err, rt.SandboxNotFound):
                mapped = map_runtime_error(err)
                return [c.ContainerOperationFailed(operation="remove", reason=mapped.message,
                                                   code=mapped.code, status=was)]
            return [c.ContainerRemoved()]

        return then

    def _after_exec(self, exec_id: str) -> Callable[[Any, BaseException | None], list[Event]]:
        def then(result: rt.ExecResult | None, err: BaseException | None) -> list[Event]:
            if err is not None or result is None:
                return [c.ExecFailed(exec_id=exec_id, reason=str(map_runtime_error(err).message if err else "no result"))]
            return [c.ExecFinished(
                exec_id=exec_id, exit_code=result.exit_code, duration_ms=round(result.duration_ms, 3),
                stdout_bytes=len(result.stdout), stderr_bytes=len(result.stderr),
                truncated=result.truncated, timed_out=result.timed_out,
            )]

        return then


# ---------------------------------------------------------------------- helpers


def _settle(future: Future[Reply] | None, reply: Reply | None, error: BaseException | None) -> None:
    settle(future, reply, error, _as_error)


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, rt.RuntimeError_):
        return map_runtime_error(exc)
    if isinstance(exc, StoreDown):
        return StoreUnavailable(f"the event log cannot be written: {exc}")
    return exc


def _inspect_or_none(runtime: rt.Runtime, berth_id: str) -> rt.SandboxStatus | None:
    try:
        return runtime.inspect(berth_id)
    except rt.SandboxNotFound:
        return None


def _restart(runtime: rt.Runtime, berth_id: str, timeout: float,
             running: bool) -> tuple[rt.SandboxStatus | None, rt.SandboxStatus]:
    stopped = runtime.stop(berth_id, timeout) if running else None
    return stopped, runtime.start(berth_id)


def _kill(runtime: rt.Runtime, berth_id: str, signal: str) -> rt.SandboxStatus:
    """Send the signal; for KILL wait (briefly) until the process is seen dead."""
    status = runtime.kill(berth_id, signal)
    if signal == "KILL":
        deadline = time.monotonic() + 5.0
        while status.state == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
            status = runtime.inspect(berth_id)
    return status


def _spec(state: c.ContainerState | None, node_id: str, network: bool,
          berth_dir: bool = False) -> rt.ContainerSpec:
    assert state is not None
    return rt.ContainerSpec(
        berth_id=state.id, node_id=node_id, image=state.image, command=tuple(state.command),
        name=state.name, env=dict(state.env), workdir=state.workdir,
        mounts=tuple(rt.Mount(m.host_path, m.container_path, m.mode) for m in state.mounts),
        ports=tuple(rt.PortMapping(p.container_port, p.host_port) for p in state.ports),
        limits=rt.Limits(state.limits.memory_mb, state.limits.cpus, state.limits.pids),
        network=network, labels=dict(state.labels), berth_dir=berth_dir,
        profile=state.profile,
    )
