"""The supervisor: one registry of live entity actors, activation by replay, passivation
of idle ones, and the boot-time reconciliation of the log with the runtimes.

Actors are a cache of the log: an idle actor is stopped after ``passivate_after`` seconds
and rebuilt from its stream on the next command (the registry, activation and passivation
are ``berthd.actors._registry``'s, shared with the kernel and session supervisors). Only the supervisor starts or stops
entity actors; everyone else goes through ``container_command``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any

import pykka

from berthd.actors._registry import Registry
from berthd.actors._stream import load_state
from berthd.actors.container import ContainerActor
from berthd.actors.context import SYSTEM, Clock, CommandContext, Reply, new_id
from berthd.domain import container as c
from berthd.domain.base import Event
from berthd.domain.errors import (
    Conflict,
    ContainerNotFound,
    RuntimeUnavailable,
    StoreUnavailable,
    ValidationError,
)
from berthd.domain.node import OrphanContainerFound
from berthd.events.store import ConcurrencyConflict, EventStore
from berthd.events.store import StoreUnavailable as StoreDown
from berthd.runtime import base as rt

__all__ = ["Supervisor", "append_retrying"]

log = logging.getLogger(__name__)
_NAME_HOLD = 30.0  # seconds a created name stays reserved while the projection catches up


def append_retrying(store: EventStore, stream_id: str, events: list[Event], meta: Any,
                    attempts: int = 5) -> int:
    """Append to a stream with no actor of its own (node, images, keys): read its version,
    append, and retry on a conflict. Returns the position of the last event."""
    for _ in range(attempts):
        version = len(store.read_stream(stream_id))
        try:
            return store.append(stream_id, version, events, meta)[-1].position
        except ConcurrencyConflict:
            continue
        except StoreDown as exc:
            raise StoreUnavailable(f"the event log cannot be written: {exc}") from exc
    raise Conflict(f"stream {stream_id} is too busy; retry")


class Supervisor:
    """Registry, activation, passivation and reconciliation of container actors."""

    def __init__(
        self,
        *,
        store: EventStore,
        runtimes: dict[str, rt.Runtime],
        default_runtime: str,
        workers: Executor,
        clock: Clock,
        node_id: str,
        name_taken: Callable[[str], bool],
        is_known: Callable[[str], bool] = lambda _id: False,
        passivate_after: float = 300.0,
        ask_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.runtimes = runtimes
        self.default_runtime = default_runtime
        self.workers = workers
        self.clock = clock
        self.node_id = node_id
        self.name_taken = name_taken
        self.is_known = is_known
        self.passivate_after = passivate_after
        self.ask_timeout = ask_timeout
        # the registry passivates on its own thread once ``start`` has run
        self.registry: Registry[ContainerActor] = Registry(
            "container", start=self._start_actor, load=self._load, ask_timeout=ask_timeout,
            passivate_after=0.0)
        self._reserved_names: dict[str, tuple[str, float]] = {}
        self._names_lock = threading.Lock()  # never held while anything else is taken
        self._stop = threading.Event()
        self.exit_listeners: list[Callable[[rt.ExitNotice], None]] = []  # e.g. the kernels

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for runtime in self.runtimes.values():
            runtime.watch(self._on_exit)
        self.registry.start_passivation(self.passivate_after)

    def stop(self) -> None:
        self._stop.set()
        self.registry.stop()

    @property
    def live_actors(self) -> int:
        return self.registry.live

    @property
    def activations(self) -> int:
        return self.registry.activations

    @property
    def passivations(self) -> int:
        return self.registry.passivations

    # ------------------------------------------------------------------ commands

    def create_container(self, command: c.CreateContainer, ctx: CommandContext,
                         network: bool = True, output_cap: int = 1 << 20, *,
                         berth_dir: bool = False, berth_id: str | None = None) -> Future[Reply]:
        """Create (and by default start) a container. ``berth_dir``: give it a directory
        shared with the host (kernel agents live there); ``berth_id``: the id to use, when
        the caller recorded it beforehand (a kernel's sandbox)."""
        runtime = command.runtime or self.default_runtime
        if runtime not in self.runtimes:
            raise ValidationError(
                f"runtime '{runtime}' is not available on this node (available: {', '.join(sorted(self.runtimes))})",
                field="runtime")
        berth_id = berth_id or new_id()
        name = command.name or f"berth-{berth_id}"
        with self._names_lock:
            now = time.monotonic()
            reserved = self._reserved_names.get(name)
            held = reserved is not None and now - reserved[1] < _NAME_HOLD and not self.is_known(reserved[0])
            if self.name_taken(name) or held:
                raise Conflict(f"the name '{name}' is taken; choose another or remove that container",
                               field="name", name=name)
            self._reserved_names[name] = (berth_id, now)
        ref = self.registry.spawn(berth_id, None)
        future: Future[Reply] = self.registry.ask(ref, "handle", command, ctx, new_id=berth_id, runtime=runtime,
                                          name=name, network=network, output_cap=output_cap,
                                          berth_dir=berth_dir)
        future.add_done_callback(lambda f: self._release_name(name, failed=f.exception() is not None))
        return future

    def container_command(self, berth_id: str, command: Any, ctx: CommandContext, **extra: Any) -> Future[Reply]:
        """Send ``command`` to the container's actor, activating it if needed."""
        future: Future[Reply] = self.registry.call(berth_id, "handle", command, ctx, **extra)
        return future

    def container_state(self, berth_id: str) -> c.ContainerState | None:
        """The actor's state (only for callers that need the write side's truth)."""
        state: c.ContainerState | None = self.registry.call(berth_id, "get_state")
        return state

    def observe(self, berth_id: str) -> None:
        """Have the container's actor look at the runtime now and record what changed
        (an exit, a vanished container); the recording itself follows asynchronously."""
        self.registry.call(berth_id, "observe")

    # ------------------------------------------------------------------ boot

    def reconcile(self, containers: Iterable[c.ContainerState], timeout: float = 60.0) -> dict[str, int]:
        """Bring the log in line with the runtimes; report orphans. Returns counts.

        One listing per runtime says what is there; only containers whose log and runtime
        may disagree are activated (anything running or with an operation in flight, and
        anything the runtime shows differently), so a boot does not wake every container.
        """
        managed: dict[str, dict[str, rt.SandboxStatus]] = {}
        for name, runtime in self.runtimes.items():
            try:
                managed[name] = {s.berth_id: s for s in runtime.list_managed(self.node_id)}
            except rt.RuntimeError_ as exc:
                log.warning("reconcile: runtime %s unavailable: %s", name, exc)
        futures: list[Future[Reply]] = []
        checked = 0
        for state in containers:
            if state.status in c.FINAL or state.runtime not in managed:
                continue
            seen = managed[state.runtime].get(state.id)
            if state.pending is None and state.status in ("exited", "created") and seen is not None \
                    and seen.state == state.status:
                continue  # nothing can have changed that the log does not know
            try:
                futures.append(self.registry.call(state.id, "reconcile"))
                checked += 1
            except Exception:
                log.exception("reconcile: cannot activate container %s", state.id)
        failed = 0
        for f in futures:
            try:
                f.result(timeout=timeout)
            except Exception as exc:
                failed += 1
                log.warning("reconcile: %s", exc)
        orphans = self._report_orphans(managed)
        return {"checked": checked, "failed": failed, "orphans": orphans}

    def _report_orphans(self, managed: dict[str, dict[str, rt.SandboxStatus]]) -> int:
        node_stream = f"node-{self.node_id}"
        known_orphans = {
            r.event.berth_id for r in self.store.read_stream(node_stream)
            if r.type == "OrphanContainerFound"
        }
        found = 0
        for name, statuses in managed.items():
            for status in statuses.values():
                if status.berth_id in known_orphans:
                    continue
                if self.store.read_stream(status.berth_id):
                    continue
                log.warning("orphan container %s (%s) in runtime %s: reported, left alone",
                            status.berth_id, status.runtime_ref, name)
                append_retrying(self.store, node_stream, [
                    _orphan(status, name)], SYSTEM.meta(self.clock, self.node_id))
                found += 1
        return found

    # ------------------------------------------------------------------ internals

    def _release_name(self, name: str, failed: bool) -> None:
        """A failed create frees its name at once; a successful one holds it until the
        projection surely has it (the read side may lag the write by a moment)."""
        with self._names_lock:
            if failed:
                self._reserved_names.pop(name, None)
            for other, (_, at) in list(self._reserved_names.items()):
                if time.monotonic() - at >= _NAME_HOLD:
                    del self._reserved_names[other]

    def _get(self, berth_id: str) -> pykka.ActorRef[ContainerActor]:
        return self.registry.get(berth_id)

    def _load(self, berth_id: str) -> tuple[c.ContainerState, int]:
        return load_state(self.store, berth_id, "container", c.replay,
                          lambda i: ContainerNotFound(f"no container {i}", id=i))

    def _start_actor(self, berth_id: str, loaded: tuple[c.ContainerState, int] | None) \
            -> pykka.ActorRef[ContainerActor]:
        state, position = loaded if loaded is not None else (None, 0)
        ref: pykka.ActorRef[ContainerActor] = ContainerActor.start(
            berth_id, state, store=self.store, runtimes=self.runtimes, workers=self.workers,
            clock=self.clock, node_id=self.node_id, position=position,
        )
        return ref

    def _on_exit(self, notice: rt.ExitNotice) -> None:
        """Called on a runtime's watch thread: have the actor look and record the exit."""
        if self._stop.is_set():
            return
        for listener in self.exit_listeners:
            try:
                listener(notice)
            except Exception:
                log.exception("exit listener for %s", notice.berth_id)
        try:
            self.observe(notice.berth_id)
        except ContainerNotFound:
            pass  # not ours (an orphan): reported at boot
        except (pykka.ActorDeadError, RuntimeUnavailable, StoreUnavailable) as exc:
            log.warning("exit of %s not recorded yet: %s", notice.berth_id, exc)
        except Exception:
            log.exception("exit notice for %s", notice.berth_id)

    def passivate_idle(self) -> int:
        """Ask every actor to stop if it has been idle for ``passivate_after``; the actor
        decides on its own mailbox. The registry lock is never held across the ask."""
        return self.registry.passivate_idle(self.passivate_after)


def _orphan(status: rt.SandboxStatus, runtime: str) -> Event:
    return OrphanContainerFound(berth_id=status.berth_id, runtime=runtime,
                                runtime_ref=status.runtime_ref, state=status.state)
