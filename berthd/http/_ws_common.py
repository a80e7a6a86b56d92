"""What the WebSocket endpoints share: what the handshake resolved, the error frame, text
chunking, and the bridge that lets a worker thread send frames on a connection.

Threading model: every coroutine here runs on the server's one event loop thread. The
runtime and the store are blocking APIs, so their calls go to the server's I/O pool
(``Shared.blocking``) or, for calls that may block for as long as a container lives
(an exec's output, followed logs), to a thread of their own that sends its frames back
through a ``ThreadSender``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode

from berthd.actors.container import map_runtime_error
from berthd.domain.container import ContainerState
from berthd.domain.errors import BerthdError, ContainerNotFound, StoreUnavailable, ValidationError
from berthd.events.store import Recorded
from berthd.events.store import StoreError as _StoreError
from berthd.http.auth import Principal
from berthd.http.deps import Deps
from berthd.runtime import base as rt

if TYPE_CHECKING:
    from berthd.http._ws_events import Fanout

__all__ = [
    "BerthConnection",
    "FRAME_CHARS",
    "FrameCache",
    "Handshake",
    "FIRST_FRAME_TIMEOUT",
    "Shared",
    "ThreadSender",
    "as_error",
    "chunks",
    "discard_incoming",
    "encode",
    "error_frame",
    "fail",
    "find_container",
    "first_frame",
    "send_output",
    "validation_error",
]

log = logging.getLogger("berthd.http.ws")

T = TypeVar("T")

encode = msgspec.json.Encoder().encode

FRAME_CHARS = 16 * 1024
"""Longest text put in one frame: at most 64 KiB of UTF-8, far below the 1 MiB a client
accepts by default (websockets' and browsers' usual ``max_size``)."""

_FIELD = re.compile(r"at `\$(?P<path>[^`]*)`")


@dataclass(frozen=True, slots=True)
class Handshake:
    """What ``process_request`` found out before accepting the upgrade."""

    endpoint: str  # "events" | "exec" | "logs" | "kernel"
    ref: str  # the container (kernel, for "kernel") id or name ("" for events)
    principal: Principal
    request_id: str
    correlation_id: str | None
    params: Any = None  # the endpoint's parsed query (EventsQuery, LogsQuery) or None


class BerthConnection(ServerConnection):
    """A server connection that carries its ``Handshake`` from ``process_request`` to the
    handler (websockets itself does this with ad hoc attributes; a subclass keeps it
    typed)."""

    berth: Handshake | None = None


class FrameCache:
    """Whole WebSocket frames of events by position, shared by every subscriber of one server.

    A server's frames are not masked and the events endpoint negotiates no extension, so
    the bytes of one event's frame (header and JSON payload) are the same for every
    subscriber: each is encoded and serialised once, and written as is to every
    transport. The most recent frames are kept, up to ``max_bytes``. Touched only on the
    event loop thread, so it needs no lock."""

    def __init__(self, max_bytes: int = 8 << 20) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._frames: OrderedDict[int, bytes] = OrderedDict()

    def frame(self, rec: Recorded) -> bytes:
        """The text frame carrying ``rec`` as served, ready for ``transport.write``."""
        frame = self._frames.get(rec.position)
        if frame is None:
            frame = Frame(Opcode.TEXT, encode(rec.as_served())).serialize(mask=False, extensions=[])
            self._frames[rec.position] = frame
            self._bytes += len(frame)
            while self._bytes > self._max_bytes and self._frames:
                self._bytes -= len(self._frames.popitem(last=False)[1])
        return frame


@dataclass(slots=True)
class Shared:
    """What every handler of one running server uses."""

    deps: Deps
    loop: asyncio.AbstractEventLoop
    io: concurrent.futures.ThreadPoolExecutor
    frames: FrameCache
    fanout: Fanout | None = None  # the events endpoint's, made by its first subscriber

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call (store, runtime, actor ask) off the event loop."""
        return await self.loop.run_in_executor(self.io, functools.partial(fn, *args, **kwargs))


def as_error(exc: BaseException) -> BerthdError:
    """Any exception as the error a client is sent (unexpected ones are logged)."""
    if isinstance(exc, BerthdError):
        return exc
    if isinstance(exc, rt.RuntimeError_):
        return map_runtime_error(exc)
    if isinstance(exc, _StoreError):
        return StoreUnavailable(f"the event log cannot be read: {exc}; reconnect later")
    log.error("unexpected error in a WebSocket handler", exc_info=exc)
    return BerthdError("an unexpected error occurred; it has been logged")


