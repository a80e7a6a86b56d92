"""Read models fed from the global log, and the runner that feeds them.

A ``Projection`` turns events into a read model the HTTP API answers from. The
``ProjectionRunner`` applies every event of the log, in position order, to each of its
projections, on one background thread; it also tells listeners (the WebSocket fan-out)
about each event once the projections reflect it. ``wait_for(position)`` is how a write
gets read-your-writes: the HTTP layer appends, then waits until the runner has applied
the returned position before answering from a projection.

Guarantees:

- Each event is applied to each projection once, in position order, by one thread at a
  time (the runner thread, or the caller of ``catch_up``/``rebuild``; they exclude each
  other). Readers of a projection run concurrently on other threads: a projection must
  make its updates atomic for them (a lock, or swapping immutable values).
- A projection or a listener that raises is logged with the position and skipped for that
  event; the others, and the runner, carry on. ``failures`` counts such errors per
  projection; ``rebuild()`` is the way to recover a projection after a fix.
- Listeners see every event exactly once, in order, on the applying thread, after the
  projections and ``position`` reflect it. A rebuild replays history into the projections
  but does not announce those events again.
- A store outage does not stop the runner: it logs and retries with backoff.

Checkpoints (not built yet): a projection restored from a snapshot at position P would
be registered with P; ``_apply_one`` would skip it for positions <= P and the runner would
start from the lowest such P. Every path that applies an event goes through
``_apply_one``, so that is the single place to add it.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from berthd.events.store import EventStore, Recorded

__all__ = ["Listener", "Projection", "ProjectionRunner"]

log = logging.getLogger(__name__)

Listener = Callable[[Recorded], None]


class Projection(abc.ABC):
    """A read model built by folding the log.

    ``name`` identifies it among a runner's projections (and will key its checkpoints).
    """

    name: str

    @abc.abstractmethod
    def apply(self, rec: Recorded) -> None:
        """Fold one event in. Must ignore event types it does not handle (including
        ``berthd.events.codec.UndecodedEvent``), and must not block on I/O: every other
        projection and every subscriber waits for it."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything, as before the first event (used by ``rebuild``)."""


