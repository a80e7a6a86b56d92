"""``/v1/events``: the global log over a WebSocket — catch-up from a position, then live.

The hand-off between history and live events is the whole difficulty, and it goes:

1. read the store's head H, then join the server's ``Fanout`` (the runner's one
   listener for every subscriber), into a bounded backlog that ignores positions <= H;
   from this moment no new event can slip past;
2. page the store from ``after`` until a short page says the log is exhausted: that
   covers H, and everything the runner dispatched before step 1 (the runner only
   dispatches what is already in the store, and step 2 reads after step 1);
3. send the backlog, skipping positions already covered by step 2, and go live: from
   then on the fan-out writes each new event's frame straight to the connection.

So nothing is missed and nothing sent twice. The position advances over filtered-out
events too, so the skip in step 3 is exact whatever the filters. The floor H matters
when the runner lags behind the store (a burst of appends, a boot): its backlog is
covered by step 2 and must not fill the buffer of a subscriber that just connected.

``after`` omitted means "live only": the start is the log's head when the handshake is
accepted (taken before the 101 answer, so every event appended after the client's
``connect`` returned is delivered). A consumer that is too slow — more than
``Limits.ws_queue_events`` of its events waiting at once, or more than
``write_limit(limits)`` bytes not yet taken by its socket — is closed with 1013 and the
reason ``resume after=N``, N being the position of the last event written to it (every
frame written goes out before the close frame): reconnecting with ``after=N`` misses
nothing and repeats nothing.

Why the fan-out looks like this (issue 5, benchmark 6: 100 subscribers at 1,000 events/s
is 100,000 frames/s on one event loop): a server frame is not masked and this endpoint
negotiates no compression, so one event's frame is the same bytes for everyone
(``FrameCache``). The runner thread hands events to the loop in batches (one wake-up per
batch, not per subscriber); the loop filters each batch per subscriber and writes that
subscriber's frames with one ``transport.write``, instead of one ``await ws.send()`` per
frame. Everything that writes to a connection (this, and websockets' own pings and close
frames) runs on the loop thread and writes whole frames, so frames never interleave.

Non-admin keys see only the events of their own containers (API.md: a key sees only the
entities it created).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from berthd.domain.errors import ValidationError
from berthd.events.readmodels import ContainersView
from berthd.events.store import Recorded
from berthd.http import visibility
from berthd.http._ws_common import FrameCache, Handshake, Shared, as_error, discard_incoming, fail
from berthd.http.auth import Principal
from berthd.http.deps import Deps, Limits

__all__ = ["EventsQuery", "Fanout", "Overflow", "event_filter", "parse_events_query", "serve_events",
           "write_limit"]

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


Accept = Callable[[Recorded, "str | None"], bool]
"""A subscriber's predicate: the event, and the key that owns its entity (or None)."""


def event_filter(q: EventsQuery, principal: Principal) -> Accept | None:
    """The predicate for one subscriber, or None when it accepts everything (an admin
    without filters: the common case costs no call per event). Set lookups only; the
    owner is looked up once per event by the caller (``visibility.owner_of``)."""
    types, kinds, entities = q.types, q.kinds, q.entities
    owner = None if principal.is_admin else principal.key_id
    if not (types or kinds or entities) and owner is None:
        return None

    def accept(rec: Recorded, rec_owner: str | None) -> bool:
        if types and rec.type not in types:
            return False
        if kinds and rec.kind not in kinds:
            return False
        if entities and rec.stream_id not in entities:
            return False
        if owner is not None:
            return rec_owner == owner
        return True

    return accept


def write_limit(limits: Limits) -> int:
    """Bytes a subscriber's socket may leave unsent before it is cut off (1013): room for
    ``ws_queue_events`` frames of about 1 KiB, and never less than 64 KiB."""
    return max(64 << 10, limits.ws_queue_events << 10)


class Overflow(Exception):
    """The subscriber is too slow for the log."""


