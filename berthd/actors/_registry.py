"""What every entity supervisor and entity actor do the same way, written once: the
registry of live actors (activation by replay, a retrying ask, passivation of idle ones)
and, on the actor side, side effects run on a worker thread whose outcome comes back to
the mailbox, and the passivation handshake (``passivate`` decided on the mailbox, later
messages answered ``Retired``).

The registry lock is never held across an ask: an actor asking its own supervisor (or
another one) never deadlocks against it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pykka
from pykka.messages import ProxyCall

from berthd.domain.errors import Busy, Conflict

__all__ = ["CommitFailed", "EntityActor", "Registry", "Retired", "Step"]

log = logging.getLogger(__name__)

A = TypeVar("A", bound="EntityActor")


@dataclass(slots=True)
class Step:
    """A worker finished ``call``; ``then(value, error)`` continues on the mailbox."""

    value: Any
    error: BaseException | None
    then: Callable[[Any, BaseException | None], None]
    future: Future[Any] | None


class Retired(Exception):
    """The actor was passivated; the caller activates the entity again and retries."""


@dataclass(slots=True)
class CommitFailed:
    """An append the actor did not wait for failed: its state is ahead of the log."""

    error: BaseException


class EntityActor(pykka.ThreadingActor):
    """An entity's actor: side effects off the mailbox, idle detection, passivation."""

    kind = "entity"

    def __init__(self, stream_id: str, workers: Executor) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.workers = workers
        self.in_flight = 0  # side effects running on workers
        self.last_used = time.monotonic()
        self.retired = False  # passivated: every later message must go to a new activation
        self._commits: list[Future[int]] = []  # appends submitted without waiting, not yet decided

    # ------------------------------------------------------------------ passivation

    def is_idle(self) -> bool:
        """Nothing in flight, nothing being committed (a new activation would replay a
        log without it); subclasses add what else must be quiet."""
        return self.in_flight == 0 and not self.committing()

    def committing(self) -> bool:
        self._commits = [f for f in self._commits if not f.done()]
        return bool(self._commits)

    # ------------------------------------------------------------------ pipelined appends

    def watch_commit(self, committed: Future[int]) -> None:
        """An append submitted without waiting (``append_evolved_async``): the actor
        stays active until it is decided, and ``resync``s on its mailbox if it fails."""
        self._commits = [f for f in self._commits if not f.done()]
        self._commits.append(committed)
        ref = self.actor_ref

        def done(f: Future[int]) -> None:
            error = f.exception()
            if error is not None:
                with suppress_dead():
                    ref.tell(CommitFailed(error))

        committed.add_done_callback(done)

    def resync(self, error: BaseException) -> None:
        """An append this actor did not wait for failed: rebuild the state from the log
        (subclasses that pipeline appends). By default, stop: the next command activates
        the entity again from its log."""
        log.warning("%s %s: an append failed (%s); reloading from the log", self.kind, self.stream_id, error)
        self.retired = True
        self.stop()

    def passivate(self, idle_for: float) -> bool:
        """Stop if idle for ``idle_for`` seconds. Decided here, on the mailbox, so no
        command can slip in between the check and the stop; later ones get ``Retired``."""
        if self.retired:
            return True
        if not self.is_idle() or time.monotonic() - self.last_used < idle_for:
            return False
        self.retired = True
        self.stop()
        return True

    def touch(self) -> None:
        """A command arrives: refuse it if passivated (the caller activates again)."""
        if self.retired:
            raise Retired(self.stream_id)
        self.last_used = time.monotonic()

    # ------------------------------------------------------------------ side effects

    def run_on_worker(self, call: Callable[[], Any], then: Callable[[Any, BaseException | None], None],
                      future: Future[Any] | None = None) -> None:
        """Run ``call`` on a worker; ``then`` gets its value or error on the mailbox. If
        the actor is gone by then, ``future`` (if any) fails with a retryable 409."""
        self.in_flight += 1
        ref = self.actor_ref
        kind = self.kind

        def work() -> None:
            try:
                value, error = call(), None
            except BaseException as exc:
                value, error = None, exc
            try:
                ref.tell(Step(value, error, then, future))
            except pykka.ActorDeadError:
                if future is not None and not future.done():
                    future.set_exception(Conflict(f"the {kind}'s actor stopped; retry"))

        self.workers.submit(work)

    def on_receive(self, message: Any) -> Any:
        try:
            if isinstance(message, CommitFailed):
                self.resync(message.error)
            elif isinstance(message, Step):
                self.in_flight -= 1
                self.last_used = time.monotonic()
                if self.retired:  # resyncing: its state is ahead of the log, it must not append
                    if message.future is not None and not message.future.done():
                        message.future.set_exception(Conflict(f"the {self.kind}'s actor restarted; retry"))
                    return None
                try:
                    message.then(message.value, message.error)
                except BaseException as exc:
                    log.exception("%s %s: a step failed", self.kind, self.stream_id)
                    if message.future is not None and not message.future.done():
                        message.future.set_exception(exc)
            else:
                self.on_message(message)
        except BaseException:  # a tell must never kill the actor
            log.exception("%s %s: failed to handle %s", self.kind, self.stream_id, type(message).__name__)
        return None

    def on_message(self, message: Any) -> None:
        """Other tells (subclasses)."""


