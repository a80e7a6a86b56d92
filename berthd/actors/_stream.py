"""What every entity actor and its supervisor do with their stream, written once:
append with the expected version and fold the events into the state; rebuild the state
by replay on activation. Store errors become the API's errors here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from berthd.domain.base import Event
from berthd.domain.errors import Conflict, NotFound, StoreUnavailable
from berthd.events.store import ConcurrencyConflict, EventStore
from berthd.events.store import StoreUnavailable as StoreDown

__all__ = ["append_evolved", "cap_text", "load_state"]

S = TypeVar("S")


def append_evolved(store: EventStore, stream_id: str, kind: str, state: S | None, events: list[Event],
                   meta: Any, evolve: Callable[[S | None, Event], S | None]) -> tuple[S | None, int]:
    """Append ``events`` at the state's version and return the new state and the position
    of the last event. A conflict means another writer appended: 409, retry."""
    expected = getattr(state, "version", 0) if state is not None else 0
    try:
        recs = store.append(stream_id, expected, events, meta)
    except ConcurrencyConflict as exc:
        raise Conflict(f"{kind} {stream_id} changed concurrently; retry") from exc
    except StoreDown as exc:
        raise StoreUnavailable(f"the event log cannot be written: {exc}") from exc
    for event in events:
        state = evolve(state, event)
    return state, recs[-1].position


def load_state(store: EventStore, stream_id: str, kind: str, replay: Callable[[Iterable[Event]], S | None],
               not_found: Callable[[str], NotFound]) -> tuple[S, int]:
    """The entity's state rebuilt from its stream, and the stream's last position."""
    try:
        records = store.read_stream(stream_id)
    except StoreDown as exc:
        raise StoreUnavailable(f"the event log cannot be read: {exc}") from exc
    state = replay(r.event for r in records if r.kind == kind)
    if state is None:
        raise not_found(stream_id)
    return state, records[-1].position


def cap_text(text: str, cap: int) -> tuple[str, bool]:
    """At most ``cap`` characters, and whether anything was cut."""
    return (text, False) if len(text) <= cap else (text[:cap], True)