class ProjectionRunner:
    """Feeds ``projections`` from ``store``'s log on a daemon thread.

    ``batch_size``: events read per query. ``idle_wait``: the longest the thread sleeps
    in one ``wait_for_append`` call when caught up, which bounds how long ``stop()``
    takes; the store wakes it at once on an append, so this is not a polling interval.
    """

    def __init__(
        self,
        store: EventStore,
        projections: Sequence[Projection],
        *,
        batch_size: int = 500,
        idle_wait: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        names = [p.name for p in projections]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate projection names: {', '.join(duplicates)}")
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self._store = store
        self._projections = tuple(projections)
        self._batch_size = batch_size
        self._idle_wait = idle_wait
        self._max_backoff = max_backoff
        # Held while applying: makes the runner thread, catch_up() and rebuild() take
        # turns, so events are applied once each and in order.
        self._apply_lock = threading.RLock()
        # Guards _position; notified on every applied event, for wait_for().
        self._cond = threading.Condition()
        self._position = 0
        self._announced = 0  # highest position handed to listeners; never goes back
        self._listeners: tuple[Listener, ...] = ()  # replaced, never mutated
        self._listeners_lock = threading.Lock()
        self._failures: Counter[str] = Counter()
        self._failures_lock = threading.Lock()  # not the apply lock: a rebuild is long
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state ----------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The position of the last event applied to the projections (0: none). Goes
        back to 0 while ``rebuild()`` runs."""
        with self._cond:
            return self._position

    @property
    def projections(self) -> tuple[Projection, ...]:
        return self._projections

    def projection(self, name: str) -> Projection:
        """The projection called ``name`` (KeyError if none)."""
        for p in self._projections:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def failures(self) -> dict[str, int]:
        """Errors raised by each projection's ``apply`` since start (for health/metrics)."""
        with self._failures_lock:
            return dict(self._failures)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Follow the log from the current position (0, or where ``catch_up`` got to)."""
        if self.running:
            raise RuntimeError("the projection runner is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="berthd-projections", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following and join the thread (a no-op if not running)."""
        self._stopping.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("projection runner did not stop within %.1f s", timeout)
        else:
            self._thread = None

    # -- waiting --------------------------------------------------------------------

    def wait_for(self, position: int, timeout: float) -> bool:
        """Block until the projections have applied ``position`` (True) or ``timeout``
        seconds pass (False). Woken by each applied event, not by polling."""
        with self._cond:
            return self._cond.wait_for(lambda: self._position >= position, timeout)

    # -- synchronous application ----------------------------------------------------

    def catch_up(self) -> int:
        """Apply, on the calling thread, everything in the log beyond ``position``;
        returns how many events were applied. Safe while the runner thread runs."""
        with self._apply_lock:
            return sum(self._drain().values())

    def rebuild(self) -> dict[str, int]:
        """Reset every projection and replay the whole log into them, on the calling
        thread; returns how many events of each type were replayed. Listeners are not
        told about events they have already seen. Safe while the runner thread runs
        (it waits, then continues from where the rebuild ended)."""
        with self._apply_lock:
            for p in self._projections:
                try:
                    p.reset()
                except Exception:
                    self._count_failure(p.name)
                    log.exception("projection %s failed to reset", p.name)
            with self._cond:
                self._position = 0
            return dict(self._drain())

    # -- listeners ------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(rec)`` after each new event is applied, on the applying thread.
        It must return quickly and never block (hand the event to a queue)."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``; a no-op if it was not added."""
        with self._listeners_lock:
            listeners = list(self._listeners)
            if callback in listeners:
                listeners.remove(callback)
            self._listeners = tuple(listeners)

    # -- internals ------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                with self._apply_lock:
                    # Read under the lock: a rebuild may have moved the position since
                    # the last batch, and a batch must continue from the current one.
                    batch = self._store.read_all(after=self._position, limit=self._batch_size)
                    for rec in batch:
                        self._apply_one(rec)
                if not batch:
                    self._store.wait_for_append(self._position, timeout=self._idle_wait)
                backoff = 0.0
            except Exception as exc:
                first = backoff == 0.0
                backoff = min(max(backoff * 2, 0.1), self._max_backoff)
                # The traceback once per outage; then one line per retry.
                log.log(
                    logging.ERROR if first else logging.WARNING,
                    "projection runner at position %d cannot read the log (%s); retrying in %.1f s",
                    self._position,
                    exc,
                    backoff,
                    exc_info=first,
                )
                self._stopping.wait(backoff)

    def _count_failure(self, name: str) -> None:
        with self._failures_lock:
            self._failures[name] += 1

    def _drain(self) -> Counter[str]:
        """Apply everything up to the head as it is now (caller holds the apply lock)."""
        counts: Counter[str] = Counter()
        while True:
            batch = self._store.read_all(after=self._position, limit=self._batch_size)
            if not batch:
                return counts
            for rec in batch:
                self._apply_one(rec)
                counts[rec.type] += 1

    def _apply_one(self, rec: Recorded) -> None:
        """Apply one event to every projection, publish the position, then tell the
        listeners (caller holds the apply lock)."""
        for p in self._projections:
            try:
                p.apply(rec)
            except Exception:
                self._count_failure(p.name)
                log.exception(
                    "projection %s failed on %s at position %d (stream %s v%d); "
                    "it may be stale until rebuilt",
                    p.name,
                    rec.type,
                    rec.position,
                    rec.stream_id,
                    rec.version,
                )
        with self._cond:
            self._position = rec.position
            self._cond.notify_all()
        if rec.position <= self._announced:
            return
        self._announced = rec.position
        for callback in self._listeners:
            try:
                callback(rec)
            except Exception:
                log.exception(
                    "event listener %r failed on %s at position %d",
                    callback,
                    rec.type,
                    rec.position,
                )
