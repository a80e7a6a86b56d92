"""What every entity actor and its supervisor do with their stream, written once:
append with the expected version and fold the events into the state; rebuild the state
by replay on activation. Store errors become the API's errors here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

from berthd.domain.base import Event
from berthd.domain.errors import Conflict, NotFound, StoreUnavailable
from berthd.events.store import ConcurrencyConflict, EventStore
from berthd.events.store import StoreUnavailable as StoreDown

__all__ = ["append_evolved", "append_evolved_async", "cap_text", "load_state", "when_durable"]

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


def append_evolved_async(store: EventStore, stream_id: str, kind: str, state: S | None, events: list[Event],
                         meta: Any, evolve: Callable[[S | None, Event], S | None]) -> tuple[S | None, Future[int]]:
    """Submit ``events`` at the state's version without waiting for the commit: the new
    state at once, and a future of the last event's position once it is durable (or the
    API's error: 409 on a conflict, 503 if the log cannot be written). The writer's next
    append may follow at once: the store commits a stream's appends in order, and one
    that follows an append that failed fails too. On a failure the writer's state is
    ahead of the log and must be rebuilt from the log (``EntityActor.resync``)."""
    expected = getattr(state, "version", 0) if state is not None else 0
    submitted = store.append_async(stream_id, expected, events, meta)
    out: Future[int] = Future()

    def done(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is None:
            out.set_result(f.result()[-1].position)
        elif isinstance(exc, ConcurrencyConflict):
            error = Conflict(f"{kind} {stream_id} changed concurrently; retry")
            error.__cause__ = exc
            out.set_exception(error)
        elif isinstance(exc, StoreDown):
            down = StoreUnavailable(f"the event log cannot be written: {exc}")
            down.__cause__ = exc
            out.set_exception(down)
        else:
            out.set_exception(exc)

    submitted.add_done_callback(done)
    for event in events:
        state = evolve(state, event)
    return state, out


def when_durable(first: Future[int] | None, second: Future[int],
                 then: Callable[[int, BaseException | None], None]) -> None:
    """``then(position of second, error)`` once both appends are decided: the error of
    the first that failed, else None. Called on the thread that completes the last one
    (the store's writer): ``then`` must be quick."""
    def on_second(f: Future[int]) -> None:
        if first is not None and not first.done():
            first.add_done_callback(lambda _f: on_second(f))
            return
        error = (first.exception() if first is not None else None) or f.exception()
        then(0 if error is not None else f.result(), error)

    second.add_done_callback(on_second)


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
