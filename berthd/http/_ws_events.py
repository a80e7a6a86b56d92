"""``/v1/events``: the global log over a WebSocket — catch-up from a position, then live.

The hand-off between history and live events is the whole difficulty, and it goes:

1. read the store's head H, then register a listener on the projection runner, into a
   bounded per-subscriber buffer (``Feed``) that ignores positions <= H; from this
   moment no new event can slip past;
2. page the store from ``after`` until a short page says the log is exhausted: that
   covers H, and everything the runner dispatched before step 1 (the runner only
   dispatches what is already in the store, and step 2 reads after step 1);
3. drain the buffer, skipping positions already covered by step 2.

So nothing is missed and nothing sent twice. The position advances over filtered-out
events too, so the skip in step 3 is exact whatever the filters. The floor H matters
when the runner lags behind the store (a burst of appends, a boot): its backlog is
covered by step 2 and must not fill the buffer of a subscriber that just connected.

``after`` omitted means "live only": the start is the log's head when the handshake is
accepted (taken before the 101 answer, so every event appended after the client's
``connect`` returned is delivered). A consumer whose buffer overflows (``Limits.ws_queue_events`` events waiting to
be sent) is closed with 1013 and the reason ``resume after=N``, N being the position of
the last event actually sent to it: reconnecting with ``after=N`` misses nothing and
repeats nothing.

Non-admin keys see only the events of their own containers (API.md: a key sees only the
entities it created).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from berthd.domain.errors import ValidationError
from berthd.events.readmodels import ContainersView
from berthd.events.store import Recorded
from berthd.http._ws_common import Handshake, Shared, as_error, discard_incoming, fail
from berthd.http.auth import Principal

__all__ = ["EventsQuery", "Feed", "Overflow", "parse_events_query", "serve_events"]

PAGE = 500
"""Events read from the store per catch-up query."""

_MAX_AFTER = 1 << 62


@dataclass(frozen=True, slots=True)
class EventsQuery:
    """``after`` (None: live only), and filters; an empty filter set matches everything."""

    after: int | None = None
    types: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    entities: frozenset[str] = frozenset()


def _values(query: Mapping[str, list[str]], name: str) -> frozenset[str]:
    """Every value of a parameter given repeated and/or comma separated."""
    return frozenset(v.strip() for raw in query.get(name, ()) for v in raw.split(",") if v.strip())


def parse_events_query(query: Mapping[str, list[str]], containers: ContainersView) -> EventsQuery:
    """Validate the query string (400 before the upgrade on a bad ``after``). An
    ``entity`` may be a container's name, as everywhere an id is accepted."""
    after: int | None = None
    raw = (query.get("after") or [""])[-1].strip()
    if raw:
        try:
            after = int(raw)
        except ValueError:
            raise ValidationError("query parameter after must be an integer", field="after") from None
        if not 0 <= after <= _MAX_AFTER:
            raise ValidationError("query parameter after must be >= 0", field="after")
    entities = set()
    for ref in _values(query, "entity"):
        state = containers.get(ref)
        entities.add(state.id if state is not None else ref)
    return EventsQuery(after, _values(query, "type"), _values(query, "kind"), frozenset(entities))


def event_filter(q: EventsQuery, principal: Principal, containers: ContainersView) -> Callable[[Recorded], bool]:
    """The predicate for one subscriber. Runs on the runner thread for live events, so it
    only reads: set lookups and one dict get."""
    types, kinds, entities = q.types, q.kinds, q.entities
    owner = None if principal.is_admin else principal.key_id

    def accept(rec: Recorded) -> bool:
        if types and rec.type not in types:
            return False
        if kinds and rec.kind not in kinds:
            return False
        if entities and rec.stream_id not in entities:
            return False
        if owner is not None:
            if rec.kind != "container":
                return False
            state = containers.get(rec.stream_id)
            found = state.owner if state is not None else getattr(rec.event, "owner", None)
            return found == owner
        return True

    return accept


class Overflow(Exception):
    """The subscriber's buffer overflowed: it is too slow for the log."""