_Item = tuple[Recorded, "str | None", bytes]  # an event, its owner, its frame


class Fanout:
    """The runner's one listener for every events subscriber of a server.

    ``offer`` runs on the runner thread after each event is applied: it looks the
    event's owner up (the read models are current for it right then), appends under a
    lock and, once per batch, schedules ``_deliver`` on the loop. ``_deliver`` encodes
    each frame once and hands the batch to every subscriber. It listens to the runner
    only while someone subscribes. If the loop falls so far behind that ``max_pending``
    events wait, the batch is dropped and every subscriber is cut off (1013): memory stays
    bounded, and they resume from the store.
    """

    def __init__(self, deps: Deps, loop: asyncio.AbstractEventLoop, frames: FrameCache) -> None:
        self._deps = deps
        self._loop = loop
        self._frames = frames
        self.max_pending = max(4096, 8 * deps.limits.ws_queue_events)
        self._lock = threading.Lock()
        self._pending: list[tuple[Recorded, str | None]] = []
        self._dropped = False
        self._wake_pending = False
        self._subscribers: dict[_Subscriber, None] = {}  # insertion-ordered; loop thread only
        self._listening = False

    def offer(self, rec: Recorded) -> None:
        """The runner's listener callback; never blocks, never raises."""
        owner = visibility.owner_of(self._deps, rec)
        with self._lock:
            if self._dropped:
                return
            if len(self._pending) >= self.max_pending:
                self._dropped = True
                self._pending = []
            else:
                self._pending.append((rec, owner))
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            self._loop.call_soon_threadsafe(self._deliver)

    def join(self, sub: _Subscriber) -> None:
        """From now on ``sub`` gets every event the runner dispatches. Loop thread."""
        self._subscribers[sub] = None
        if not self._listening:
            self._listening = True
            self._deps.runner.add_listener(self.offer)

    def leave(self, sub: _Subscriber) -> None:
        self._subscribers.pop(sub, None)
        if not self._subscribers and self._listening:
            self._listening = False
            self._deps.runner.remove_listener(self.offer)
            with self._lock:
                self._pending = []
                self._dropped = False

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, False
            self._wake_pending = False
        subscribers = list(self._subscribers)
        if dropped:
            for sub in subscribers:
                sub.overflow()
            return
        if not batch or not subscribers:
            return
        frame = self._frames.frame
        items = [(rec, owner, frame(rec)) for rec, owner in batch]
        for sub in subscribers:
            sub.deliver(items)


class _Subscriber:
    """One connection's place in the fan-out: a bounded backlog while it catches up from
    the store, then frames written straight to its transport. Loop thread only."""

    def __init__(self, ws: ServerConnection, accept: Accept | None, floor: int, cursor: int,
                 limits: Limits) -> None:
        self.ws = ws
        self.accept = accept
        self.floor = floor  # positions up to here come from the store, not from the fan-out
        self.cursor = cursor  # the last position handled (sent or filtered out)
        self.sent = cursor  # the last position written to the connection
        self.capacity = max(1, limits.ws_queue_events)
        self.write_limit = write_limit(limits)
        self.live = False
        self.backlog: list[_Item] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def overflow(self) -> None:
        self.backlog = []
        if not self.done.done():
            self.done.set_exception(Overflow())

    def deliver(self, items: list[_Item]) -> None:
        if self.done.done():
            return
        if not self.live:
            floor, accept = self.floor, self.accept
            for item in items:
                rec = item[0]
                if rec.position > floor and (accept is None or accept(rec, item[1])):
                    self.backlog.append(item)
            if len(self.backlog) > self.capacity:
                self.overflow()
            return
        self._send(items)

    def go_live(self) -> None:
        """The catch-up is over: send the backlog, then take events as they come."""
        backlog, self.backlog = self.backlog, []
        self.live = True
        if not self.done.done():
            self._send(backlog)

    def _send(self, items: list[_Item]) -> None:
        cursor, sent, accept = self.cursor, self.sent, self.accept
        frames: list[bytes] = []
        for rec, owner, frame in items:
            if rec.position <= cursor:
                continue  # already sent (or passed over) during the catch-up
            cursor = rec.position
            if accept is None or accept(rec, owner):
                frames.append(frame)
                sent = cursor
        self.cursor = cursor
        if len(frames) > self.capacity:  # more than its queue may hold at once: too slow
            self.overflow()
            return
        if frames:
            self.write(frames)
            self.sent = sent

    def write(self, frames: list[bytes], *, live: bool = True) -> None:
        """Write whole frames in one go. Live, a socket that lags more than
        ``write_limit`` bytes cuts the subscriber off; the catch-up waits for it instead."""
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return  # closing: the handler ends with the connection
        ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if live and ws.transport.get_write_buffer_size() > self.write_limit:
            self.overflow()


