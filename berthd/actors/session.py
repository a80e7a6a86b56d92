"""``SessionActor``: the one writer of a session's stream, and ``SessionSupervisor``, its
registry and expiry timer.

The pattern of the other actors: ``decide`` (pure) refuses or records (``CommandDenied``,
``SessionExpired``, ``SessionClosed``); the side effects — opening the session's kernel
through the ``KernelSupervisor``, running code in it, running a command in its sandbox
through the container ``Supervisor``, destroying the kernel — run on worker threads, never
on the mailbox (they ask other actors), and their outcome comes back as a message that
appends ``SessionKernelAttached`` or ``CommandExecuted`` and completes the caller's future.

The kernel (and its sandbox) is opened on demand at the first execution; executions that
arrive while it opens wait for it. A ``command`` result is kept on ``CommandExecuted``
(output capped) so ``GET /v1/results/{id}`` serves it from the log; a ``code`` result is the
kernel's own.

Expiry is decided from the injected clock: a command arriving after ``expires_at`` expires
the session (409 ``SESSION_EXPIRED``), and the supervisor's timer expires due sessions on
its own, at boot too, closing their kernel and sandbox.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import pykka

from berthd.actors._stream import append_evolved, cap_text, load_state
from berthd.actors.container import ExecOutcome, Retired
from berthd.actors.context import SYSTEM, Clock, CommandContext, Reply, new_id, rfc3339
from berthd.actors.kernel import LOG_OUTPUT_CAP, KernelResult, KernelSupervisor
from berthd.actors.supervisor import Supervisor
from berthd.domain import container as c
from berthd.domain import kernel as k
from berthd.domain import session as se
from berthd.domain.base import Command, Event
from berthd.domain.errors import (
    BerthdError,
    Busy,
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
class _Step:
    """A worker finished; ``then`` continues on the mailbox."""

    value: Any
    error: BaseException | None
    then: Callable[[Any, BaseException | None], None]
    future: Future[Reply] | None


@dataclass(slots=True)
class _Waiter:
    go: Callable[[], None]
    future: Future[Reply]


@dataclass(slots=True)
class _Attach:
    waiters: list[_Waiter] = field(default_factory=list)


class SessionActor(pykka.ThreadingActor):
    """One session's behaviour; its state is rebuilt from its stream on activation."""

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
    ) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.state = state
        self.store = store
        self.kernels = kernels
        self.containers = containers
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.wait = wait  # seconds a worker waits for another supervisor's outcome
        self.position = 0
        self._attach: _Attach | None = None  # the kernel being opened, and who waits for it

    # ------------------------------------------------------------------ asked by others

    def get_state(self) -> se.SessionState | None:
        return self.state

    def handle(self, command: Command, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Decide, append, start the side effect; the future completes with the outcome.
        Refusals complete it with the ``BerthdError`` at once."""
        future: Future[Reply] = Future()
        try:
            self._handle(command, ctx, future, extra)
        except BaseException as exc:  # never let a command kill the actor
            _fail(future, exc)
        return future

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Step):
            try:
                message.then(message.value, message.error)
            except BaseException as exc:  # a tell must never kill the actor
                log.exception("session %s: a step failed", self.stream_id)
                if message.future is not None:
                    _fail(message.future, exc)
        return None

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
        ref = self.actor_ref

        def work() -> None:
            try:
                value, error = call(), None
            except BaseException as exc:
                value, error = None, exc
            try:
                ref.tell(_Step(value, error, then, future))
            except pykka.ActorDeadError:
                if future is not None:
                    _fail(future, Conflict("the session's actor stopped; retry"))

        self.workers.submit(work)

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
        events = se.decide(before, command, now=now)
        self._append(events, ctx)
        ended = any(isinstance(e, (se.SessionExpired, se.SessionClosed)) for e in events)
        if isinstance(command, (se.CloseSession, se.ExpireSession)):
            if ended:  # the answer waits for the kernel and its sandbox to be gone
                self._run(self._destroy_kernel(ctx), lambda _v, _e: future.set_result(self._reply()), future)
            else:
                future.set_result(self._reply())
            return
        assert before is not None
        refused = se.refusal(events, before)
        if ended:
            self._run(self._destroy_kernel(SYSTEM), lambda _v, _e: None, None)
        if refused is not None:
            future.set_exception(refused)
            return
        if isinstance(command, se.ExecuteInSession):
            self._with_kernel(ctx, future, lambda: self._execute(command, ctx, future))
        elif isinstance(command, se.ExecuteWithRetry):
            self._with_kernel(ctx, future, lambda: self._retry(command, ctx, future))
        else:
            raise ValidationError(f"unsupported command {type(command).__name__}")

    # ------------------------------------------------------------------ the kernel

    def _with_kernel(self, ctx: CommandContext, future: Future[Reply], go: Callable[[], None]) -> None:
        """Run ``go`` (on the mailbox) once the session has a kernel, opening it if needed."""
        s = self.state
        assert s is not None
        if s.kernel_id is not None:
            go()
            return
        if self._attach is not None:
            self._attach.waiters.append(_Waiter(go, future))
            return
        self._attach = _Attach([_Waiter(go, future)])
        create = k.CreateKernel(language=s.language,  # type: ignore[arg-type]
                                image=s.image, profile=s.profile,
                                runtime=s.runtime)  # type: ignore[arg-type]
        kernels, wait = self.kernels, self.wait

        def open_kernel() -> tuple[str, str]:
            reply = kernels.create_kernel(create, ctx).result(wait)
            state: k.KernelState = reply.state
            return state.id, state.container_id

        self._run(open_kernel, lambda v, err: self._attached(v, err, ctx), None)

    def _attached(self, opened: tuple[str, str] | None, err: BaseException | None, ctx: CommandContext) -> None:
        attach, self._attach = self._attach, None
        waiters = attach.waiters if attach is not None else []
        s = self.state
        assert s is not None
        if err is not None or opened is None:
            for w in waiters:
                _fail(w.future, _mapped(err))
            return
        kernel_id, container_id = opened
        if s.status != "active":  # closed or expired while the kernel opened
            self._run(self._destroy_kernel(SYSTEM, kernel_id), lambda _v, _e: None, None)
            for w in waiters:
                _fail(w.future, _ended(s))
            return
        try:
            self._append([se.SessionKernelAttached(kernel_id=kernel_id, container_id=container_id)], ctx)
        except BaseException as exc:
            for w in waiters:
                _fail(w.future, exc)
            return
        for w in waiters:
            try:
                w.go()
            except BaseException as exc:
                _fail(w.future, exc)

    def _destroy_kernel(self, ctx: CommandContext, kernel_id: str | None = None) -> Callable[[], None]:
        kid = kernel_id or (self.state.kernel_id if self.state is not None else None)
        kernels, wait = self.kernels, self.wait

        def destroy() -> None:
            if kid is None:
                return
            try:
                kernels.kernel_command(kid, k.DestroyKernel(), ctx).result(wait)
            except (KernelNotFound, Conflict) as exc:  # already destroyed
                log.debug("session kernel %s: %s", kid, exc)
            except Exception:
                log.exception("session %s: could not destroy its kernel %s", self.stream_id, kid)

        return destroy

    # ------------------------------------------------------------------ executions

    def _execute(self, command: se.ExecuteInSession, ctx: CommandContext, future: Future[Reply]) -> None:
        def done(outcome: SessionOutcome | None, err: BaseException | None) -> None:
            if err is not None:
                _fail(future, err)
            else:
                future.set_result(self._reply(outcome))

        if command.command is not None:
            self._exec_command(list(command.command), command.timeout, ctx, done)
        else:
            assert command.code is not None
            self._exec_code(command.code, command.timeout, ctx, done)

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

    def _exec_code(self, code: str, timeout: float | None, ctx: CommandContext, done: _Done) -> None:
        s = self.state
        assert s is not None and s.kernel_id is not None
        kernel_id, kernels, wait = s.kernel_id, self.kernels, (timeout or self.wait) + 30.0

        def run() -> KernelResult:
            reply = kernels.kernel_command(kernel_id, k.ExecuteCode(code=code, timeout=timeout), ctx).result(wait)
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

    def _exec_command(self, argv: list[str], timeout: float | None, ctx: CommandContext, done: _Done) -> None:
        s = self.state
        assert s is not None and s.container_id is not None
        container_id, containers, cap = s.container_id, self.containers, self.output_cap
        wait = (timeout or self.wait) + 30.0

        def run() -> ExecOutcome:
            reply = containers.container_command(
                container_id, c.ExecInContainer(command=argv, timeout=timeout), ctx, output_cap=cap,
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
    """Registry and activation of session actors (the registry lock is never held across
    an ask), and the expiry timer: every ``tick`` seconds, active sessions whose
    ``expires_at`` has passed (by the injected clock) are expired."""

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
        output_cap: int = 1 << 20,
        log_cap: int = LOG_OUTPUT_CAP,
        ask_timeout: float = 30.0,
        tick: float = 1.0,
    ) -> None:
        self.store = store
        self.kernels = kernels
        self.containers = containers
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.name_taken = name_taken
        self.active = active
        self.output_cap = output_cap
        self.log_cap = log_cap
        self.ask_timeout = ask_timeout
        self.tick = tick
        self._actors: dict[str, pykka.ActorRef[SessionActor]] = {}
        self._creating: set[str] = set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.expired = 0

    @property
    def live_actors(self) -> int:
        with self._lock:
            return len(self._actors)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Expire what is due now (after a restart too), then keep checking."""
        self.expire_due()
        self._stop.clear()
        self._timer = threading.Thread(target=self._loop, name="berthd-session-expiry", daemon=True)
        self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=30)
            self._timer = None
        with self._lock:
            refs = list(self._actors.values())
            self._actors.clear()
        for ref in refs:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(timeout=10)

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

    # ------------------------------------------------------------------ commands

    def create_session(self, command: se.CreateSession, ctx: CommandContext) -> Future[Reply]:
        session_id = new_id()
        if command.runtime is not None and command.runtime not in self.kernels.runtimes:
            raise ValidationError(
                f"runtime '{command.runtime}' is not available on this node "
                f"(available: {', '.join(sorted(self.kernels.runtimes))})", field="runtime")
        name = command.name or f"session-{session_id}"
        with self._lock:
            if self.name_taken(name) or name in self._creating:
                raise Conflict(f"the session name '{name}' is taken; choose another", field="name", name=name)
            self._creating.add(name)
            ref = self._spawn(session_id, None)
        try:
            future = self._ask(ref, "handle", command, ctx, name=name)
        except BaseException:
            self._release(name)
            raise
        future.add_done_callback(lambda _f: self._release(name))
        return future

    def _release(self, name: str) -> None:
        with self._lock:
            self._creating.discard(name)

    def session_command(self, session_id: str, command: Command, ctx: CommandContext) -> Future[Reply]:
        for _ in range(5):
            ref = self._get(session_id)
            try:
                return self._ask(ref, "handle", command, ctx)
            except (pykka.ActorDeadError, Retired):
                self._forget(session_id, ref)
        raise Conflict(f"session {session_id} is busy restarting its actor; retry")

    def _ask(self, ref: pykka.ActorRef[SessionActor], method: str, *args: Any, **kwargs: Any) -> Future[Reply]:
        try:
            inner: Future[Reply] = getattr(ref.proxy(), method)(*args, **kwargs).get(timeout=self.ask_timeout)
        except pykka.Timeout:
            raise Busy(f"the session did not take the command within {self.ask_timeout:.0f} s; retry") from None
        return inner

    def _get(self, session_id: str) -> pykka.ActorRef[SessionActor]:
        with self._lock:
            ref = self._actors.get(session_id)
            if ref is not None and ref.is_alive():
                return ref
            state, _ = load_state(self.store, session_id, "session", se.replay,
                                  lambda i: SessionNotFound(f"no session {i}", id=i))
            ref = self._spawn(session_id, state)
            return ref

    def _spawn(self, session_id: str, state: se.SessionState | None) -> pykka.ActorRef[SessionActor]:
        ref = SessionActor.start(
            session_id, state, store=self.store, kernels=self.kernels, containers=self.containers,
            workers=self.workers, clock=self.clock, node_id=self.node_id, output_cap=self.output_cap,
            log_cap=self.log_cap,
        )
        self._actors[session_id] = ref
        return ref

    def _forget(self, session_id: str, ref: pykka.ActorRef[SessionActor]) -> None:
        with self._lock:
            if self._actors.get(session_id) is ref:
                del self._actors[session_id]


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