def validation_error(exc: msgspec.MsgspecError, what: str) -> ValidationError:
    """A msgspec decode error as a 400 naming the field, like the HTTP API's."""
    text = str(exc)
    match = _FIELD.search(text)
    field = match.group("path").lstrip(".") if match else ""
    if not field and "`" in text:  # "Object missing required field `command`"
        field = text.split("`")[1]
    return ValidationError(f"invalid {what}: {text}", field=field or "$")


def error_frame(err: BerthdError) -> bytes:
    """``{"type": "error", "error": {...the API's error shape...}}``."""
    return encode({"type": "error", **err.as_dict()})


async def fail(ws: ServerConnection, err: BerthdError) -> None:
    """Send the error frame, then close: 1011 for the daemon's own failures (5xx), 1008
    for everything the client can fix. An error frame is always the last frame."""
    code = CloseCode.INTERNAL_ERROR if err.status >= 500 else CloseCode.POLICY_VIOLATION
    try:
        await ws.send(error_frame(err), text=True)
    except ConnectionClosed:
        return
    await ws.close(code, err.code)


def find_container(deps: Deps, ref: str, principal: Principal) -> ContainerState:
    """The container by id or name; another key's containers are invisible to a
    non-admin key (not found, never forbidden: existence does not leak)."""
    state = deps.containers.get(ref)
    if state is None or (not principal.is_admin and state.owner != principal.key_id):
        raise ContainerNotFound(f"no container '{ref}'", id=ref)
    return state


async def discard_incoming(ws: ServerConnection) -> None:
    """Read and ignore what the client sends, so that its close frame is seen and the
    receive buffer never fills; returns when the connection closes."""
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


FIRST_FRAME_TIMEOUT = 30.0
"""Seconds a client has, once upgraded, to send its request as the first frame."""


async def first_frame(ws: ServerConnection, what: str = "the request") -> str | bytes:
    """The client's first frame; 400 (field ``$``) when it does not come in time."""
    try:
        return await asyncio.wait_for(ws.recv(), FIRST_FRAME_TIMEOUT)
    except TimeoutError:
        raise ValidationError(f"send {what} as the first frame within {FIRST_FRAME_TIMEOUT:.0f} s",
                              field="$") from None


def send_output(sender: ThreadSender, stream: str, text: str) -> None:
    """Output of an execution as ``{"type": stream, "data"}`` frames, from a worker thread.
    A client that left stops the frames, not the execution (its result is recorded)."""
    for piece in chunks(text):
        if not sender.send(encode({"type": stream, "data": piece})):
            return


def chunks(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``FRAME_CHARS`` characters."""
    for start in range(0, len(text), FRAME_CHARS):
        yield text[start:start + FRAME_CHARS]


class ThreadSender:
    """Sends frames on a connection from a worker thread, one at a time.

    Each ``send`` waits until websockets has taken the frame (its write buffer below the
    high-water mark), so a slow client slows the producer instead of growing a buffer.
    ``abandon()`` (the client left, the server stops) releases a producer blocked in
    ``send`` at once; without it a producer could wait forever on a loop that no longer
    runs the send.
    """

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop) -> None:
        self._ws = ws
        self._loop = loop
        self._gone: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def gone(self) -> bool:
        return self._gone.done()

    def abandon(self) -> None:
        """From now on ``send`` returns False without sending. Any thread."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._gone.set_result(None)

    def send(self, frame: bytes) -> bool:
        """Send one text frame; False if the connection is gone (nothing more will be
        sent). Worker threads only: it blocks."""
        if self._gone.done():
            return False
        try:
            sent = asyncio.run_coroutine_threadsafe(self._ws.send(frame, text=True), self._loop)
        except RuntimeError:  # the loop is closed
            self.abandon()
            return False
        done, _ = concurrent.futures.wait((sent, self._gone), return_when=concurrent.futures.FIRST_COMPLETED)
        if sent not in done:
            return False  # abandoned; the pending send fails with the connection
        try:
            sent.result()
        except Exception:  # ConnectionClosed, or the loop went away (CancelledError)
            self.abandon()
            return False
        return True
