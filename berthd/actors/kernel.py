"""``KernelActor``: the one writer of a kernel's stream, and ``KernelSupervisor``, its registry.

The same pattern as containers: ``decide`` (pure) turns a command into the intent event
(``KernelCreateRequested``, ``ExecutionStarted``, ``KernelRestartRequested``, ...), which
is appended before anything is touched; the side effect (creating the sandbox through the
container supervisor, talking to the in-sandbox agent) runs on a worker thread, off the
mailbox, and its outcome comes back as a message that appends the outcome event and
completes the caller's future. So a long execution never blocks ``interrupt``.

The kernel's sandbox is a container entity of its own (its events are on the log too),
created through ``Supervisor.create_container`` with a shared directory; the agent runs as
its main command. With ``container`` given (Docker only) the agent is started by exec in
that container instead, and the container is left alone when the kernel is destroyed.

Kernel state lives in the agent, never here: after a daemon restart ``reconcile``
reconnects (``locate_agent``), and an ``ExecutionStarted`` without its outcome is
re-attached and finished on the log.

A kernel whose interpreter or agent died answers ``DeadKernel`` (409 ``KERNEL_DEAD``),
never a result, and the log gets ``ExecutionFinished(status="dead")`` and ``KernelDied``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import msgspec
import pykka

from berthd.actors._stream import append_evolved, cap_text, load_state
from berthd.actors.container import Retired, map_runtime_error
from berthd.actors.context import SYSTEM, Clock, CommandContext, Reply, new_id, rfc3339
from berthd.actors.supervisor import Supervisor
from berthd.domain import container as c
from berthd.domain import kernel as k
from berthd.domain.base import Command, Event
from berthd.domain.errors import (
    BerthdError,
    Busy,
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

__all__ = ["KernelActor", "KernelResult", "KernelSupervisor", "LOG_OUTPUT_CAP", "kernel_result", "result_of"]

log = logging.getLogger(__name__)

LOG_OUTPUT_CAP = 64 * 1024
"""Characters of stdout and of stderr an ``ExecutionFinished`` keeps on the log."""

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
class _Done:
    value: Any
    error: BaseException | None
    then: _Then
    future: Future[Reply] | None
    ctx: CommandContext


class _Check:
    """The kernel's container stopped: look whether the agent still answers."""


def result_of(event: k.ExecutionFinished) -> KernelResult:
    return KernelResult(
        result_id=event.result_id, status=event.status, stdout=event.stdout, stderr=event.stderr,
        return_value=event.return_value, execution_count=event.execution_count,
        duration_ms=event.duration_ms, truncated=event.truncated, error=event.error,
        exit_code=event.exit_code,
    )


