"""Group commit: many appending threads, one writer thread, one transaction per batch.

An fsync costs the same for one event as for a hundred, so durable appends one
transaction each top out at a few thousand per second whatever the number of writers.
``GroupCommitter`` queues the appends of every thread; its writer thread takes all that
is queued, hands the batch to a backend's ``BatchWriter`` (one transaction, one commit,
one fsync), and only then wakes each caller with its own outcome. While one batch is
being committed the next one queues up, so batches grow with the load and a lone
writer waits for nothing but its own commit.

What a ``BatchWriter`` must do with a batch, inside one transaction that excludes every
other writer of the log (SQLite ``BEGIN IMMEDIATE``, PostgreSQL's table lock):

- read the current version of each stream in the batch, then ``plan`` the batch: an
  append is accepted if its stream is at its expected version, counting the appends
  accepted before it in the same batch; the others are conflicts, and fail alone;
- insert the accepted appends in batch order, commit, and return one outcome per
  append: its positions, or the ``ConcurrencyConflict`` to raise to its caller;
- on a database failure, roll back and raise ``StoreUnavailable``: every caller of the
  batch then gets ``StoreUnavailable`` and nothing of the batch is in the log.

Overlapping the callers' work with the fsync. Appending threads and the writer share
one GIL, and the writer gives it up at every database call. Woken right after a commit,
a batch's callers would all be runnable while the writer starts the next transaction,
and the writer would wait for the GIL behind each of them at each call, with the disk
idle meanwhile. So the callers of a committed batch are woken a little later: when the
writer has written the next batch and is about to commit it (the fsync releases the
GIL, and the woken callers run during it), or as soon as nothing else is queued, or
before anything that may wait long (another process's lock; on PostgreSQL, any round
trip to the server). The ``BatchWriter`` calls the ``release`` callable it is given at
those points; the committer calls it anyway once ``commit`` returns. Followers of the log are still woken
by ``on_commit`` right after each commit: an append is acknowledged after its commit
and after the log's followers can see it, never before.

The writer thread starts with the first append and stops at ``close()``, after it has
committed (or failed) everything that was queued before the close.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeAlias

from eventsourcing.persistence import StoredEvent

from berthd.events.store import ConcurrencyConflict, StoreError, StoreUnavailable

__all__ = ["BatchWriter", "GroupCommitter", "Outcome", "PendingAppend", "Release", "plan"]

log = logging.getLogger(__name__)

#: What one append of a batch came to: its positions, or the error its caller gets.
Outcome: TypeAlias = list[int] | StoreError


class PendingAppend:
    """One caller's append, queued for the writer thread. ``done``, if given, is called
    with the outcome on the thread that decides it (usually the writer), instead of the
    caller waiting for it (``GroupCommitter.submit_async``)."""

    __slots__ = ("_done", "done", "events", "expected_version", "outcome", "stream_id")

    def __init__(self, stream_id: str, expected_version: int, events: Sequence[StoredEvent],
                 done: Callable[[Outcome], None] | None = None):
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.events = events
        self.done = done
        self.outcome: Outcome | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released once, by the writer, when ``outcome`` is set

    def conflict(self) -> ConcurrencyConflict:
        return ConcurrencyConflict(self.stream_id, self.expected_version)

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._done.release()
        if self.done is not None:
            try:
                self.done(outcome)
            except Exception:  # the writer thread must go on telling the others
                log.exception("an append's completion callback failed (stream %s)", self.stream_id)

    def wait(self, alive: Callable[[], bool]) -> list[int]:
        """Block until the writer has decided; return the positions or raise."""
        while not self._done.acquire(timeout=1.0):
            if not alive() and self.outcome is None:  # a writer that died of a bug
                raise StoreUnavailable(
                    f"cannot append to stream {self.stream_id}: the store's writer thread "
                    "has stopped (see the log); restart the daemon"
                )
        outcome = self.outcome
        if isinstance(outcome, list):
            return outcome
        assert outcome is not None
        raise outcome


class BatchWriter(Protocol):
    """A backend's side of group commit (see the module docstring)."""

    def commit(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        """One outcome per append, in batch order; ``StoreUnavailable`` if the batch
        could not be committed (then none of it was). Call ``release()`` right before
        the commit itself, and before anything that may wait long."""
        ...

    def close(self) -> None:
        """Release the writer's connection; called on the writer thread as it stops."""
        ...


def plan(batch: Sequence[PendingAppend], current: Mapping[str, int]) -> list[bool]:
    """Which appends of ``batch`` to insert, given each stream's ``current`` version
    (absent: 0): an append is accepted when its stream is at its expected version once
    the appends accepted before it in the batch are counted."""
    versions = dict(current)
    accepted = []
    for p in batch:
        version = versions.get(p.stream_id, 0)
        ok = version == p.expected_version
        if ok:
            versions[p.stream_id] = version + len(p.events)
        accepted.append(ok)
    return accepted


class GroupCommitter:
    """The queue and the writer thread of one store.

    ``on_commit(position)`` is called on the writer thread after each commit with the
    batch's highest position, before any caller of the batch is woken (the store's
    followers wake from it). A batch holds at most ``max_events`` events, or a single
    append that is larger.
    """

    def __init__(
        self,
        writer: BatchWriter,
        *,
        on_commit: Callable[[int], None],
        name: str,
        max_events: int = 2000,
        close_timeout: float = 30.0,
    ) -> None:
        self._writer = writer
        self._on_commit = on_commit
        self._name = name
        self._max_events = max_events
        self._close_timeout = close_timeout
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[PendingAppend] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        # Counters, written by the writer thread only. ``taken``: appends handed to the
        # BatchWriter so far; ``batches`` committed, and the ``appends`` (accepted or
        # refused) and ``events`` (written) in them.
        self.taken = 0
        self.batches = 0
        self.appends = 0
        self.events = 0

    def submit(
        self, stream_id: str, expected_version: int, events: Sequence[StoredEvent]
    ) -> list[int]:
        """Append and wait for the commit: the positions of ``events``, or
        ``ConcurrencyConflict`` / ``StoreUnavailable``."""
        pending = PendingAppend(stream_id, expected_version, events)
        self._enqueue(pending)
        return pending.wait(self._alive)

    def submit_async(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[StoredEvent],
        done: Callable[[Outcome], None],
    ) -> None:
        """Queue an append and return at once; ``done(outcome)`` is called once it is
        decided, after its commit (on the writer thread: keep it short). Appends are
        decided in the order they were queued. ``StoreUnavailable`` if the store is closed
        (then ``done`` is never called)."""
        self._enqueue(PendingAppend(stream_id, expected_version, events, done))

    def _enqueue(self, pending: PendingAppend) -> None:
        with self._cond:
            if self._closing:
                raise StoreUnavailable(
                    f"cannot append to stream {pending.stream_id}: the event store is closed"
                )
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name=f"berthd-store-commit-{self._name}", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError as exc:  # "can't start new thread": out of resources
                    raise StoreUnavailable(
                        f"cannot append to stream {pending.stream_id}: cannot start the "
                        f"store's writer thread ({exc})"
                    ) from exc
                self._thread = thread
            self._queue.append(pending)
            self._cond.notify()

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and release its connection.
        Appends submitted from now on fail with ``StoreUnavailable``."""
        with self._cond:
            already = self._closing
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if already or thread is None:
            return
        thread.join(self._close_timeout)
        if thread.is_alive():
            log.warning(
                "the store's writer thread did not finish within %.0f s; failing the "
                "appends still queued",
                self._close_timeout,
            )
            self._fail_queued("the event store was closed before this append was written")

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "appends": self.appends, "events": self.events}

    # -- the writer thread ------------------------------------------------------------

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self) -> None:
        told: Release | None = None  # the last committed batch, until it is told
        try:
            while True:
                batch = self._take(wait=told is None)
                if batch is None:
                    return
                if not batch:  # nothing queued: tell the last batch now
                    assert told is not None
                    told()
                    told = None
                    continue
                release = told if told is not None else Release()
                try:
                    told = self._commit(batch, release)
                finally:
                    release()
        except BaseException:
            log.exception("the store's writer thread failed")
            raise
        finally:
            if told is not None:
                told()
            self._fail_queued("the store's writer thread stopped")
            try:
                self._writer.close()
            except Exception:
                log.exception("could not close the store's writer connection")

    def _take(self, *, wait: bool) -> list[PendingAppend] | None:
        """The next batch: waiting for one if ``wait``, else maybe empty. None when
        closing and nothing is left."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None if wait else []
                if not wait:
                    return []
                self._cond.wait()
            queue, limit = self._queue, self._max_events
            batch = [queue.popleft()]
            size = len(batch[0].events)
            while queue and size + len(queue[0].events) <= limit:
                p = queue.popleft()
                size += len(p.events)
                batch.append(p)
            self.taken += len(batch)
            return batch

    def _commit(self, batch: list[PendingAppend], release: Release) -> Release | None:
        """Commit ``batch``; what will tell its callers (failures are told at once)."""
        try:
            outcomes = self._writer.commit(batch, release)
            if len(outcomes) != len(batch):  # a writer bug: nobody may be told "written"
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
        except StoreError as exc:
            release()
            for p in batch:
                p.finish(_unavailable(p, exc))
            return None
        except Exception as exc:
            release()
            log.exception("group commit of %d appends failed", len(batch))
            for p in batch:
                p.finish(_unavailable(p, exc))
            return None
        head = 0
        for outcome in outcomes:
            if isinstance(outcome, list) and outcome:
                head = max(head, outcome[-1])
        self.batches += 1
        self.appends += len(batch)
        self.events += sum(len(o) for o in outcomes if isinstance(o, list))
        if head:
            try:
                self._on_commit(head)
            except Exception:  # the appends are committed: their callers must hear so
                log.exception("waking the store's followers failed")
        return Release(list(zip(batch, outcomes, strict=True)))

    def _fail_queued(self, why: str) -> None:
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for p in left:
            p.finish(StoreUnavailable(f"cannot append to stream {p.stream_id}: {why}"))


class Release:
    """Tells the callers of one committed batch their outcomes, once, when called
    (later calls do nothing). ``pending``: it has not been called yet."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[PendingAppend, Outcome]] | None = None) -> None:
        self._pairs = pairs

    @property
    def pending(self) -> bool:
        return bool(self._pairs)

    def __call__(self) -> None:
        pairs, self._pairs = self._pairs, None
        if pairs:
            for p, outcome in pairs:
                p.finish(outcome)


def _unavailable(p: PendingAppend, exc: BaseException) -> StoreUnavailable:
    """A caller's own ``StoreUnavailable`` for a batch that failed (one exception object
    per caller: they are raised on different threads)."""
    detail = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
    out = StoreUnavailable(f"cannot append to stream {p.stream_id}: {detail}")
    out.__cause__ = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
    return out
