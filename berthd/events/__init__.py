"""The log: the event store, its backends, the codec and the projection runner.

What other layers may use; everything else in this package is an implementation detail.
This package imports nothing else of berthd's (``open_store`` defaults the metadata type
to ``berthd.domain.base.Meta`` with a lazy import).
"""

from __future__ import annotations

from berthd.events.backends import (
    MemoryEventStore,
    PostgresEventStore,
    SQLiteEventStore,
    open_store,
)
from berthd.events.codec import CorruptEvent, EventCodec, UndecodedEvent
from berthd.events.projection import Listener, Projection, ProjectionRunner
from berthd.events.store import (
    ConcurrencyConflict,
    EventStore,
    Recorded,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "ConcurrencyConflict",
    "CorruptEvent",
    "EventCodec",
    "EventStore",
    "Listener",
    "MemoryEventStore",
    "PostgresEventStore",
    "Projection",
    "ProjectionRunner",
    "Recorded",
    "SQLiteEventStore",
    "StoreError",
    "StoreUnavailable",
    "UndecodedEvent",
    "open_store",
]
