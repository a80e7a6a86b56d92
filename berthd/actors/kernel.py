"""``KernelActor``: the one writer of a kernel's stream, and ``KernelSupervisor``, its registry.

The same pattern as containers: ``decide`` (pure) turns a command into the intent event
(``KernelCreateRequested``, ``ExecutionStarted``, ``KernelRestartRequested``, ...), which
is appended before anything is touched; the side effect (creating the sandbox through the
container supervisor, talking to the in-sandbox agent) runs on a worker thread, off the
mailbox, and its outcome comes back as a message that appends the outcome event and
completes the caller's future. So a long execution never blocks ``interrupt``.

Appends are pipelined where it pays: an execution's ``ExecutionStarted`` is committed
while its code runs, and outcome events are appended without the mailbox waiting for
their commit; the caller is answered, from the store's writer thread, once the outcome
(and the intent before it) is durable, so every acknowledged execution has both on the
log. An append that fails leaves the actor's state ahead of its log: the actor stops, and
the next command activates it again from the log (``EntityActor.resync``).

The kernel's sandbox is a container entity of its own (its events are on the log too),
created through ``Supervisor.create_container`` with a shared directory; the agent runs as
its main command. With ``container`` given (either runtime) the agent is started by exec in
that container instead, and the container is left alone when the kernel is destroyed.

Executions run one at a time: one that arrives while another runs (or while the kernel
starts or restarts) waits in a bounded FIFO queue on the actor, and runs when its turn
comes; a full queue answers 429 ``QUEUE_FULL``. A restart or destroy answers whatever
still waits (409).

Kernel state lives in the agent, never here: after a daemon restart ``reconcile``
reconnects (``locate_agent``), an ``ExecutionStarted`` without its outcome is
re-attached and finished on the log, and a ``KernelDestroyRequested`` without
``KernelDestroyed`` is carried out. For the same reason an idle kernel actor is
passivated like a container's (``berthd.actors._registry``): it only drops its
connection, and the next activation reconnects to the same agent.

A kernel whose interpreter or agent died answers ``DeadKernel`` (409 ``KERNEL_DEAD``),
never a result, and the log gets ``ExecutionFinished(status="dead")`` and ``KernelDied``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka

from berthd.actors._registry import EntityActor, Registry, suppress_dead
from berthd.actors._stream import (
    append_evolved,
    append_evolved_async,
    cap_text,
    load_state,
    when_durable,
)
from berthd.actors.container import map_runtime_error
from berthd.actors.context import (
    SYSTEM,
    Clock,
    CommandContext,
    Reply,
    check_if_match,
    new_id,
    require_version,
    rfc3339,
    settle,
)
from berthd.actors.supervisor import Supervisor
from berthd.domain import container as c
from berthd.domain import kernel as k
from berthd.domain.base import Command, Event
from berthd.domain.errors import (
    BerthdError,
    Conflict,
    ContainerNotFound,
    DeadKernel,
    KernelNotFound,
    RuntimeFailed,
    RuntimeUnavailable,
    StoreUnavailable,
    Unprocessable,
    ValidationError,
)
from berthd.events.store import EventStore
from berthd.events.store import StoreUnavailable as StoreDown
from berthd.kernel import (
    AgentClient,
    AgentUnavailable,
    ConnectionLost,
    ExecutionResult,
    KernelDead,
    KernelError,
    OutputCallback,
    UnknownExecution,
    agent_command,
    install_agent,
    locate_agent,
    start_agent_by_exec,
)
from berthd.runtime import base as rt

__all__ = ["KernelActor", "KernelResult", "KernelSupervisor", "LOG_OUTPUT_CAP", "QUEUE_DEPTH", "kernel_result",
           "result_of"]

log = logging.getLogger(__name__)

LOG_OUTPUT_CAP = 64 * 1024
"""Characters of stdout and of stderr an ``ExecutionFinished`` keeps on the log."""

QUEUE_DEPTH = 64
"""Executions a kernel keeps waiting behind the running one; one more is refused (429)."""

_WAITING = frozenset({"busy", "starting", "restarting"})  # an execution that arrives now waits
_CONNECT_TIMEOUT = 60.0  # a fresh sandbox: image start plus interpreter start
_RECONNECT_TIMEOUT = 10.0


class KernelResult(msgspec.Struct, kw_only=True):
    """What an execution answers (the agent's output cap applies, not the log's)."""

    result_id: str
    status: str  # ok | error | timeout | dead
    stdout: str = ""
    stderr: str = ""
    return_value: str | None = None
    execution_count: int = 0
    duration_ms: float = 0.0
    truncated: bool = False
    error: k.ExecutionError | None = None
    exit_code: int | None = None


_Then = Callable[[Any, BaseException | None], tuple[list[Event], Any, BaseException | None]]


@dataclass(slots=True)
class _Queued:
    """An execution waiting for the one before it (FIFO)."""

    command: k.ExecuteCode
    ctx: CommandContext
    future: Future[Reply]
    extra: dict[str, Any] = field(default_factory=dict)


class _Check:
    """The kernel's container stopped: look whether the agent still answers."""


