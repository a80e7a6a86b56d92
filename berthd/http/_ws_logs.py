"""``/v1/containers/{id}/logs?follow=&tail=``: a container's output over a WebSocket.

Frames: ``{"type": "log", "data": "..."}``, then close 1000 once the logs are sent
(``follow=false``, the default, as ``docker logs``) or once the container stops
(``follow=true``). Errors: an error frame, then close 1008 / 1011.

``Runtime.follow_logs`` blocks for as long as the container runs and cannot be
interrupted from another thread, so it gets a daemon thread of its own, which sends
through a ``ThreadSender``: when the client leaves, the thread stops at the next chunk
(or when the container stops). With ``tail=N`` the runtime starts the stream with the last
N lines and goes on from there (``follow_logs(tail=N)``), so nothing is lost or repeated
and no more than a bounded window of the log is held. ``follow=false`` sends at most the
last ``8 x output_cap_bytes``, as ``GET /v1/containers/{id}/logs`` does.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection

from berthd.domain.errors import RuntimeUnavailable, ValidationError
from berthd.http._ws_common import (
    Handshake,
    Shared,
    ThreadSender,
    as_error,
    chunks,
    discard_incoming,
    encode,
    fail,
    find_container,
)
from berthd.runtime import base as rt

__all__ = ["LogsQuery", "parse_logs_query", "serve_logs"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class LogsQuery:
    follow: bool = False
    tail: int | None = None  # the last N lines only; None: everything


def parse_logs_query(query: Mapping[str, list[str]]) -> LogsQuery:
    """Validate ``follow`` and ``tail`` (400 before the upgrade when wrong)."""
    raw_follow = (query.get("follow") or [""])[-1].strip().lower()
    if raw_follow not in _TRUE | _FALSE:
        raise ValidationError("query parameter follow must be true or false", field="follow")
    raw_tail = (query.get("tail") or [""])[-1].strip()
    tail: int | None = None
    if raw_tail and raw_tail != "all":
        try:
            tail = int(raw_tail)
        except ValueError:
            raise ValidationError("query parameter tail must be an integer", field="tail") from None
        if tail < 0:
            raise ValidationError("query parameter tail must be >= 0", field="tail")
    return LogsQuery(follow=raw_follow in _TRUE, tail=tail)


def _frame(text: str) -> bytes:
    return encode({"type": "log", "data": text})


async def serve_logs(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    """Send the logs (and follow them) until done or the client leaves."""
    q: LogsQuery = hs.params
    try:
        state = find_container(shared.deps, hs.ref, hs.principal)
        runtime = shared.deps.runtimes.get(state.runtime)
        if runtime is None:
            raise RuntimeUnavailable(f"runtime {state.runtime} is not enabled on this node")
        if not q.follow:
            cap = shared.deps.limits.output_cap_bytes * 8
            data = await shared.blocking(runtime.logs_capped, state.id, q.tail, cap)
    except Exception as exc:
        await fail(ws, as_error(exc))
        return
    if not q.follow:
        for piece in chunks(data.decode("utf-8", errors="replace")):
            await ws.send(_frame(piece), text=True)
        await ws.close()
        return
    follower = _Follower(shared, ws, runtime, state.id, q.tail)
    done = follower.start()
    incoming = asyncio.create_task(discard_incoming(ws))
    try:
        await asyncio.wait((done, incoming), return_when=asyncio.FIRST_COMPLETED)
    finally:
        follower.abandon()
        incoming.cancel()
        await asyncio.gather(incoming, return_exceptions=True)
    if not done.done():
        done.cancel()
        return  # the client left
    error = done.exception()
    if error is not None:
        await fail(ws, as_error(error))
    else:
        await ws.close()


class _Follower:
    """Runs ``follow_logs`` on a daemon thread; ``start`` returns a future that completes
    (None, or the runtime's exception) when the logs end."""

    def __init__(self, shared: Shared, ws: ServerConnection, runtime: rt.Runtime,
                 berth_id: str, tail: int | None) -> None:
        self._loop = shared.loop
        self._sender = ThreadSender(ws, shared.loop)
        self._runtime = runtime
        self._berth_id = berth_id
        self._tail = tail
        self._done: asyncio.Future[None] = shared.loop.create_future()

    def start(self) -> asyncio.Future[None]:
        threading.Thread(target=self._run, name="berthd-ws-logs", daemon=True).start()
        return self._done

    def abandon(self) -> None:
        self._sender.abandon()

    def _send(self, text: str) -> bool:
        return all(self._sender.send(_frame(piece)) for piece in chunks(text))

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._follow()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: BaseException | None) -> None:
        if self._done.done():
            return
        if error is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(error)

    def _follow(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stream = self._runtime.follow_logs(self._berth_id, tail=self._tail)
        try:
            for chunk in stream:
                if self._sender.gone:
                    return
                if not self._send(decoder.decode(chunk)):
                    return
            self._send(decoder.decode(b"", final=True))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a generator: run its cleanup now, on this thread