async def serve_events(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    """Handle one subscriber until it leaves, overflows, or the server stops."""
    deps = shared.deps
    if ws.protocol.extensions:  # process_request offers none on this endpoint
        raise RuntimeError("an extension was negotiated on /v1/events; frames are written raw")
    q: EventsQuery = hs.params
    head = await shared.blocking(deps.store.head)
    start = head if q.after is None else q.after
    fanout = shared.fanout
    if fanout is None:
        fanout = shared.fanout = Fanout(deps, shared.loop, shared.frames)
    sub = _Subscriber(ws, event_filter(q, hs.principal), max(start, head), start, deps.limits)
    fanout.join(sub)  # before the catch-up: see the module docstring
    pump = asyncio.create_task(_pump(shared, sub, q, hs.principal))
    incoming = asyncio.create_task(discard_incoming(ws))
    try:
        await asyncio.wait((pump, incoming), return_when=asyncio.FIRST_COMPLETED)
    finally:
        fanout.leave(sub)
        if sub.done.done() and not sub.done.cancelled():
            sub.done.exception()  # retrieved: the pump's own outcome says what happened
        for task in (pump, incoming):
            task.cancel()
        await asyncio.gather(pump, incoming, return_exceptions=True)
    if not pump.cancelled() and pump.exception() is not None:
        exc = pump.exception()
        assert exc is not None
        if isinstance(exc, Overflow):
            await ws.close(CloseCode.TRY_AGAIN_LATER, f"resume after={sub.sent}")
        elif not isinstance(exc, ConnectionClosed | OSError):
            await fail(ws, as_error(exc))


async def _pump(shared: Shared, sub: _Subscriber, q: EventsQuery, principal: Principal) -> None:
    """The catch-up from the store, then wait while the fan-out sends live events."""
    deps = shared.deps
    types = sorted(q.types)
    accept, frame = sub.accept, shared.frames.frame
    # a non-admin filter looks owners up in the read models: let them reach each page
    needs_owner = not principal.is_admin
    while True:
        page = await shared.blocking(deps.store.read_all, sub.cursor, PAGE, types)
        if needs_owner and page and deps.runner.position < page[-1].position:
            await shared.blocking(deps.runner.wait_for, page[-1].position,
                                  deps.limits.read_your_writes_timeout)
        if sub.done.done() or sub.ws.protocol.state is not State.OPEN:
            break  # cut off while reading (the backlog overflowed), or closing
        frames: list[bytes] = []
        sent = sub.sent
        for rec in page:
            if accept is None or accept(rec, visibility.owner_of(deps, rec) if needs_owner else None):
                frames.append(frame(rec))
                sent = rec.position
        if page:
            sub.cursor = page[-1].position
        if frames:
            sub.write(frames, live=False)
            sub.sent = sent
            await sub.ws.drain()  # the store's pace is ours to choose: wait for the socket
        if len(page) < PAGE:
            break
    sub.go_live()
    await sub.done