def result_of(event: k.ExecutionFinished) -> KernelResult:
    return KernelResult(
        result_id=event.result_id, status=event.status, stdout=event.stdout, stderr=event.stderr,
        return_value=event.return_value, execution_count=event.execution_count,
        duration_ms=event.duration_ms, truncated=event.truncated, error=event.error,
        exit_code=event.exit_code,
    )


class KernelActor(EntityActor):
    """One kernel's behaviour; its state is rebuilt from its stream on activation.

    Executions run one at a time: one that arrives while another runs (or while the
    kernel starts or restarts) waits in a FIFO queue of ``queue_depth`` and runs when its
    turn comes; its caller gets its own result. A full queue answers 429 ``QUEUE_FULL``."""

    kind = "kernel"

    def __init__(
        self,
        stream_id: str,
        state: k.KernelState | None,
        *,
        store: EventStore,
        runtimes: dict[str, rt.Runtime],
        containers: Supervisor,
        workers: Executor,
        clock: Clock,
        node_id: str,
        output_cap: int = 1 << 20,
        log_cap: int = LOG_OUTPUT_CAP,
        wait: float = 600.0,
        queue_depth: int = QUEUE_DEPTH,
    ) -> None:
        super().__init__(stream_id, workers)
        self.state = state
        self.store = store
        self.runtimes = runtimes
        self.containers = containers
        self.clock = clock
        self.node_id = node_id
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.wait = wait  # seconds a worker waits for the container supervisor
        self.queue_depth = queue_depth
        self.position = 0
        self._client: AgentClient | None = None
        self._client_lock = threading.Lock()  # the cached client; used by worker threads
        self._queue: deque[_Queued] = deque()

    # ------------------------------------------------------------------ asked by others

    def get_state(self) -> k.KernelState | None:
        return self.state

    def is_idle(self) -> bool:
        s = self.state
        return super().is_idle() and not self._queue and (
            s is None or (s.status not in _WAITING and not s.destroying) or s.status in k.FINAL)

    def queued(self) -> int:
        return len(self._queue)

    def handle(self, command: Command, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Decide, append the intent, start the side effect; the future completes with
        the outcome. Refusals complete it with the ``BerthdError`` at once."""
        self.touch()
        future: Future[Reply] = Future()
        try:
            if ctx.if_match is not None:  # checked again when an execution's turn comes
                extra["if_match"] = ctx.if_match
            ctx = check_if_match(ctx, self.state)
            self._handle(command, ctx, future, extra)
        except BaseException as exc:  # never let a command kill the actor
            if not future.done():
                future.set_exception(_as_error(exc))
        return future

    def reconcile(self) -> Future[Reply]:
        """Boot-time: reconnect to the agent; finish on the log what a crash left open
        (an execution without its outcome, a destroy that did not finish)."""
        self.touch()
        future: Future[Reply] = Future()
        s = self.state
        if s is None or s.status in k.FINAL or (s.status == "dead" and not s.destroying):
            future.set_result(Reply(self.position, s))
            return future
        if s.destroying:
            self._run(self._destroy(SYSTEM), self._after_destroy, future, SYSTEM)
            return future
        restarting = s.status == "restarting"

        def reach() -> k.KernelState:
            client = self._agent(_RECONNECT_TIMEOUT)
            if restarting:
                client.restart()
            else:
                client.hello = client.info()
            return s

        self._run(reach, self._after_reconcile, future, SYSTEM)
        return future

    # ------------------------------------------------------------------ messages

    def on_message(self, message: Any) -> None:
        if isinstance(message, _Check):
            self._check()

    def on_stop(self) -> None:
        # the agent lives in the sandbox: only our connection goes; the next activation reconnects
        self._drop_agent()
        self._fail_queue(Conflict("the kernel's actor stopped before this code ran; send it again"))

    # ------------------------------------------------------------------ internals

    def _runtime(self) -> rt.Runtime:
        assert self.state is not None
        runtime = self.runtimes.get(self.state.runtime)
        if runtime is None:
            raise RuntimeUnavailable(f"runtime {self.state.runtime or '?'} is not enabled on this node")
        return runtime

    def _agent(self, timeout: float = _RECONNECT_TIMEOUT) -> AgentClient:
        """The agent's client, connected if needed (worker threads only: it blocks)."""
        with self._client_lock:
            if self._client is None:
                s = self.state
                assert s is not None
                runtime = self._runtime()
                try:
                    status = runtime.inspect(s.container_id)
                    if status.state != "running":  # no agent to wait for
                        raise AgentUnavailable(f"the kernel's container is {status.state}")
                    paths = locate_agent(runtime, s.container_id, s.id)
                except rt.SandboxNotFound as exc:
                    raise AgentUnavailable(f"the kernel's container is gone: {exc}") from None
                except rt.RuntimeError_ as exc:
                    raise AgentUnavailable(f"the kernel's container cannot be reached: {exc}") from None
                self._client = AgentClient.connect(paths.socket_path, timeout=timeout)
            return self._client

    def _drop_agent(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _append(self, events: list[Event], ctx: CommandContext) -> int:
        if not events:
            return self.position
        self.state, self.position = append_evolved(
            self.store, self.stream_id, "kernel", self.state, events,
            ctx.meta(self.clock, self.node_id), k.evolve)
        return self.position

    def _append_async(self, events: list[Event], ctx: CommandContext) -> Future[int]:
        """Evolve at once, commit without waiting (``append_evolved_async``)."""
        self.state, committed = append_evolved_async(
            self.store, self.stream_id, "kernel", self.state, events,
            ctx.meta(self.clock, self.node_id), k.evolve)
        self.watch_commit(committed)
        return committed

    def _run(self, call: Callable[[], Any], then: _Then, future: Future[Reply] | None,
             ctx: CommandContext, intent: Future[int] | None = None) -> None:
        """``call`` on a worker; ``then`` turns its outcome into events, a result and an
        error. ``intent``: the commit of the intent event, if it was not waited for."""
        def step(value: Any, error: BaseException | None) -> None:
            self._finish(then, value, error, future, ctx, intent)

        self.run_on_worker(call, step, future)

    def _finish(self, then: _Then, value: Any, error: BaseException | None,
                future: Future[Reply] | None, ctx: CommandContext, intent: Future[int] | None = None) -> None:
        """Append the outcome without waiting for its commit (the mailbox goes on: the
        next execution may start); the caller is answered, from the store's writer
        thread, once the outcome and the intent before it are durable."""
        try:
            if intent is not None and intent.done() and intent.exception() is not None:
                # the intent is not on the log: neither may its outcome be (resync follows)
                _settle(future, None, intent.exception())
                return
            try:
                events, result, failure = then(value, error)
                if not events:
                    position = self.position
                    _settle(future, None if failure is not None else Reply(position, self.state, result), failure)
                    return
                committed = self._append_async(events, ctx)
            except BaseException as exc:
                _settle(future, None, _as_error(exc))
                return
            state = self.state

            def answer(position: int, err: BaseException | None) -> None:
                if err is None:
                    self.position = max(self.position, position)
                _settle(future, None if err is not None or failure is not None else Reply(position, state, result),
                        err if err is not None else failure)

            when_durable(intent, committed, answer)
        finally:
            self._drain()

    # ------------------------------------------------------------------ the queue

    def _drain(self) -> None:
        """Start the next waiting execution if the kernel is free for it."""
        while self._queue and self.state is not None and self.state.status not in _WAITING:
            q = self._queue.popleft()
            try:
                self._execute_now(q.command, q.ctx, q.future, q.extra)
            except BaseException as exc:
                if not q.future.done():
                    q.future.set_exception(_as_error(exc))
                _started(q.extra)

    def _fail_queue(self, error: BerthdError) -> None:
        while self._queue:
            q = self._queue.popleft()
            if not q.future.done():
                q.future.set_exception(error)
            _started(q.extra)

    def _handle(self, command: Command, ctx: CommandContext, future: Future[Reply],
                extra: dict[str, Any]) -> None:
        s = self.state
        now = rfc3339(self.clock())
        if isinstance(command, k.CreateKernel):
            events = k.decide(s, command, now=now, new_id=self.stream_id, owner=ctx.owner,
                              name=extra.get("name", ""), container_id=extra["container_id"],
                              own_container=extra["own_container"], runtime=extra["runtime"],
                              image=extra.get("image"))
            self._append(events, ctx)
            self._run(self._create_sandbox(ctx), self._after_create, future, ctx)
        elif isinstance(command, k.ExecuteCode):
            if s is not None and not s.destroying and s.status not in k.FINAL \
                    and (s.status in _WAITING or self._queue):
                if len(self._queue) >= self.queue_depth:
                    raise k.QueueFull(
                        f"kernel {s.name} has {len(self._queue)} executions waiting already; retry later",
                        id=s.id, queued=len(self._queue), retry_after=1)
                self._queue.append(_Queued(command, ctx, future, extra))
                return
            self._execute_now(command, ctx, future, extra)
        elif isinstance(command, k.InterruptKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            if s is not None and s.current is None:  # nothing runs (idle, starting): nothing to stop
                self._run(lambda: None, self._after_interrupt, future, ctx)
            else:
                self._run(lambda: self._agent().interrupt(), self._after_interrupt, future, ctx)
        elif isinstance(command, k.RestartKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            self._fail_queue(Conflict("the kernel was restarted before this code ran (its state is gone); "
                                      "send it again", id=self.stream_id))
            self._run(self._restart(ctx), self._after_restart, future, ctx)
        elif isinstance(command, k.DestroyKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            self._fail_queue(Conflict("the kernel was destroyed before this code ran", id=self.stream_id,
                                      status="destroyed"))
            self._run(self._destroy(ctx), self._after_destroy, future, ctx)
        else:
            raise ValidationError(f"unsupported command {type(command).__name__}")

    def _execute_now(self, command: k.ExecuteCode, ctx: CommandContext, future: Future[Reply],
                     extra: dict[str, Any]) -> None:
        result_id = extra.get("result_id") or new_id()
        try:
            require_version(extra.get("if_match"), self.state)
            events = k.decide(self.state, command, now=rfc3339(self.clock()), new_id=result_id)
            # Pipelined: the code starts while ExecutionStarted is being committed; the
            # caller is answered once it and ExecutionFinished are both durable. If the
            # intent's commit fails the caller gets that error and no outcome is appended,
            # although the code may have run: that window only holds executions nobody
            # was told about (and the log never claims they ran).
            intent = self._append_async(events, ctx)
        except BaseException:
            _started(extra)  # refused: its caller stops counting queue time
            raise
        # "started" once the intent is on the log: a client told so may attach to it
        intent.add_done_callback(lambda _f: _started(extra))
        on_output: OutputCallback | None = extra.get("on_output")
        code, timeout = command.code, command.timeout

        def execute() -> ExecutionResult:
            return self._execute(result_id, code, timeout, on_output)

        intent.add_done_callback(lambda f: _settle(future, None, f.exception()) if f.exception() else None)
        self._run(execute, self._after_execute(result_id), future, ctx, intent)

    def _check(self) -> None:
        s = self.state
        if s is None or s.status not in ("idle", "busy") or s.destroying:
            return

        runtime = self._runtime()
        container_id, kernel_id = s.container_id, s.id

        def ping() -> None:
            # a connection of its own: the cached one may be following an execution
            try:
                if runtime.inspect(container_id).state != "running":
                    raise AgentUnavailable("its container is not running")
                socket_path = locate_agent(runtime, container_id, kernel_id).socket_path
            except rt.RuntimeError_ as exc:
                raise AgentUnavailable(str(exc)) from None
            with AgentClient.connect(socket_path, timeout=2.0) as probe:
                probe.ping()

        def then(_v: Any, err: BaseException | None) -> tuple[list[Event], Any, BaseException | None]:
            if isinstance(err, AgentUnavailable) and self.state is not None \
                    and self.state.status in ("idle", "busy") and not self.state.destroying:
                return self._died(f"its container stopped: {err}"), None, None
            return [], None, None

        self._run(ping, then, None, SYSTEM)

    # ------------------------------------------------------------------ side effects (workers)

    def _create_sandbox(self, ctx: CommandContext) -> Callable[[], AgentClient]:
        s = self.state
        assert s is not None
        runtime = self._runtime()
        spec_cmd = agent_command(s.id, s.language, output_cap=self.output_cap)

        def create() -> AgentClient:
            if s.own_container:
                created = False
                try:
                    self.containers.create_container(c.CreateContainer(
                        image=s.image or "", command=list(spec_cmd), name=f"kernel-{s.id}",
                        profile=s.profile, labels={"berth.kernel": s.id},
                        runtime=s.runtime,  # type: ignore[arg-type]
                        start=False,
                    ), ctx, berth_dir=True, berth_id=s.container_id).result(self.wait)
                    created = True
                    paths = install_agent(runtime, s.container_id, s.id)
                    self.containers.container_command(
                        s.container_id, c.StartContainer(), ctx).result(self.wait)
                    with self._client_lock:
                        self._client = AgentClient.connect(paths.socket_path, timeout=_CONNECT_TIMEOUT)
                        return self._client
                except BaseException:
                    if created:
                        self._remove_container(ctx)
                    raise
            paths = start_agent_by_exec(runtime, s.container_id, s.id, s.language,
                                        output_cap=self.output_cap)
            with self._client_lock:
                self._client = AgentClient.connect(paths.socket_path, timeout=_CONNECT_TIMEOUT)
                return self._client

        return create

    def _remove_container(self, ctx: CommandContext) -> None:
        assert self.state is not None
        try:
            self.containers.container_command(
                self.state.container_id, c.RemoveContainer(force=True), ctx).result(self.wait)
        except ContainerNotFound:
            pass
        except Conflict as exc:
            if "removed" not in str(exc) and "lost" not in str(exc):
                raise

    def _execute(self, result_id: str, code: str, timeout: float | None,
                 on_output: OutputCallback | None) -> ExecutionResult:
        try:
            return self._agent().execute(code, timeout, on_output, execution_id=result_id,
                                         output_cap=self.output_cap)
        except ConnectionLost as exc:
            if self._destroying():  # the agent was shut down on purpose: nothing to follow
                raise
            # the agent may still run it: follow it again from where the output stopped
            self._drop_agent()
            try:
                return self._agent().attach(result_id, exc.offset, on_output)
            except UnknownExecution:
                return self._agent().execute(code, timeout, on_output, execution_id=result_id,
                                             output_cap=self.output_cap)
        except AgentUnavailable:
            if self._destroying():
                raise
            self._drop_agent()  # a stale connection to an agent that went away: look again
            return self._agent().execute(code, timeout, on_output, execution_id=result_id,
                                         output_cap=self.output_cap)

    def _destroying(self) -> bool:
        """A destroy is in flight or done (read from a worker: the state is immutable)."""
        s = self.state
        return s is not None and (s.destroying or s.status in k.FINAL)

    def _restart(self, ctx: CommandContext) -> Callable[[], None]:
        s = self.state
        assert s is not None

        def restart() -> None:
            try:
                self._agent().restart()
                return
            except AgentUnavailable:
                self._drop_agent()
                if not s.own_container:
                    raise
            # the agent went with its container: start the container again (the agent
            # file is still in its shared directory), a fresh interpreter with it
            runtime = self._runtime()
            status = runtime.inspect(s.container_id)
            if status.state != "running":
                self._start_container(s.container_id, ctx)
            self._agent(_CONNECT_TIMEOUT)

        return restart

    def _start_container(self, container_id: str, ctx: CommandContext, settle: float = 30.0) -> None:
        """Start the kernel's stopped container. Its exit may not be on the container's
        log yet (the exit notice is being recorded): then the start is refused as
        "already running"; have the exit recorded and start once the log has it."""
        deadline = time.monotonic() + settle
        while True:
            try:
                self.containers.container_command(container_id, c.StartContainer(), ctx).result(self.wait)
                return
            except Conflict as exc:
                if exc.details.get("status") != "running" or time.monotonic() > deadline:
                    raise
            self.containers.observe(container_id)
            time.sleep(0.1)

    def _destroy(self, ctx: CommandContext) -> Callable[[], None]:
        s = self.state
        assert s is not None

        def destroy() -> None:
            try:
                client = self._agent(2.0)
                client.shutdown()
            except KernelError:
                pass
            finally:
                self._drop_agent()
            if s.own_container:
                self._remove_container(ctx)

        return destroy

    # ------------------------------------------------------------------ outcomes (mailbox)

    def _died(self, reason: str, result_id: str | None = None, stdout: str = "",
              stderr: str = "") -> list[Event]:
        events: list[Event] = []
        current = result_id or (self.state.current if self.state else None)
        if current is not None:
            out, out_cut = cap_text(stdout, self.log_cap)
            err, err_cut = cap_text(stderr, self.log_cap)
            events.append(k.ExecutionFinished(
                result_id=current, status="dead", stdout=out, stderr=err, truncated=out_cut or err_cut,
                execution_count=self.state.execution_count if self.state else 0,
                finished_at=rfc3339(self.clock())))
        events.append(k.KernelDied(reason=reason))
        return events

    def _after_create(self, client: AgentClient | None, err: BaseException | None) \
            -> tuple[list[Event], Any, BaseException | None]:
        if err is not None or client is None:
            mapped = _mapped(err)
            return [k.KernelStartFailed(reason=mapped.message, code=mapped.code)], None, mapped
        if client.hello.state == "dead":
            reason = client.hello.dead_reason or "the interpreter did not start"
            error = RuntimeFailed(f"the kernel's interpreter did not start: {reason}")
            return [k.KernelStartFailed(reason=reason)], None, error
        return [k.KernelStarted(started_at=rfc3339(self.clock()), agent_pid=client.hello.agent_pid)], None, None

    def _after_execute(self, result_id: str) -> _Then:
        def then(result: ExecutionResult | None, err: BaseException | None) \
                -> tuple[list[Event], Any, BaseException | None]:
            if err is not None and self._destroying():
                # cut short by a destroy: not a death of the kernel, and nothing to restart
                self._drop_agent()
                message = "the kernel was destroyed while the code ran"
                return [k.ExecutionFinished(
                    result_id=result_id, status="error", finished_at=rfc3339(self.clock()),
                    error=k.ExecutionError(ename="KernelDestroyed", evalue=message),
                    execution_count=self.state.execution_count if self.state else 0,
                )], None, Conflict(f"{message}: kernel {self.stream_id}", id=self.stream_id,
                                   result_id=result_id, status="destroyed")
            if isinstance(err, KernelDead):
                self._drop_agent()
                events = self._died(err.reason, result_id, err.stdout, err.stderr)
                return events, None, DeadKernel(
                    f"the kernel died while running the code ({err.reason}); restart it "
                    f"(POST /v1/kernels/{self.stream_id}/restart)",
                    id=self.stream_id, result_id=result_id, status="dead",
                    stdout=err.stdout[-4096:], stderr=err.stderr[-4096:])
            if isinstance(err, AgentUnavailable):
                self._drop_agent()
                reason = f"its agent is gone: {err}"
                return self._died(reason, result_id), None, DeadKernel(
                    f"the kernel is dead ({reason}); restart it", id=self.stream_id,
                    result_id=result_id, status="dead")
            if err is not None or result is None:
                mapped = _mapped(err)
                finished = k.ExecutionFinished(
                    result_id=result_id, status="error", finished_at=rfc3339(self.clock()),
                    error=k.ExecutionError(ename=type(err).__name__, evalue=mapped.message),
                    execution_count=self.state.execution_count if self.state else 0)
                return [finished], None, mapped
            return [self._finished(result_id, result)], kernel_result(result_id, result), None

        return then

    def _finished(self, result_id: str, r: ExecutionResult) -> k.ExecutionFinished:
        out, out_cut = cap_text(r.stdout, self.log_cap)
        err, err_cut = cap_text(r.stderr, self.log_cap)
        return k.ExecutionFinished(
            result_id=result_id, status=r.status, execution_count=r.execution_count,
            duration_ms=round(r.duration_ms, 3), stdout=out, stderr=err, return_value=r.return_value,
            error=k.ExecutionError(ename=r.error.ename, evalue=r.error.evalue, traceback=r.error.traceback)
            if r.error else None,
            truncated=r.truncated or out_cut or err_cut, exit_code=r.exit_code,
            finished_at=rfc3339(self.clock()),
        )

    def _after_interrupt(self, interrupted: str | None, err: BaseException | None) \
            -> tuple[list[Event], Any, BaseException | None]:
        if isinstance(err, AgentUnavailable):  # the execution's own worker records the death
            name = self.state.name if self.state is not None else self.stream_id
            return [], None, DeadKernel(f"kernel {name} has no agent any more ({err}); restart it "
                                        f"(POST /v1/kernels/{self.stream_id}/restart)", id=self.stream_id)
        if err is not None:
            return [], None, _mapped(err)
        return [], interrupted, None

    def _after_restart(self, _v: Any, err: BaseException | None) -> tuple[list[Event], Any, BaseException | None]:
        if err is not None:
            reason = _mapped(err).message
            return self._died(f"restart failed: {reason}"), None, _mapped(err)
        return [k.KernelRestarted()], None, None

    def _after_destroy(self, _v: Any, err: BaseException | None) -> tuple[list[Event], Any, BaseException | None]:
        if err is not None:
            return [], None, _mapped(err)
        return [k.KernelDestroyed()], None, None

    def _after_reconcile(self, _s: Any, err: BaseException | None) -> tuple[list[Event], Any, BaseException | None]:
        s = self.state
        assert s is not None
        if err is not None:
            reason = f"not reachable after a daemon restart: {_mapped(err).message}"
            if s.status == "starting":
                return [k.KernelStartFailed(reason=reason)], None, None
            return self._died(reason), None, None
        client = self._client
        info = client.hello if client is not None else None
        events: list[Event] = []
        if s.status == "starting":
            events.append(k.KernelStarted(started_at=rfc3339(self.clock()),
                                          agent_pid=info.agent_pid if info else None))
        elif s.status == "restarting":
            events.append(k.KernelRestarted())
        if info is not None and info.state == "dead" and s.current is None:
            events.append(k.KernelDied(reason=info.dead_reason or "the interpreter died"))
        if s.current is not None:
            current = s.current
            self._run(lambda: self._follow(current), self._after_execute(current), None, SYSTEM)
        return events, None, None

    def _follow(self, result_id: str) -> ExecutionResult:
        """An execution started before the daemon restarted: its result, from the agent."""
        try:
            return self._agent().attach(result_id, 0)
        except UnknownExecution:
            raise RuntimeFailed("the daemon stopped before the code reached the kernel; it did not run") from None


# ---------------------------------------------------------------------- supervisor


class KernelSupervisor:
    """Registry, activation, passivation and boot reconciliation of kernel actors. A
    passivated kernel loses nothing: its state is in the agent, in the sandbox, and the
    next activation reconnects to it."""

    def __init__(
        self,
        *,
        store: EventStore,
        runtimes: dict[str, rt.Runtime],
        default_runtime: str,
        containers: Supervisor,
        workers: Executor,
        clock: Clock,
        node_id: str,
        kernel_images: dict[str, str],
        find_container: Callable[[str], c.ContainerState | None],
        name_taken: Callable[[str], bool],
        kernel_of_container: Callable[[str], str | None] = lambda _id: None,
        output_cap: int = 1 << 20,
        log_cap: int = LOG_OUTPUT_CAP,
        ask_timeout: float = 30.0,
        passivate_after: float = 300.0,
        queue_depth: int = QUEUE_DEPTH,
    ) -> None:
        self.log_cap = log_cap
        self.store = store
        self.runtimes = runtimes
        self.default_runtime = default_runtime
        self.containers = containers
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.kernel_images = kernel_images
        self.find_container = find_container
        self.name_taken = name_taken
        self.kernel_of_container = kernel_of_container
        self.output_cap = output_cap
        self.queue_depth = queue_depth
        self.registry: Registry[KernelActor] = Registry(
            "kernel", start=self._start_actor, load=self._load, ask_timeout=ask_timeout,
            passivate_after=passivate_after)
        self._creating: set[str] = set()  # names of kernels being created

    @property
    def live_actors(self) -> int:
        return self.registry.live

    @property
    def activations(self) -> int:
        return self.registry.activations

    def stop(self) -> None:
        self.registry.stop()

    def passivate_idle(self, idle_for: float | None = None) -> int:
        return self.registry.passivate_idle(idle_for)

    def create_kernel(self, command: k.CreateKernel, ctx: CommandContext) -> Future[Reply]:
        kernel_id = new_id()
        if command.container is not None:
            target = self.find_container(command.container)
            if target is None or (not ctx.is_admin and target.owner != ctx.owner):
                raise ContainerNotFound(f"no container '{command.container}'", id=command.container)
            runtime_name = target.runtime
            if command.runtime is not None and command.runtime != runtime_name:
                raise ValidationError(f"container {target.name} runs on {runtime_name}", field="runtime")
            runtime = self.runtimes.get(runtime_name)
            if runtime is None:
                raise RuntimeUnavailable(f"runtime {runtime_name} is not enabled on this node")
            if not runtime.detached_execs:
                raise Unprocessable(
                    f"a kernel cannot join a container on the {runtime_name} runtime (it cannot keep "
                    "a process started in a running container); omit 'container' to get a sandbox "
                    "of its own",
                    field="container")
            if target.status != "running":
                raise Conflict(f"container {target.name} is {target.status}; start it first",
                               field="container", status=target.status)
            try:
                runtime.berth_dir(target.id)
            except rt.RuntimeError_ as exc:
                raise Unprocessable(
                    f"container {target.name} has no shared directory for a kernel agent ({exc}); "
                    "create it through POST /v1/containers with this version of berthd",
                    field="container") from None
            container_id, own, image = target.id, False, target.image
        else:
            runtime_name = command.runtime or self.default_runtime
            if runtime_name not in self.runtimes:
                raise ValidationError(
                    f"runtime '{runtime_name}' is not available on this node "
                    f"(available: {', '.join(sorted(self.runtimes))})", field="runtime")
            container_id, own = new_id(), True
            image = command.image or self.kernel_images.get(runtime_name) or "host"
        name = command.name or f"kernel-{kernel_id}"
        with self.registry.lock:
            if self.name_taken(name) or name in self._creating:
                raise Conflict(f"the kernel name '{name}' is taken; choose another", field="name", name=name)
            self._creating.add(name)
            ref = self.registry.spawn(kernel_id, None)
        try:
            future: Future[Reply] = self.registry.ask(
                ref, "handle", command, ctx, name=name, container_id=container_id,
                own_container=own, runtime=runtime_name, image=image)
        except BaseException:
            self._release(name)
            raise
        future.add_done_callback(lambda _f: self._release(name))
        return future

    def _release(self, name: str) -> None:
        with self.registry.lock:
            self._creating.discard(name)

    def kernel_command(self, kernel_id: str, command: Command, ctx: CommandContext,
                       **extra: Any) -> Future[Reply]:
        """Send ``command`` to the kernel's actor, activating it if needed. ``extra`` for an
        execution: ``result_id``, ``on_output(stream, text)``, ``started`` (a
        ``threading.Event`` set once it leaves the queue: on the log, or refused)."""
        future: Future[Reply] = self.registry.call(kernel_id, "handle", command, ctx, **extra)
        return future

    def kernel_state(self, kernel_id: str) -> k.KernelState | None:
        """The write side's state of the kernel (activating it), None if there is none."""
        try:
            state: k.KernelState | None = self.registry.call(kernel_id, "get_state")
        except KernelNotFound:
            return None
        return state

    def reconcile(self, kernels: Iterable[k.KernelState], timeout: float = 30.0) -> dict[str, int]:
        """Reconnect to every live kernel's agent; finish what a crash left open (an
        execution without its outcome, a destroy without ``KernelDestroyed``)."""
        futures: list[Future[Reply]] = []
        for state in kernels:
            if state.status in k.FINAL or (state.status == "dead" and not state.destroying):
                continue
            try:
                futures.append(self.registry.call(state.id, "reconcile"))
            except Exception:
                log.exception("reconcile: cannot activate kernel %s", state.id)
        failed = 0
        for f in futures:
            try:
                f.result(timeout=timeout)
            except Exception as exc:
                failed += 1
                log.warning("reconcile kernel: %s", exc)
        return {"checked": len(futures), "failed": failed}

    def on_container_exit(self, notice: rt.ExitNotice) -> None:
        """A container stopped (a runtime's watch thread): its kernel, if any, looks
        (activated for it if it was passivated)."""
        kernel_id = self.kernel_of_container(notice.berth_id)
        if kernel_id is None:
            return
        try:
            ref = self.registry.get(kernel_id)
        except KernelNotFound:
            return
        except Exception as exc:
            log.warning("exit of kernel %s's container not checked: %s", kernel_id, exc)
            return
        with suppress_dead():
            ref.tell(_Check())

    def _load(self, kernel_id: str) -> k.KernelState:
        state, _ = load_state(self.store, kernel_id, "kernel", k.replay,
                              lambda i: KernelNotFound(f"no kernel {i}", id=i))
        return state

    def _start_actor(self, kernel_id: str, state: k.KernelState | None) -> pykka.ActorRef[KernelActor]:
        ref: pykka.ActorRef[KernelActor] = KernelActor.start(
            kernel_id, state, store=self.store, runtimes=self.runtimes, containers=self.containers,
            workers=self.workers, clock=self.clock, node_id=self.node_id, output_cap=self.output_cap,
            log_cap=self.log_cap, queue_depth=self.queue_depth,
        )
        return ref


# ---------------------------------------------------------------------- helpers



def kernel_result(result_id: str, r: ExecutionResult) -> KernelResult:
    return KernelResult(
        result_id=result_id, status=r.status, stdout=r.stdout, stderr=r.stderr,
        return_value=r.return_value, execution_count=r.execution_count,
        duration_ms=round(r.duration_ms, 3), truncated=r.truncated,
        error=k.ExecutionError(ename=r.error.ename, evalue=r.error.evalue, traceback=r.error.traceback)
        if r.error else None,
        exit_code=r.exit_code,
    )


def _settle(future: Future[Reply] | None, reply: Reply | None, error: BaseException | None) -> None:
    settle(future, reply, error, _as_error)


def _started(extra: dict[str, Any]) -> None:
    started: threading.Event | None = extra.get("started")
    if started is not None:
        started.set()


def _mapped(exc: BaseException | None) -> BerthdError:
    if exc is None:
        return RuntimeFailed("the kernel agent gave no answer")
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, KernelError):
        return RuntimeFailed(f"kernel agent: {exc}")
    if isinstance(exc, TimeoutError):
        return RuntimeUnavailable("the container supervisor did not answer in time; retry")
    return map_runtime_error(exc)


def _as_error(exc: BaseException) -> BaseException:
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, StoreDown):
        return StoreUnavailable(f"the event log cannot be written: {exc}")
    if isinstance(exc, (KernelError, rt.RuntimeError_)):
        return _mapped(exc)
    return exc