class KernelActor(pykka.ThreadingActor):
    """One kernel's behaviour; its state is rebuilt from its stream on activation."""

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
    ) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.state = state
        self.store = store
        self.runtimes = runtimes
        self.containers = containers
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.wait = wait  # seconds a worker waits for the container supervisor
        self.position = 0
        self._client: AgentClient | None = None
        self._client_lock = threading.Lock()  # the cached client; used by worker threads
        self.retired = False

    # ------------------------------------------------------------------ asked by others

    def get_state(self) -> k.KernelState | None:
        return self.state

    def handle(self, command: Command, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Decide, append the intent, start the side effect; the future completes with
        the outcome. Refusals complete it with the ``BerthdError`` at once."""
        if self.retired:
            raise Retired(self.stream_id)
        future: Future[Reply] = Future()
        try:
            self._handle(command, ctx, future, extra)
        except BaseException as exc:  # never let a command kill the actor
            if not future.done():
                future.set_exception(_as_error(exc))
        return future

    def reconcile(self) -> Future[Reply]:
        """Boot-time: reconnect to the agent; finish on the log what a crash left open."""
        future: Future[Reply] = Future()
        s = self.state
        if s is None or s.status in ("destroyed", "dead"):
            future.set_result(Reply(self.position, s))
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

    def on_receive(self, message: Any) -> Any:
        try:
            if isinstance(message, _Done):
                self._finish(message)
            elif isinstance(message, _Check):
                self._check()
        except BaseException:  # a tell must never kill the actor
            log.exception("kernel %s: failed to handle %s", self.stream_id, type(message).__name__)
        return None

    def on_stop(self) -> None:
        self._drop_agent()

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

    def _run(self, call: Callable[[], Any], then: _Then, future: Future[Reply] | None,
             ctx: CommandContext) -> None:
        ref = self.actor_ref

        def work() -> None:
            try:
                value, error = call(), None
            except BaseException as exc:
                value, error = None, exc
            try:
                ref.tell(_Done(value, error, then, future, ctx))
            except pykka.ActorDeadError:
                if future is not None and not future.done():
                    future.set_exception(Conflict("the kernel's actor stopped; retry"))

        self.workers.submit(work)

    def _finish(self, done: _Done) -> None:
        try:
            events, result, error = done.then(done.value, done.error)
            position = self._append(events, done.ctx)
        except BaseException as exc:
            if done.future is not None and not done.future.done():
                done.future.set_exception(_as_error(exc))
            return
        if done.future is None or done.future.done():
            return
        if error is not None:
            done.future.set_exception(_as_error(error))
        else:
            done.future.set_result(Reply(position, self.state, result))

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
            result_id = extra.get("result_id") or new_id()
            events = k.decide(s, command, now=now, new_id=result_id)
            self._append(events, ctx)
            on_output: OutputCallback | None = extra.get("on_output")
            code, timeout = command.code, command.timeout

            def execute() -> ExecutionResult:
                return self._execute(result_id, code, timeout, on_output)

            self._run(execute, self._after_execute(result_id), future, ctx)
        elif isinstance(command, k.InterruptKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            self._run(lambda: self._agent().interrupt(), self._after_interrupt, future, ctx)
        elif isinstance(command, k.RestartKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            self._run(self._restart(ctx), self._after_restart, future, ctx)
        elif isinstance(command, k.DestroyKernel):
            events = k.decide(s, command, now=now)
            self._append(events, ctx)
            self._run(self._destroy(ctx), self._after_destroy, future, ctx)
        else:
            raise ValidationError(f"unsupported command {type(command).__name__}")

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
            # the agent may still run it: follow it again from where the output stopped
            self._drop_agent()
            try:
                return self._agent().attach(result_id, exc.offset, on_output)
            except UnknownExecution:
                return self._agent().execute(code, timeout, on_output, execution_id=result_id,
                                             output_cap=self.output_cap)
        except AgentUnavailable:
            self._drop_agent()  # a stale connection to an agent that went away: look again
            return self._agent().execute(code, timeout, on_output, execution_id=result_id,
                                         output_cap=self.output_cap)

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
                self.containers.container_command(s.container_id, c.StartContainer(), ctx).result(self.wait)
            self._agent(_CONNECT_TIMEOUT)

        return restart

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
    """Registry and activation of kernel actors (same rules as ``Supervisor``: the
    registry lock is never held across an ask). Kernel actors hold a connection to their
    agent and are not passivated."""

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
        self.ask_timeout = ask_timeout
        self._actors: dict[str, pykka.ActorRef[KernelActor]] = {}
        self._creating: set[str] = set()  # names of kernels being created
        self._lock = threading.RLock()
        self.activations = 0

    @property
    def live_actors(self) -> int:
        with self._lock:
            return len(self._actors)

    def stop(self) -> None:
        with self._lock:
            refs = list(self._actors.values())
            self._actors.clear()
        for ref in refs:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(timeout=10)

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
                    f"a kernel cannot join a container on the {runtime_name} runtime (a process "
                    "started there ends with its exec); omit 'container' to get a sandbox of its own",
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
        with self._lock:
            if self.name_taken(name) or name in self._creating:
                raise Conflict(f"the kernel name '{name}' is taken; choose another", field="name", name=name)
            self._creating.add(name)
            ref = self._spawn(kernel_id, None)
        try:
            future = self._ask(ref, "handle", command, ctx, name=name, container_id=container_id,
                               own_container=own, runtime=runtime_name, image=image)
        except BaseException:
            self._release(name)
            raise
        future.add_done_callback(lambda _f: self._release(name))
        return future

    def _release(self, name: str) -> None:
        with self._lock:
            self._creating.discard(name)

    def kernel_command(self, kernel_id: str, command: Command, ctx: CommandContext,
                       **extra: Any) -> Future[Reply]:
        for _ in range(5):
            ref = self._get(kernel_id)
            try:
                return self._ask(ref, "handle", command, ctx, **extra)
            except (pykka.ActorDeadError, Retired):
                self._forget(kernel_id, ref)
        raise Conflict(f"kernel {kernel_id} is busy restarting its actor; retry")

    def reconcile(self, kernels: Iterable[k.KernelState], timeout: float = 30.0) -> dict[str, int]:
        """Reconnect to every live kernel's agent; finish what a crash left open."""
        futures: list[Future[Reply]] = []
        for state in kernels:
            if state.status in ("destroyed", "dead"):
                continue
            try:
                ref = self._get(state.id)
                futures.append(ref.proxy().reconcile().get(timeout=self.ask_timeout))
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
        """A container stopped (a runtime's watch thread): its kernel, if any, looks."""
        kernel_id = self.kernel_of_container(notice.berth_id)
        if kernel_id is None:
            return
        with self._lock:
            ref = self._actors.get(kernel_id)
        if ref is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Check())

    def _ask(self, ref: pykka.ActorRef[KernelActor], method: str, *args: Any, **kwargs: Any) -> Future[Reply]:
        try:
            inner: Future[Reply] = getattr(ref.proxy(), method)(*args, **kwargs).get(timeout=self.ask_timeout)
        except pykka.Timeout:
            raise Busy(f"the kernel did not take the command within {self.ask_timeout:.0f} s; retry") from None
        return inner

    def _get(self, kernel_id: str) -> pykka.ActorRef[KernelActor]:
        with self._lock:
            ref = self._actors.get(kernel_id)
            if ref is not None and ref.is_alive():
                return ref
            state, _ = load_state(self.store, kernel_id, "kernel", k.replay,
                                  lambda i: KernelNotFound(f"no kernel {i}", id=i))
            ref = self._spawn(kernel_id, state)
            self.activations += 1
            return ref

    def _spawn(self, kernel_id: str, state: k.KernelState | None) -> pykka.ActorRef[KernelActor]:
        ref = KernelActor.start(
            kernel_id, state, store=self.store, runtimes=self.runtimes, containers=self.containers,
            workers=self.workers, clock=self.clock, node_id=self.node_id, output_cap=self.output_cap,
            log_cap=self.log_cap,
        )
        self._actors[kernel_id] = ref
        return ref

    def _forget(self, kernel_id: str, ref: pykka.ActorRef[KernelActor]) -> None:
        with self._lock:
            if self._actors.get(kernel_id) is ref:
                del self._actors[kernel_id]


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