class Feed:
    """The bounded buffer between the runner thread and one subscriber.

    ``offer`` runs on the runner thread after each event is applied: it filters, appends
    under a lock and, at most once per batch, schedules a wake-up on the event loop. It
    never blocks and never raises. On overflow the buffer is dropped (the subscriber will
    be cut off and resume from the store), so memory stays bounded by ``capacity``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int,
                 accept: Callable[[Recorded], bool], floor: int = 0) -> None:
        self._loop = loop
        self._capacity = max(1, capacity)
        self._accept = accept
        self._floor = floor  # positions up to here come from the store, not from the feed
        self._lock = threading.Lock()
        self._items: deque[Recorded] = deque()
        self._overflowed = False
        self._closed = False
        self._wake_pending = False
        self._ready = asyncio.Event()  # touched on the loop thread only

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    def offer(self, rec: Recorded) -> None:
        """The runner's listener callback."""
        if rec.position <= self._floor or not self._accept(rec):  # (a raise: the runner logs it)
            return
        with self._lock:
            if self._closed or self._overflowed:
                return
            if len(self._items) >= self._capacity:
                self._overflowed = True
                self._items.clear()
            else:
                self._items.append(rec)
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the subscriber is gone
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._items.clear()

    async def take(self) -> list[Recorded]:
        """Wait for events and return all that are buffered; ``Overflow`` if the buffer
        overflowed since the last call."""
        while True:
            with self._lock:
                if self._overflowed:
                    raise Overflow
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    return batch
                # cleared under the lock: an offer after this schedules a _wake, which
                # runs on this loop after we started waiting
                self._ready.clear()
            await self._ready.wait()


@dataclass(slots=True)
class _Progress:
    cursor: int = 0  # the last position handled (sent or filtered out)
    sent: int = 0  # the last position actually sent


async def serve_events(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    """Handle one subscriber until it leaves, overflows, or the server stops."""
    deps = shared.deps
    q: EventsQuery = hs.params
    head = await shared.blocking(deps.store.head)
    start = head if q.after is None else q.after
    accept = event_filter(q, hs.principal, deps.containers)
    feed = Feed(shared.loop, deps.limits.ws_queue_events, accept, floor=max(start, head))
    deps.runner.add_listener(feed.offer)  # before the catch-up: see the module docstring
    progress = _Progress(cursor=start, sent=start)
    pump = asyncio.create_task(_pump(shared, ws, q, feed, accept, progress, hs.principal))
    incoming = asyncio.create_task(discard_incoming(ws))
    try:
        await asyncio.wait((pump, incoming), return_when=asyncio.FIRST_COMPLETED)
    finally:
        deps.runner.remove_listener(feed.offer)
        feed.close()
        for task in (pump, incoming):
            task.cancel()
        await asyncio.gather(pump, incoming, return_exceptions=True)
    if not pump.cancelled() and pump.exception() is not None:
        exc = pump.exception()
        assert exc is not None
        if isinstance(exc, Overflow):
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"resume after={progress.sent}")
        elif not isinstance(exc, ConnectionClosed):
            await fail(ws, as_error(exc))


async def _pump(shared: Shared, ws: ServerConnection, q: EventsQuery, feed: Feed,
                accept: Callable[[Recorded], bool], progress: _Progress,
                principal: Principal) -> None:
    deps = shared.deps
    types = sorted(q.types)
    # a non-admin filter looks owners up in the containers view: let it reach each page
    needs_view = not principal.is_admin
    while True:  # catch-up from the store
        page = await shared.blocking(deps.store.read_all, progress.cursor, PAGE, types)
        if needs_view and page and deps.runner.position < page[-1].position:
            await shared.blocking(deps.runner.wait_for, page[-1].position,
                                  deps.limits.read_your_writes_timeout)
        for rec in page:
            if feed.overflowed:
                raise Overflow
            progress.cursor = rec.position
            if accept(rec):
                await ws.send(shared.frames.get(rec), text=True)
                progress.sent = rec.position
        if len(page) < PAGE:
            break
    while True:  # live, from the feed
        for rec in await feed.take():
            if rec.position <= progress.cursor:
                continue  # already sent (or passed over) during the catch-up
            progress.cursor = rec.position
            await ws.send(shared.frames.get(rec), text=True)
            progress.sent = rec.position
