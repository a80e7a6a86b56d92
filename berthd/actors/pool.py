"""``WarmPool``: started sandboxes kept ready for one-shot runs (``POST /v1/run``).

One pool per daemon, keyed by (runtime, image, profile). A pool sandbox is an ordinary
container entity, created through the supervisor as ``system`` with an idle main process
and the label ``berth.pool=1``, so it is on the log like any other. A run takes one (a
*hit*), or creates one cold when none is ready (a *miss*; or ``fast: false``: *cold*),
execs its command in it with the run's context, and the sandbox is then removed — always,
on success, failure and timeout alike; a used sandbox is never handed out again.

After every take the pool's own thread tops the key up again (``size`` per key that has
been used, plus the keys configured to be warmed at start): after a miss at once, after a
hit once the run is over, so that making a sandbox never competes with a hit's command.
Before a sandbox is offered, its exec agent is started (``berthd.kernel.exec_agent``,
where the image has a python3), so a hit runs its command as a round trip on a held
stream rather than a runtime exec. Removals go through the same
thread, so a run answers once its command finished, not once its sandbox is gone (the
removal intent is on the log a moment later). On stop the pool removes its idle
sandboxes; at start it removes pool sandboxes a crash left behind (found by their label
in the containers view).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, cast

from berthd.actors.container import POOL_LABEL, ExecOutcome
from berthd.actors.context import SYSTEM, CommandContext, Reply
from berthd.actors.supervisor import Supervisor
from berthd.domain import container as c
from berthd.domain.errors import BerthdError, Conflict, ContainerNotFound, RuntimeUnavailable
from berthd.kernel.exec_agent import exec_agents

__all__ = ["POOL_LABEL", "Lease", "PoolKey", "WarmPool"]

log = logging.getLogger(__name__)

# POOL_LABEL (defined with the container actor, which reads it too): on every sandbox the
# pool made (warm or cold); such a sandbox is the pool's to remove, and one left over from
# a crash is removed at the next start.

Source = Literal["hit", "miss", "cold"]


class PoolKey(NamedTuple):
    runtime: str
    image: str
    profile: str = "default"


class _Containers(Protocol):
    """What the pool reads of the containers view."""

    def get(self, id_or_name: str) -> c.ContainerState | None: ...

    def all(self) -> list[c.ContainerState]: ...


@dataclass(frozen=True, slots=True)
class Lease:
    """A sandbox handed to one run; released (removed) exactly once."""

    container_id: str
    key: PoolKey
    source: Source


@dataclass(slots=True)
class _Slot:
    idle: deque[str] = field(default_factory=deque)
    creating: int = 0
    hits: int = 0
    misses: int = 0
    cold: int = 0
    failures: int = 0  # consecutive failed creates: the refill backs off
    retry_at: float = 0.0
    last_error: str | None = None


_STOP = object()


class WarmPool:
    """Warm sandboxes per (runtime, image, profile); see the module docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        containers: _Containers,
        *,
        default_image: str,
        size: int = 2,
        warm: Iterable[PoolKey] = (),
        idle_command: tuple[str, ...] = ("sleep", "infinity"),
        create_timeout: float = 120.0,
        sweep_interval: float = 2.0,
    ) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.supervisor = supervisor
        self.containers = containers
        self.default_image = default_image
        self.size = size
        self.idle_command = idle_command
        self.create_timeout = create_timeout
        self.sweep_interval = sweep_interval
        self._slots: dict[PoolKey, _Slot] = {k: _Slot() for k in warm}
        self._lock = threading.Lock()  # the slots; never held across a call into the supervisor
        self._jobs: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._creates: set[Future[Reply]] = set()
        self._removing: set[Future[Reply]] = set()
        self.removed = 0
        self.leftovers_removed = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Remove what a crash left behind, then warm the configured keys."""
        self.leftovers_removed = self._remove_leftovers()
        self._thread = threading.Thread(target=self._loop, name="berthd-pool", daemon=True)
        self._thread.start()
        with self._lock:
            keys = list(self._slots)
        for key in keys:
            self._jobs.put(key)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop refilling; remove the idle sandboxes (and those still being made)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        deadline = time.monotonic() + timeout
        self._jobs.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            creates = list(self._creates)
        wait_futures(creates, timeout=max(0.1, deadline - time.monotonic()))
        # made but not offered yet (their agent job never ran): removed with the idle ones
        unoffered: list[str] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, tuple) and job[0] == "agent":
                unoffered.append(job[2])
            elif isinstance(job, tuple) and job[0] in ("remove", "discard"):
                unoffered.append(job[1])
        with self._lock:
            idle = [i for slot in self._slots.values() for i in slot.idle] + unoffered
            for slot in self._slots.values():
                slot.idle.clear()
        for berth_id in idle:
            self._remove(berth_id, SYSTEM)
        with self._lock:
            removing = list(self._removing)
        done, left = wait_futures(removing, timeout=max(0.1, deadline - time.monotonic()))
        if left:
            log.warning("pool: %d sandboxes still being removed at stop", len(left))

    # ------------------------------------------------------------------ runs

    def key(self, image: str | None = None, profile: str = "default", runtime: str | None = None) -> PoolKey:
        return PoolKey(runtime or self.supervisor.default_runtime, image or self.default_image, profile)

    def acquire(self, key: PoolKey, ctx: CommandContext, *, fast: bool = True) -> Lease:
        """A running sandbox for one run: a warm one (hit) or a new one (miss, cold)."""
        if fast:
            while True:
                with self._lock:
                    slot = self._slots.setdefault(key, _Slot())
                    berth_id = slot.idle.popleft() if slot.idle else None
                    if berth_id is None:
                        slot.misses += 1
                if berth_id is None:
                    self._jobs.put(key)  # top it up now; after a hit, once the run is over
                    break
                state = self.containers.get(berth_id)
                if state is None or (state.status == "running" and state.pending is None):
                    with self._lock:
                        slot.hits += 1
                    return Lease(berth_id, key, "hit")
                self._discard(berth_id)  # died while idle: never hand it out
        else:
            with self._lock:
                self._slots.setdefault(key, _Slot()).cold += 1
        source: Source = "miss" if fast else "cold"
        reply = self._wait(self.supervisor.create_container(self._create_command(key), ctx),
                           self.create_timeout)
        return Lease(reply.state.id, key, source)

    def release(self, lease: Lease, ctx: CommandContext) -> None:
        """The run is over: remove its sandbox (never reused); after a hit, top the key
        up (not before: creating a sandbox would compete with the run for the CPU)."""
        if self._stopping or self._thread is None or not self._thread.is_alive():
            self._remove(lease.container_id, ctx)
        else:
            self._jobs.put(("remove", lease.container_id, ctx))
            if lease.source == "hit":
                self._jobs.put(lease.key)

    def run(self, key: PoolKey, command: c.ExecInContainer, ctx: CommandContext, *, fast: bool = True,
            output_cap: int = 1 << 20, wait: float = 600.0) -> tuple[Lease, ExecOutcome]:
        """Acquire, exec ``command`` with ``ctx``, release — whatever the exec does."""
        lease = self.acquire(key, ctx, fast=fast)
        try:
            reply = self._wait(self.supervisor.container_command(
                lease.container_id, command, ctx, output_cap=output_cap), wait)
        except Conflict:
            if lease.source != "hit":
                raise
            # the warm sandbox went away under us (exited, vanished): one more try, cold
            self.release(lease, ctx)
            lease = self.acquire(key, ctx, fast=False)
            try:
                reply = self._wait(self.supervisor.container_command(
                    lease.container_id, command, ctx, output_cap=output_cap), wait)
            finally:
                self.release(lease, ctx)
            return lease, cast(ExecOutcome, reply.result)
        except BaseException:
            self.release(lease, ctx)
            raise
        self.release(lease, ctx)
        return lease, cast(ExecOutcome, reply.result)

    # ------------------------------------------------------------------ numbers

    def stats(self) -> dict[str, Any]:
        """Per key and in total, for ``/v1/info``."""
        with self._lock:
            slots = list(self._slots.items())
            keys = [
                {"runtime": k.runtime, "image": k.image, "profile": k.profile, "size": self.size,
                 "available": len(s.idle), "creating": s.creating, "hits": s.hits, "misses": s.misses,
                 "cold": s.cold, "last_error": s.last_error}
                for k, s in slots
            ]
            return {
                "size": self.size,
                "available": sum(len(s.idle) for _, s in slots),
                "hits": sum(s.hits for _, s in slots),
                "misses": sum(s.misses for _, s in slots),
                "cold": sum(s.cold for _, s in slots),
                "removed": self.removed,
                "removing": len(self._removing),
                "leftovers_removed": self.leftovers_removed,
                "keys": keys,
                # execs through exec agents vs runtime execs, per runtime (all containers)
                "exec_agents": {name: exec_agents(runtime).stats()
                                for name, runtime in self.supervisor.runtimes.items()},
            }

    # ------------------------------------------------------------------ internals

    def _create_command(self, key: PoolKey) -> c.CreateContainer:
        return c.CreateContainer(
            image=key.image, command=list(self.idle_command), profile=key.profile,
            labels={POOL_LABEL: "1"}, runtime=cast(Any, key.runtime), start=True,
        )

    @staticmethod
    def _wait(future: Future[Reply], timeout: float) -> Reply:
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise RuntimeUnavailable("the runtime did not answer in time; the operation goes on "
                                     "and its outcome will appear on the event stream") from None

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.sweep_interval)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            try:
                if job is None:
                    self._sweep()
                elif isinstance(job, PoolKey):
                    self._refill(job)
                elif isinstance(job, tuple) and job[0] == "remove":
                    self._remove(job[1], job[2])
                elif isinstance(job, tuple) and job[0] == "discard":
                    self._remove(job[1], SYSTEM)
                elif isinstance(job, tuple) and job[0] == "agent":
                    self._warm_agent(job[1], job[2])
            except Exception:
                log.exception("pool: %r", job)

    def _sweep(self) -> None:
        """Drop idle sandboxes that died; retry keys whose creates failed."""
        with self._lock:
            idle = [(k, i) for k, s in self._slots.items() for i in s.idle]
            keys = list(self._slots)
        for key, berth_id in idle:
            state = self.containers.get(berth_id)
            if state is not None and (state.status != "running" or state.pending is not None):
                with self._lock:
                    slot = self._slots[key]
                    if berth_id in slot.idle:
                        slot.idle.remove(berth_id)
                    else:
                        continue
                self._remove(berth_id, SYSTEM)
        for key in keys:
            self._refill(key)

    def _refill(self, key: PoolKey) -> None:
        with self._lock:
            if self._stopping:
                return
            slot = self._slots.setdefault(key, _Slot())
            if slot.failures and time.monotonic() < slot.retry_at:
                return
            wanted = self.size - len(slot.idle) - slot.creating
            slot.creating += max(0, wanted)
        for _ in range(wanted):
            try:
                future = self.supervisor.create_container(self._create_command(key), SYSTEM)
            except BaseException as exc:
                self._created(key, None, exc)
                continue
            with self._lock:
                self._creates.add(future)
            future.add_done_callback(functools.partial(self._on_created, key))

    def _on_created(self, key: PoolKey, future: Future[Reply]) -> None:
        """On the actor's thread: only bookkeeping here, never a call into an actor."""
        with self._lock:
            self._creates.discard(future)
        exc = future.exception()
        self._created(key, None if exc else future.result().state.id, exc)

    def _created(self, key: PoolKey, berth_id: str | None, exc: BaseException | None) -> None:
        if berth_id is not None:
            self._jobs.put(("agent", key, berth_id))  # still "creating" until its agent is up
            return
        with self._lock:
            slot = self._slots[key]
            slot.creating -= 1
            slot.failures += 1
            slot.retry_at = time.monotonic() + min(30.0, 0.5 * 2 ** min(slot.failures, 6))
            slot.last_error = str(exc)
        log.warning("pool: cannot warm a sandbox for %s/%s (%s): %s",
                    key.runtime, key.image, key.profile, exc)

    def _warm_agent(self, key: PoolKey, berth_id: str) -> None:
        """On the pool's thread: start the sandbox's exec agent (where the image has a
        python3), so the run is a round trip on a held stream, then offer it."""
        runtime = self.supervisor.runtimes.get(key.runtime)
        if runtime is not None and not self._stopping:
            try:
                exec_agents(runtime).warm(berth_id)
            except Exception:  # no agent: the run takes the runtime exec
                log.exception("pool: exec agent for %s", berth_id)
        with self._lock:
            slot = self._slots[key]
            slot.creating -= 1
            slot.failures, slot.last_error = 0, None
            if not self._stopping:
                slot.idle.append(berth_id)
                return
        self._remove(berth_id, SYSTEM)

    def _discard(self, berth_id: str) -> None:
        self._jobs.put(("discard", berth_id))

    def _remove(self, berth_id: str, ctx: CommandContext) -> None:
        """Send the removal (its intent is on the log when this returns); the outcome is
        only logged. A container already gone needs nothing."""
        try:
            future = self.supervisor.container_command(berth_id, c.RemoveContainer(force=True), ctx)
        except ContainerNotFound:
            return
        except BerthdError as exc:
            state = self.containers.get(berth_id)
            if state is not None and state.status in c.FINAL:
                return
            log.warning("pool: cannot remove sandbox %s: %s", berth_id, exc)
            return
        with self._lock:
            self._removing.add(future)
        future.add_done_callback(lambda f: self._on_removed(berth_id, f))

    def _on_removed(self, berth_id: str, future: Future[Reply]) -> None:
        with self._lock:
            self._removing.discard(future)
            if future.exception() is None:
                self.removed += 1
        if future.exception() is not None:
            log.warning("pool: removing sandbox %s failed: %s", berth_id, future.exception())

    def _remove_leftovers(self, timeout: float = 60.0) -> int:
        """Pool sandboxes of a previous run of the daemon (a crash, a kill): none is in
        use now — every run that held one ended with that process — so all go."""
        with self._lock:
            ours = {i for s in self._slots.values() for i in s.idle}
        leftovers = [s.id for s in self.containers.all()
                     if s.labels.get(POOL_LABEL) == "1" and s.status not in c.FINAL and s.id not in ours]
        for berth_id in leftovers:
            self._remove(berth_id, SYSTEM)
        with self._lock:
            removing = list(self._removing)
        wait_futures(removing, timeout=timeout)
        if leftovers:
            log.info("pool: removed %d sandboxes left over from a previous run", len(leftovers))
        return len(leftovers)
