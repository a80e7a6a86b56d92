"""The durable log: append with expected version, read a stream, read and follow the
global log.

Persistence is eventsourcing's application recorders (SQLite by default, PostgreSQL for
scale, plain Python objects for unit tests); this module adds what berthd needs on top:
msgspec-encoded events with metadata, positions that start at 1, optimistic concurrency
reported as ``ConcurrencyConflict``, and an in-process wake-up so followers of a SQLite
log do not poll (plus a slow poll for appends by other processes).

This package imports nothing else of berthd's: the event types are passed in as a
registry (type name -> msgspec Struct class).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "ConcurrencyConflict",
    "EventStore",
    "Recorded",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Base of the store's errors."""


class ConcurrencyConflict(StoreError):
    """The stream is not at the expected version: someone else appended first."""

    def __init__(self, stream_id: str, expected_version: int) -> None:
        super().__init__(f"stream {stream_id} is not at version {expected_version}")
        self.stream_id = stream_id
        self.expected_version = expected_version


class StoreUnavailable(StoreError):
    """The database cannot be written or read (disk full, server gone, ...)."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """One event as it sits in the log."""

    position: int  # global, starts at 1, strictly increasing
    stream_id: str  # the entity id
    version: int  # within the stream, starts at 1
    kind: str  # entity kind: "container", "image", "node", ...
    type: str  # event type name: "ContainerStarted"
    meta: Any  # berthd.domain.Meta
    event: Any  # the msgspec Struct

    def as_served(self) -> dict[str, Any]:
        """The shape of API.md's "Every event, as served"."""
        out: dict[str, Any] = {
            "position": self.position,
            "type": self.type,
            "entity": {"kind": self.kind, "id": self.stream_id},
            "version": self.version,
            "timestamp": self.meta.timestamp,
        }
        if self.meta.principal is not None:
            out["principal"] = self.meta.principal
        if self.meta.correlation_id is not None:
            out["correlation_id"] = self.meta.correlation_id
        out["data"] = msgspec.to_builtins(self.event)
        return out


class EventStore(abc.ABC):
    """The log. Thread-safe; every method may be called from any thread."""

    @abc.abstractmethod
    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Any],
        meta: Any,
    ) -> list[Recorded]:
        """Append ``events`` (msgspec Structs with a ``kind`` ClassVar) to a stream that
        must be at ``expected_version`` (0 for a new stream). All or nothing, durable on
        return. Raises ``ConcurrencyConflict`` if the stream moved, ``StoreUnavailable``
        if the database cannot be written."""

    def append_async(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Any],
        meta: Any,
    ) -> Future[list[Recorded]]:
        """``append`` without waiting for the commit: a future that completes once the
        events are durable (or fails with ``ConcurrencyConflict`` / ``StoreUnavailable``).

        So a writer can start the side effect an intent event announces while the intent
        is being committed, and acknowledge only once it is. Appends to one stream are
        committed in the order they were submitted: the next append's expected version
        may count this one's events before it is durable; if this one fails, that one
        then fails with ``ConcurrencyConflict`` and nothing of it is appended. Bad
        arguments or unencodable events raise here, before anything is queued. Futures
        complete on the store's writer thread: their callbacks must be quick and must
        not append and wait. This default appends in place and returns a done future."""
        future: Future[list[Recorded]] = Future()
        try:
            future.set_result(self.append(stream_id, expected_version, events, meta))
        except StoreError as exc:
            future.set_exception(exc)
        return future

    @abc.abstractmethod
    def read_stream(self, stream_id: str, after_version: int = 0) -> list[Recorded]:
        """The stream's events with version > ``after_version``, in order."""

    @abc.abstractmethod
    def read_all(self, after: int = 0, limit: int = 1000, types: Sequence[str] = ()) -> list[Recorded]:
        """Up to ``limit`` events of the global log with position > ``after``, in order,
        optionally only of the given event types."""

    @abc.abstractmethod
    def head(self) -> int:
        """The position of the last event in the log (0 when empty)."""

    @abc.abstractmethod
    def wait_for_append(self, after: int, timeout: float) -> bool:
        """Block until the log's head is beyond ``after`` or ``timeout`` passes; True if
        it is. Wakes at once for appends in this process."""

    def follow(self, after: int, stop: threading.Event, batch: int = 500) -> Iterator[Recorded]:
        """Every event after ``after``, then new ones as they are appended, in order,
        until ``stop`` is set."""
        position = after
        while not stop.is_set():
            items = self.read_all(after=position, limit=batch)
            if items:
                yield from items
                position = items[-1].position
                continue
            self.wait_for_append(position, timeout=0.5)

    @abc.abstractmethod
    def close(self) -> None: ...
