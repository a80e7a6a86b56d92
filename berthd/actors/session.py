"""``SessionActor``: the one writer of a session's stream, and ``SessionSupervisor``, its
registry and expiry timer.

The pattern of the other actors: ``decide`` (pure) refuses or records (``CommandDenied``,
``SessionExpired``, ``SessionClosed``); the side effects — opening the session's kernel
through the ``KernelSupervisor``, running code in it, running a command in its sandbox
through the container ``Supervisor``, destroying the kernel — run on worker threads, never
on the mailbox (they ask other actors), and their outcome comes back as a message that
appends ``SessionKernelAttached`` or ``CommandExecuted`` and completes the caller's future.

Executions in a session run one at a time, in arrival order: one that arrives while
another runs waits in a FIFO queue (``queue_depth``; beyond it 429 ``QUEUE_FULL``) and its
caller gets its own result. ``execute_with_retry`` holds the session for all its attempts.

The kernel (and its sandbox) is opened on demand at the first execution. Before each
execution the kernel is looked at: one that is gone (destroyed from outside, dead, lost)
is recorded as ``SessionKernelLost`` and a new one is opened (``SessionKernelAttached``).
A ``command`` result is kept on ``CommandExecuted`` (output capped) so ``GET
/v1/results/{id}`` serves it from the log; a ``code`` result is the kernel's own.

Expiry is decided from the injected clock: a command arriving after ``expires_at`` expires
the session (409 ``SESSION_EXPIRED``), and the supervisor's timer expires due sessions on
its own (read from the view, so passivated sessions expire too), at boot too, closing
their kernel and sandbox. A session with an execution running or waiting is in use and
does not expire; the execution's ``CommandExecuted`` moves ``expires_at``. At boot, a session that ended while its kernel's destroy was
cut short by a crash gets its kernel destroyed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from berthd.actors._registry import EntityActor, Registry, suppress_dead
from berthd.actors._stream import append_evolved, cap_text, load_state
from berthd.actors.container import ExecOutcome
from berthd.actors.context import (
    SYSTEM,
    Clock,
    CommandContext,
    Reply,
    check_if_match,
    new_id,
    require_version,
    rfc3339,
)
from berthd.actors.kernel import LOG_OUTPUT_CAP, QUEUE_DEPTH, KernelResult, KernelSupervisor
from berthd.actors.supervisor import Supervisor
from berthd.domain import container as c
from berthd.domain import kernel as k
from berthd.domain import session as se
from berthd.domain.base import Command, Event
from berthd.domain.errors import (
    BerthdError,
    Conflict,
    ExpiredSession,
    KernelNotFound,
    RuntimeFailed,
    RuntimeUnavailable,
    SessionNotFound,
    StoreUnavailable,
    ValidationError,
)
from berthd.events.store import EventStore
from berthd.events.store import StoreUnavailable as StoreDown

__all__ = ["SessionActor", "SessionOutcome", "SessionSupervisor"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SessionOutcome:
    """An execution's answer: the kernel-shaped result, when it ran, and for
    ``execute_with_retry`` every attempt of ``code``."""

    result: KernelResult
    executed_at: str
    attempts: list[SessionOutcome] | None = None


_Done = Callable[[SessionOutcome | None, BaseException | None], None]


@dataclass(slots=True)
class _Queued:
    """An execution waiting for its turn (FIFO)."""

    command: se.ExecuteInSession | se.ExecuteWithRetry
    ctx: CommandContext
    future: Future[Reply]
    extra: dict[str, Any] = field(default_factory=dict)


class _Next:
    """The running execution answered its caller: the next one may go."""


class SessionActor(EntityActor):
    """One session's behaviour; its state is rebuilt from its stream on activation."""

    kind = "session"

    def __init__(
        self,
        stream_id: str,
        state: se.SessionState | None,
        *,
        store: EventStore,
        kernels: KernelSupervisor,
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
        self.kernels = kernels
        self.containers = containers
        self.clock = clock
        self.node_id = node_id
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.wait = wait  # seconds a worker waits for another supervisor's outcome
        self.queue_depth = queue_depth
        self.position = 0
        self._running: Future[Reply] | None = None  # the execution that has the session
        self._queue: deque[_Queued] = deque()

    # ------------------------------------------------------------------ asked by others

    def get_state(self) -> se.SessionState | None:
        return self.state

    def is_idle(self) -> bool:
        return super().is_idle() and self._running is None and not self._queue

    def handle(self, command: Command, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Decide, append, start the side effect; the future completes with the outcome.
        Refusals complete it with the ``BerthdError`` at once. ``extra``: ``started`` (a
        ``threading.Event`` set when an execution leaves the queue)."""
        self.touch()
        future: Future[Reply] = Future()
        try:
            if ctx.if_match is not None:  # checked again when an execution's turn comes
                extra["if_match"] = ctx.if_match
            ctx = check_if_match(ctx, self.state)
            self._handle(command, ctx, future, extra)
        except BaseException as exc:  # never let a command kill the actor
            _fail(future, exc)
        return future

    # ------------------------------------------------------------------ messages

    def on_message(self, message: Any) -> None:
        if isinstance(message, _Next):
            if self._running is not None and self._running.done():
                self._running = None
            self._drain()

    def on_stop(self) -> None:
        while self._queue:
            q = self._queue.popleft()
            _fail(q.future, Conflict("the session's actor stopped before this ran; send it again"))
            _started(q.extra)

    # ------------------------------------------------------------------ internals

    def _now(self) -> str:
        return rfc3339(self.clock())

    def _expires(self) -> str:
        assert self.state is not None
        return rfc3339(se.expiry(self.clock(), self.state.ttl_seconds))

    def _append(self, events: list[Event], ctx: CommandContext) -> int:
        if not events:
            return self.position
        self.state, self.position = append_evolved(
            self.store, self.stream_id, "session", self.state, events,
            ctx.meta(self.clock, self.node_id), se.evolve)
        return self.position

    def _reply(self, result: Any = None) -> Reply:
        return Reply(self.position, self.state, result)

    def _run(self, call: Callable[[], Any], then: Callable[[Any, BaseException | None], None],
             future: Future[Reply] | None) -> None:
        self.run_on_worker(call, then, future)

    def _handle(self, command: Command, ctx: CommandContext, future: Future[Reply],
                extra: dict[str, Any]) -> None:
        now_dt = self.clock()
        now = rfc3339(now_dt)
        if isinstance(command, se.CreateSession):
            events = se.decide(self.state, command, now=now,
                               expires_at=rfc3339(se.expiry(now_dt, command.ttl_seconds)),
                               new_id=self.stream_id, owner=ctx.owner, name=extra.get("name", ""))
            self._append(events, ctx)
            future.set_result(self._reply())
            return
        before = self.state
        events = se.decide(before, command, now=now, busy=self._running is not None or bool(self._queue))
        self._append(events, ctx)
        ended = any(isinstance(e, (se.SessionExpired, se.SessionClosed)) for e in events)
        if isinstance(command, (se.CloseSession, se.ExpireSession)):
            if ended:  # the answer waits for the kernel and its sandbox to be gone
                self._end_queue()
                # the answer's position covers the kernel's destroy too: a client that reads
                # the kernel after the close sees it destroyed (read-your-writes)
                self._run(self._destroy_kernel(ctx), lambda at, _e: future.set_result(
                    Reply(max(self.position, at or 0), self.state)), future)
            else:
                future.set_result(self._reply())
            return
        assert before is not None
        refused = se.refusal(events, before)
        if ended:
            self._end_queue()
            self._run(self._destroy_kernel(SYSTEM), lambda _v, _e: None, None)
        if refused is not None:
            future.set_exception(refused)
            return
        if not isinstance(command, (se.ExecuteInSession, se.ExecuteWithRetry)):
            raise ValidationError(f"unsupported command {type(command).__name__}")
        if self._running is not None or self._queue:
            if len(self._queue) >= self.queue_depth:
                raise k.QueueFull(
                    f"session {before.name} has {len(self._queue)} executions waiting already; retry later",
                    id=before.id, queued=len(self._queue), retry_after=1)
            self._queue.append(_Queued(command, ctx, future, extra))
            return
        self._begin(_Queued(command, ctx, future, extra))

    # ------------------------------------------------------------------ the queue

    def _begin(self, q: _Queued) -> None:
        """``q`` has the session now; when its caller is answered, the next one goes.
        Code is "started" by its kernel, once the kernel's intent is on the log (so the
        announced result id can be attached to at once); anything else starts here."""
        if not (isinstance(q.command, se.ExecuteInSession) and q.command.code is not None):
            _started(q.extra)
        s = self.state
        assert s is not None
        if s.status != "active":
            _fail(q.future, _ended(s))
            _started(q.extra)
            return
        try:
            require_version(q.extra.get("if_match"), s)
        except BerthdError as exc:
            _fail(q.future, exc)
            _started(q.extra)
            return
        self._running = q.future
        q.future.add_done_callback(lambda _f: _started(q.extra))  # whatever ended it
        ref = self.actor_ref

        def next_one(_f: Future[Reply]) -> None:
            with suppress_dead():
                ref.tell(_Next())

        q.future.add_done_callback(next_one)
        command, ctx, future, extra = q.command, q.ctx, q.future, q.extra
        if isinstance(command, se.ExecuteInSession):
            self._with_kernel(ctx, future, lambda: self._execute(command, ctx, future, extra))
        else:
            self._with_kernel(ctx, future, lambda: self._retry(command, ctx, future))

    def _drain(self) -> None:
        while self._running is None and self._queue:
            q = self._queue.popleft()
            try:
                self._begin(q)
            except BaseException as exc:
                _fail(q.future, exc)

    def _end_queue(self) -> None:
        """The session ended: what waits is answered as the session now is."""
        s = self.state
        assert s is not None
        while self._queue:
            q = self._queue.popleft()
            _fail(q.future, _ended(s))
            _started(q.extra)

    # ------------------------------------------------------------------ the kernel

    def _with_kernel(self, ctx: CommandContext, future: Future[Reply], go: Callable[[], None]) -> None:
        """Run ``go`` (on the mailbox) once the session has a live kernel: the one it has
        if it is still there, else a new one (the old one recorded as lost)."""
        s = self.state
        assert s is not None
        if s.kernel_id is None:
            self._open_kernel(ctx, future, go)
            return
        kernel_id, kernels = s.kernel_id, self.kernels

        def look() -> str | None:
            state = kernels.kernel_state(kernel_id)
            if state is None:
                return "it does not exist"
            if state.status in k.FINAL or state.destroying:
                return "it was destroyed"
            if state.status == "dead":
                return f"it died ({state.error or 'no reason recorded'})"
            return None

        def then(gone: str | None, err: BaseException | None) -> None:
            if err is not None:
                _fail(future, err)
            elif gone is None:
                go()
            else:
                self._lost(kernel_id, gone, ctx)
                self._open_kernel(ctx, future, go)

        self._run(look, _guarded_future(then, future), future)

    def _lost(self, kernel_id: str, reason: str, ctx: CommandContext) -> None:
        """Record that the kernel is gone; a dead one's sandbox is removed."""
        self._append([se.SessionKernelLost(kernel_id=kernel_id, reason=reason, at=self._now())], ctx)
        log.info("session %s: its kernel %s is gone (%s); a new one opens", self.stream_id, kernel_id, reason)
        if "destroyed" not in reason:
            self._run(self._destroy_kernel(SYSTEM, kernel_id), lambda _v, _e: None, None)

    def _open_kernel(self, ctx: CommandContext, future: Future[Reply], go: Callable[[], None]) -> None:
        s = self.state
        assert s is not None
        create = k.CreateKernel(language=s.language,  # type: ignore[arg-type]
                                image=s.image, profile=s.profile,
                                runtime=s.runtime)  # type: ignore[arg-type]
        kernels, wait = self.kernels, self.wait

        def open_kernel() -> tuple[str, str]:
            reply = kernels.create_kernel(create, ctx).result(wait)
            state: k.KernelState = reply.state
            return state.id, state.container_id

        def then(opened: tuple[str, str] | None, err: BaseException | None) -> None:
            s = self.state
            assert s is not None
            if err is not None or opened is None:
                _fail(future, _mapped(err))
                return
            kernel_id, container_id = opened
            if s.status != "active":  # closed or expired while the kernel opened
                self._run(self._destroy_kernel(SYSTEM, kernel_id), lambda _v, _e: None, None)
                _fail(future, _ended(s))
                return
            self._append([se.SessionKernelAttached(kernel_id=kernel_id, container_id=container_id)], ctx)
            go()

        self._run(open_kernel, _guarded_future(then, future), future)

    def _destroy_kernel(self, ctx: CommandContext, kernel_id: str | None = None) -> Callable[[], int]:
        kid = kernel_id or (self.state.kernel_id if self.state is not None else None)
        kernels, wait = self.kernels, self.wait

        def destroy() -> int:
            """The log position of the kernel's destroy (0 when there was nothing to do)."""
            if kid is None:
                return 0
            try:
                return kernels.kernel_command(kid, k.DestroyKernel(), ctx).result(wait).position
            except (KernelNotFound, Conflict) as exc:  # already destroyed
                log.debug("session kernel %s: %s", kid, exc)
            except Exception:
                log.exception("session %s: could not destroy its kernel %s", self.stream_id, kid)
            return 0

        return destroy

    # ------------------------------------------------------------------ executions

    def _execute(self, command: se.ExecuteInSession, ctx: CommandContext, future: Future[Reply],
                 extra: dict[str, Any]) -> None:
        """``extra``: ``result_id`` (chosen by the caller, e.g. to announce it first) and
        ``on_output(stream, text)`` (code: the kernel's output as it comes)."""
        result_id: str | None = extra.get("result_id")

        def done(outcome: SessionOutcome | None, err: BaseException | None) -> None:
            if err is not None:
                _fail(future, err)
            else:
                future.set_result(self._reply(outcome))

        if command.command is not None:
            self._exec_command(list(command.command), command.timeout, ctx, done, result_id)
        else:
            assert command.code is not None
            self._exec_code(command.code, command.timeout, ctx, done, result_id, extra.get("on_output"),
                            extra.get("started"))

    def _retry(self, command: se.ExecuteWithRetry, ctx: CommandContext, future: Future[Reply]) -> None:
        attempts: list[SessionOutcome] = []

        def attempt() -> None:
            self._exec_code(command.code, command.timeout, ctx, after_attempt)

        def after_attempt(outcome: SessionOutcome | None, err: BaseException | None) -> None:
            if err is not None or outcome is None:
                _fail(future, _mapped(err))
                return
            attempts.append(outcome)
            if outcome.result.status == "ok" or len(attempts) >= command.max_attempts:
                future.set_result(self._reply(SessionOutcome(outcome.result, outcome.executed_at,
                                                             list(attempts))))
            elif command.on_error_code is not None:
                self._exec_code(command.on_error_code, command.timeout, ctx, after_fix)
            else:
                attempt()

        def after_fix(_outcome: SessionOutcome | None, err: BaseException | None) -> None:
            if err is not None:
                _fail(future, err)
            else:
                attempt()

        attempt()

    def _exec_code(self, code: str, timeout: float | None, ctx: CommandContext, done: _Done,
                   result_id: str | None = None, on_output: Callable[[str, str], None] | None = None,
                   started: threading.Event | None = None) -> None:
        s = self.state
        assert s is not None and s.kernel_id is not None
        kernel_id, kernels, wait = s.kernel_id, self.kernels, (timeout or self.wait) + 30.0
        extra: dict[str, Any] = {"result_id": result_id} if result_id else {}
        if on_output is not None:
            extra["on_output"] = on_output
        if started is not None:
            extra["started"] = started  # set by the kernel once its intent is committed

        def run() -> KernelResult:
            reply = kernels.kernel_command(kernel_id, k.ExecuteCode(code=code, timeout=timeout), ctx,
                                           **extra).result(wait)
            result: KernelResult = reply.result
            return result

        def then(r: KernelResult | None, err: BaseException | None) -> None:
            if err is not None or r is None:
                done(None, _mapped(err))
                return
            executed_at = self._now()
            self._append([se.CommandExecuted(
                result_id=r.result_id, mode="code", status=r.status, executed_at=executed_at,
                expires_at=self._expires(), duration_ms=r.duration_ms, truncated=r.truncated,
                execution_count=r.execution_count,
            )], ctx)
            done(SessionOutcome(r, executed_at), None)

        self._run(run, _guarded(then, done), None)

    def _exec_command(self, argv: list[str], timeout: float | None, ctx: CommandContext, done: _Done,
                      result_id: str | None = None) -> None:
        s = self.state
        assert s is not None and s.container_id is not None
        container_id, containers, cap = s.container_id, self.containers, self.output_cap
        wait = (timeout or self.wait) + 30.0
        extra: dict[str, Any] = {"new_id": result_id} if result_id else {}

        def run() -> ExecOutcome:
            reply = containers.container_command(
                container_id, c.ExecInContainer(command=argv, timeout=timeout), ctx, output_cap=cap, **extra,
            ).result(wait)
            outcome: ExecOutcome = reply.result
            return outcome

        def then(o: ExecOutcome | None, err: BaseException | None) -> None:
            if err is not None or o is None:
                done(None, _mapped(err))
                return
            r = o.result
            status = "timeout" if r.timed_out else "ok" if r.exit_code == 0 else "error"
            count = (self.state.commands_executed if self.state else 0) + 1
            stdout = r.stdout.decode(errors="replace")
            stderr = r.stderr.decode(errors="replace")
            result = KernelResult(
                result_id=o.exec_id, status=status, stdout=stdout, stderr=stderr, return_value=None,
                execution_count=count, duration_ms=round(r.duration_ms, 3), truncated=r.truncated,
                error=None, exit_code=r.exit_code,
            )
            out, out_cut = cap_text(stdout, self.log_cap)
            err_text, err_cut = cap_text(stderr, self.log_cap)
            executed_at = self._now()
            self._append([se.CommandExecuted(
                result_id=o.exec_id, mode="command", status=status, executed_at=executed_at,
                expires_at=self._expires(), command=argv, exit_code=r.exit_code, stdout=out,
                stderr=err_text, duration_ms=result.duration_ms,
                truncated=r.truncated or out_cut or err_cut, execution_count=count,
            )], ctx)
            done(SessionOutcome(result, executed_at), None)

        self._run(run, _guarded(then, done), None)


# ---------------------------------------------------------------------- supervisor


class SessionSupervisor:
    """Registry, activation and passivation of session actors, and the expiry timer:
    every ``tick`` seconds, active sessions whose ``expires_at`` has passed (by the
    injected clock) are expired. ``active`` and ``ended`` read the view, not the live
    actors, so a passivated session expires like any other."""

    def __init__(
        self,
        *,
        store: EventStore,
        kernels: KernelSupervisor,
        containers: Supervisor,
        workers: Executor,
        clock: Clock,
        node_id: str,
        name_taken: Callable[[str], bool],
        active: Callable[[], Iterable[se.SessionState]],
        ended: Callable[[], Iterable[se.SessionState]] = lambda: (),
        kernel_view: Callable[[str], k.KernelState | None] | None = None,
        output_cap: int = 1 << 20,
        log_cap: int = LOG_OUTPUT_CAP,
        ask_timeout: float = 30.0,
        tick: float = 1.0,
        passivate_after: float = 300.0,
        queue_depth: int = QUEUE_DEPTH,
    ) -> None:
        self.store = store
        self.kernels = kernels
        self.containers = containers
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.name_taken = name_taken
        self.active = active
        self.ended = ended
        self.kernel_view = kernel_view or kernels.kernel_state
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.tick = tick
        self.queue_depth = queue_depth
        self.registry: Registry[SessionActor] = Registry(
            "session", start=self._start_actor, load=self._load, ask_timeout=ask_timeout,
            passivate_after=passivate_after)
        self._creating: set[str] = set()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.expired = 0
        self.kernels_closed = 0  # kernels of ended sessions destroyed at boot

    @property
    def live_actors(self) -> int:
        return self.registry.live

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Finish what a crash cut short, expire what is due now (after a restart too),
        then keep checking."""
        self.close_kernels_of_ended()
        self.expire_due()
        self._stop.clear()
        self._timer = threading.Thread(target=self._loop, name="berthd-session-expiry", daemon=True)
        self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=30)
            self._timer = None
        self.registry.stop()

    def passivate_idle(self, idle_for: float | None = None) -> int:
        return self.registry.passivate_idle(idle_for)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.expire_due()
            except Exception:
                log.exception("session expiry")

    def expire_due(self, timeout: float = 60.0) -> int:
        """Expire every active session whose ``expires_at`` has passed; wait for their
        kernels to close. Returns how many were expired."""
        now = rfc3339(self.clock())
        futures: list[tuple[str, Future[Reply]]] = []
        for state in list(self.active()):
            if not se.due_to_expire(state, now):
                continue
            try:
                futures.append((state.id, self.session_command(state.id, se.ExpireSession(), SYSTEM)))
            except Exception:
                log.exception("cannot expire session %s", state.id)
        n = 0
        for session_id, f in futures:
            try:
                reply = f.result(timeout=timeout)
                n += reply.state is not None and reply.state.status == "expired"
            except Exception as exc:
                log.warning("expiring session %s: %s", session_id, exc)
        self.expired += n
        return n

    def close_kernels_of_ended(self, timeout: float = 60.0) -> int:
        """Boot-time: a session closed or expired (on the log) whose kernel was not
        destroyed — the daemon stopped in between — gets its kernel destroyed now. A
        destroy that had begun is finished by the kernels' own reconciliation."""
        futures: list[tuple[str, Future[Reply]]] = []
        for state in list(self.ended()):
            if state.status not in se.FINAL or state.kernel_id is None:
                continue
            try:
                kernel = self.kernel_view(state.kernel_id)
                if kernel is None or kernel.status in k.FINAL or kernel.destroying:
                    continue
                futures.append((state.kernel_id, self.kernels.kernel_command(
                    state.kernel_id, k.DestroyKernel(), SYSTEM)))
            except Exception:
                log.exception("cannot close the kernel of ended session %s", state.id)
        n = 0
        for kernel_id, f in futures:
            try:
                f.result(timeout=timeout)
                n += 1
            except Exception as exc:
                log.warning("closing kernel %s of an ended session: %s", kernel_id, exc)
        self.kernels_closed += n
        return n

    # ------------------------------------------------------------------ commands

    def create_session(self, command: se.CreateSession, ctx: CommandContext) -> Future[Reply]:
        session_id = new_id()
        if command.runtime is not None and command.runtime not in self.kernels.runtimes:
            raise ValidationError(
                f"runtime '{command.runtime}' is not available on this node "
                f"(available: {', '.join(sorted(self.kernels.runtimes))})", field="runtime")
        name = command.name or f"session-{session_id}"
        with self.registry.lock:
            if self.name_taken(name) or name in self._creating:
                raise Conflict(f"the session name '{name}' is taken; choose another", field="name", name=name)
            self._creating.add(name)
            ref = self.registry.spawn(session_id, None)
        try:
            future: Future[Reply] = self.registry.ask(ref, "handle", command, ctx, name=name)
        except BaseException:
            self._release(name)
            raise
        future.add_done_callback(lambda _f: self._release(name))
        return future

    def _release(self, name: str) -> None:
        with self.registry.lock:
            self._creating.discard(name)

    def session_command(self, session_id: str, command: Command, ctx: CommandContext,
                        **extra: Any) -> Future[Reply]:
        future: Future[Reply] = self.registry.call(session_id, "handle", command, ctx, **extra)
        return future

    def _get(self, session_id: str) -> pykka.ActorRef[SessionActor]:
        return self.registry.get(session_id)

    def _load(self, session_id: str) -> se.SessionState:
        state, _ = load_state(self.store, session_id, "session", se.replay,
                              lambda i: SessionNotFound(f"no session {i}", id=i))
        return state

    def _start_actor(self, session_id: str, state: se.SessionState | None) -> pykka.ActorRef[SessionActor]:
        ref: pykka.ActorRef[SessionActor] = SessionActor.start(
            session_id, state, store=self.store, kernels=self.kernels, containers=self.containers,
            workers=self.workers, clock=self.clock, node_id=self.node_id, output_cap=self.output_cap,
            log_cap=self.log_cap, queue_depth=self.queue_depth,
        )
        return ref


# ---------------------------------------------------------------------- helpers



def _guarded(then: Callable[[Any, BaseException | None], None], done: _Done) \
        -> Callable[[Any, BaseException | None], None]:
    """``then``, but a failure in it (the log cannot be written) still answers the caller."""
    def step(value: Any, err: BaseException | None) -> None:
        try:
            then(value, err)
        except BaseException as exc:
            done(None, exc)

    return step


def _guarded_future(then: Callable[[Any, BaseException | None], None], future: Future[Reply]) \
        -> Callable[[Any, BaseException | None], None]:
    """``then``, but a failure in it still answers the caller."""
    def step(value: Any, err: BaseException | None) -> None:
        try:
            then(value, err)
        except BaseException as exc:
            _fail(future, exc)

    return step


def _started(extra: dict[str, Any]) -> None:
    started: threading.Event | None = extra.get("started")
    if started is not None:
        started.set()


def _fail(future: Future[Reply], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(_mapped(exc))


def _ended(s: se.SessionState) -> BerthdError:
    if s.status == "expired":
        return ExpiredSession(f"session {s.name} expired at {s.expires_at}; open a new session",
                              id=s.id, status="expired")
    return Conflict(f"session {s.name} is {s.status}; open a new session", id=s.id, status=s.status)


def _mapped(exc: BaseException | None) -> BaseException:
    if exc is None:
        return RuntimeFailed("the session's kernel gave no answer")
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, StoreDown):
        return StoreUnavailable(f"the event log cannot be written: {exc}")
    if isinstance(exc, TimeoutError):
        return RuntimeUnavailable("the kernel or its sandbox did not answer in time; retry")
    return exc