class Registry(Generic[A]):
    """Live actors of one kind by entity id: activation by replay (``load`` returns the
    state or raises the kind's ``NotFound``), a retrying ask, and passivation of actors
    idle for ``passivate_after`` seconds (0: never) by a thread of its own."""

    def __init__(
        self,
        kind: str,
        *,
        start: Callable[[str, Any], pykka.ActorRef[A]],
        load: Callable[[str], Any],
        ask_timeout: float = 30.0,
        passivate_after: float = 300.0,
    ) -> None:
        self.kind = kind
        self._start = start
        self._load = load
        self.ask_timeout = ask_timeout
        self.passivate_after = passivate_after
        self._actors: dict[str, pykka.ActorRef[A]] = {}
        self.lock = threading.RLock()  # the registry; never held across an ask
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self.activations = 0
        self.passivations = 0

    @property
    def live(self) -> int:
        with self.lock:
            return len(self._actors)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self._actors)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Stop the passivator and every live actor (their entities live on in the log)."""
        self._stop.set()
        if self._janitor is not None:
            self._janitor.join(timeout=10)
            self._janitor = None
        with self.lock:
            refs = list(self._actors.values())
            self._actors.clear()
        for ref in refs:
            try:
                ref.stop(timeout=10)
            except pykka.ActorDeadError:
                pass
            except Exception:
                log.exception("stopping a %s actor", self.kind)

    # ------------------------------------------------------------------ actors

    def spawn(self, entity_id: str, state: Any) -> pykka.ActorRef[A]:
        """Start an actor for a new entity (or one just loaded)."""
        ref = self._start(entity_id, state)
        with self.lock:
            self._actors[entity_id] = ref
            self._start_janitor()
        return ref

    def get(self, entity_id: str) -> pykka.ActorRef[A]:
        """The live actor, activated from the log if needed."""
        with self.lock:
            ref = self._actors.get(entity_id)
            if ref is not None and ref.is_alive():
                return ref
            ref = self.spawn(entity_id, self._load(entity_id))
            self.activations += 1
            return ref

    def peek(self, entity_id: str) -> pykka.ActorRef[A] | None:
        """The live actor if there is one; never activates."""
        with self.lock:
            ref = self._actors.get(entity_id)
        return ref if ref is not None and ref.is_alive() else None

    def forget(self, entity_id: str, ref: pykka.ActorRef[A]) -> None:
        with self.lock:
            if self._actors.get(entity_id) is ref:
                del self._actors[entity_id]

    def ask(self, ref: pykka.ActorRef[A], method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the actor's mailbox; its answer (usually a future). A
        ``ProxyCall`` asked directly: ``ActorRef.proxy()`` introspects the actor's class
        on every call (0.5-1 ms, more than the rest of the ask)."""
        try:
            return ref.ask(ProxyCall(attr_path=(method,), args=args, kwargs=kwargs), timeout=self.ask_timeout)
        except pykka.Timeout:
            raise Busy(f"the {self.kind} did not take the command within {self.ask_timeout:.0f} s; "
                       "retry") from None

    def call(self, entity_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``ask`` the entity's actor, activating it again if it was passivated between
        the lookup and the ask."""
        for _ in range(5):
            ref = self.get(entity_id)
            try:
                return self.ask(ref, method, *args, **kwargs)
            except (pykka.ActorDeadError, Retired):
                self.forget(entity_id, ref)
        raise Conflict(f"{self.kind} {entity_id} is busy restarting its actor; retry")

    # ------------------------------------------------------------------ passivation

    def start_passivation(self, passivate_after: float) -> None:
        """Passivate actors idle for ``passivate_after`` seconds from now on (0: never)."""
        with self.lock:
            self.passivate_after = passivate_after
            self._start_janitor()

    def _start_janitor(self) -> None:
        if self._janitor is None and self.passivate_after > 0 and not self._stop.is_set():
            self._janitor = threading.Thread(target=self._passivate_loop,
                                             name=f"berthd-passivator-{self.kind}", daemon=True)
            self._janitor.start()

    def _passivate_loop(self) -> None:
        interval = max(0.05, min(5.0, self.passivate_after / 4))
        while not self._stop.wait(interval):
            try:
                self.passivate_idle()
            except Exception:
                log.exception("%s passivation", self.kind)

    def passivate_idle(self, idle_for: float | None = None) -> int:
        """Ask every actor to stop if it has been idle long enough; the actor decides on
        its own mailbox. A busy actor is left for the next round, never forgotten."""
        idle = self.passivate_after if idle_for is None else idle_for
        with self.lock:
            snapshot = list(self._actors.items())
        stopped = 0
        for entity_id, ref in snapshot:
            try:
                gone = ref.ask(ProxyCall(attr_path=("passivate",), args=(idle,), kwargs={}), timeout=5)
            except pykka.ActorDeadError:
                gone = True
            except pykka.Timeout:
                continue
            if gone:
                self.forget(entity_id, ref)
                stopped += 1
        self.passivations += stopped
        return stopped


def suppress_dead() -> contextlib.AbstractContextManager[None]:
    """For tells to an actor that may have just stopped."""
    return contextlib.suppress(pykka.ActorDeadError)
