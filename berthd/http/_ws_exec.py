"""``/v1/containers/{id}/exec``: an interactive exec over a WebSocket.

The container's actor owns the exec: it records ``ExecStarted``, opens the runtime's
``ExecStream`` on a worker and hands it to ``ExecSession.attach`` there; what ``attach``
returns is recorded as ``ExecFinished``. This module only moves bytes:

- output, on the actor's worker thread: each chunk is sent as a frame before the next
  is read, so a slow client slows the process (its pipe fills) rather than a buffer;
- input, on the event loop: stdin goes through a thread of its own (``_StdinWriter``),
  in order, so that a process that never reads its stdin blocks only that thread;
  signals bypass it, so ``INT`` reaches a process whatever its stdin is doing.

Frames — client: the request first (``{"command": [...], "tty"?, "stdin"?, "env"?,
"workdir"?, "timeout"?}``), then ``{"type": "stdin", "data": "..."}`` (or a binary frame:
raw stdin bytes), ``{"type": "stdin_close"}`` / ``{"type": "eof"}``, ``{"type": "signal",
"signal": "INT"}``. Server: ``{"type": "stdout"|"stderr", "data": "..."}``, then
``{"type": "exit", "exit_code": N}`` (plus ``"truncated": true`` / ``"timed_out": true``
when so) and close 1000; or ``{"type": "error", "error": {...}}`` and close 1008 (the
client's fault) / 1011 (ours). A client that leaves kills the exec.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextlib
import logging
import queue
import signal as _signal
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from berthd.actors import new_id
from berthd.actors.container import ExecOutcome
from berthd.actors.context import Reply
from berthd.domain.container import ExecInContainer
from berthd.domain.errors import BerthdError, ValidationError
from berthd.http._ws_common import (
    Handshake,
    Shared,
    ThreadSender,
    as_error,
    chunks,
    encode,
    fail,
    find_container,
    first_frame,
    validation_error,
)
from berthd.runtime import base as rt

__all__ = ["ExecSession", "parse_exec_request", "serve_exec"]

log = logging.getLogger("berthd.http.ws")


ABORT_GRACE = 10.0
"""Seconds to wait, after killing an abandoned exec, for the actor to record its end."""

STDIN_BUDGET = 1 << 20
"""Bytes of stdin accepted but not yet written to the process before the receive side
stops reading (and TCP pushes back on the client)."""

_SIGNALS = frozenset(s.name[3:] for s in _signal.Signals if not s.name.startswith("SIG_"))


class _ExecFlags(msgspec.Struct, kw_only=True):
    """The request's own fields; the rest is an ``ExecInContainer``, validated by it.
    (``stdin`` here says whether the process gets input frames; it is popped before the
    domain command, whose ``stdin`` is text for one-shot execs, sees the rest.)"""

    tty: bool = False
    stdin: bool = True


_FLAGS = ("tty", "stdin")
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode


def parse_exec_request(message: str | bytes) -> tuple[ExecInContainer, _ExecFlags]:
    """The first frame as the domain command plus tty/stdin; ``ValidationError`` naming
    the field otherwise (unknown fields included)."""
    try:
        body = _decode_object(message)
    except msgspec.MsgspecError as exc:
        raise validation_error(exc, "exec request (send a JSON object)") from None
    flags_in = {k: body.pop(k) for k in _FLAGS if k in body}
    try:
        flags = msgspec.convert(flags_in, _ExecFlags)
        command = msgspec.convert(body, ExecInContainer)  # its strict schema, and limits
    except msgspec.ValidationError as exc:
        raise validation_error(exc, "exec request") from None
    return command, flags


class _Stdin(msgspec.Struct, tag="stdin", tag_field="type", forbid_unknown_fields=True):
    data: str


class _StdinClose(msgspec.Struct, tag="stdin_close", tag_field="type", forbid_unknown_fields=True):
    pass


class _Eof(msgspec.Struct, tag="eof", tag_field="type", forbid_unknown_fields=True):
    pass


class _Signal(msgspec.Struct, tag="signal", tag_field="type", forbid_unknown_fields=True):
    signal: Annotated[str, msgspec.Meta(pattern=r"^(SIG)?[A-Z0-9]{2,8}$")]


_Control = _Stdin | _StdinClose | _Eof | _Signal
_decode_control = msgspec.json.Decoder(_Control).decode


class _Capture:
    """One output stream: the bytes kept (up to the cap, returned in the result and
    counted in ``ExecFinished``) and an incremental UTF-8 decoder, so that a character
    split between two chunks is not mangled."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, chunk: bytes) -> str:
        """The text to forward for ``chunk`` ("" once past the cap)."""
        if self.truncated:
            return ""
        room = self.cap - len(self.kept)
        if len(chunk) > room:
            chunk = chunk[:room]
            self.truncated = True
        self.kept += chunk
        return self._decoder.decode(chunk, final=self.truncated)

    def flush(self) -> str:
        return "" if self.truncated else self._decoder.decode(b"", final=True)


_CLOSE = object()
_STOP = object()


class _StdinWriter:
    """Writes stdin on its own thread, in arrival order, with a byte budget.

    Items queue up before the stream exists (the client may type before the process
    starts); the thread starts once the stream is attached.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: int) -> None:
        self._loop = loop
        self._budget = budget
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()

    async def write(self, data: bytes) -> None:
        """Queue ``data``; waits while more than the budget is unwritten. Loop only."""
        while True:
            with self._lock:
                if self._pending == 0 or self._pending + len(data) <= self._budget:
                    self._pending += len(data)
                    break
                self._room.clear()
            await self._room.wait()
        self._queue.put(data)

    def close_stdin(self) -> None:
        self._queue.put(_CLOSE)

    def start(self, stream: rt.ExecStream) -> None:
        threading.Thread(target=self._run, args=(stream,), name="berthd-ws-stdin", daemon=True).start()

    def stop(self) -> None:
        self._queue.put(_STOP)

    def _run(self, stream: rt.ExecStream) -> None:
        broken = False
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if not broken:
                    if item is _CLOSE:
                        stream.close_stdin()
                    elif isinstance(item, bytes):
                        stream.write_stdin(item)
            except Exception as exc:  # the process closed its stdin or ended
                log.debug("exec stdin: %s", exc)
                broken = True
            if isinstance(item, bytes):
                with self._lock:
                    self._pending -= len(item)
                try:
                    self._loop.call_soon_threadsafe(self._room.set)
                except RuntimeError:
                    return  # the loop is gone: so is the session


class ExecSession:
    """One interactive exec: ``attach`` runs on the actor's worker, the rest on the loop."""

    def __init__(self, shared: Shared, ws: ServerConnection, flags: _ExecFlags,
                 timeout: float | None) -> None:
        self._shared = shared
        self._loop = shared.loop
        self._flags = flags
        self._timeout = timeout
        self._cap = shared.deps.limits.output_cap_bytes
        self._sender = ThreadSender(ws, shared.loop)
        self._stdin = _StdinWriter(shared.loop, max(STDIN_BUDGET, shared.deps.limits.ws_max_message_bytes))
        self._stream: rt.ExecStream | None = None
        self._pending_signals: list[str] = []
        self._aborted = False
        self._timer: asyncio.TimerHandle | None = None
        self.timed_out = False

    # ---------------------------------------------------------------- worker thread

    def attach(self, exec_id: str, stream: rt.ExecStream) -> rt.ExecResult:
        """Pump the exec's output to the client until the process ends; the actor
        records what this returns."""
        began = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._on_attached, stream)
        except RuntimeError:  # the server is gone
            self._sender.abandon()
        if self._sender.gone:
            _kill(stream)
        captures = {"stdout": _Capture(self._cap), "stderr": _Capture(self._cap)}
        try:
            for name, chunk in stream.output():
                capture = captures.get(name) or captures["stdout"]
                self._forward(name if name in captures else "stdout", capture.take(chunk))
            for name, capture in captures.items():
                self._forward(name, capture.flush())
            exit_code = stream.wait()
        finally:
            stream.close()
        out, err = captures["stdout"], captures["stderr"]
        return rt.ExecResult(
            exit_code=exit_code, stdout=bytes(out.kept), stderr=bytes(err.kept),
            duration_ms=(time.monotonic() - began) * 1000.0,
            truncated=out.truncated or err.truncated,
            timed_out=self.timed_out or bool(getattr(stream, "timed_out", False)),
        )

    def _forward(self, name: str, text: str) -> None:
        for piece in chunks(text):
            if not self._sender.send(encode({"type": name, "data": piece})):
                return  # the client is gone: keep draining so the process can end

    # ---------------------------------------------------------------- event loop

    def _on_attached(self, stream: rt.ExecStream) -> None:
        self._stream = stream
        if self._aborted:
            self._shared.io.submit(_kill, stream)
            return
        if not self._flags.stdin:
            self._stdin.close_stdin()
        self._stdin.start(stream)
        for name in self._pending_signals:
            self._shared.io.submit(_signal_quietly, stream, name)
        self._pending_signals.clear()
        if self._timeout is not None:
            self._timer = self._loop.call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        self.timed_out = True
        if self._stream is not None:
            self._shared.io.submit(_kill, self._stream)

    async def pump_input(self, ws: ServerConnection) -> None:
        """Feed the client's frames to the exec until it closes its side; a malformed
        frame raises ``ValidationError``."""
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    await self._write(message)
                    continue
                try:
                    frame = _decode_control(message)
                except msgspec.MsgspecError as exc:
                    raise validation_error(exc, "exec frame") from None
                if isinstance(frame, _Stdin):
                    await self._write(frame.data.encode())
                elif isinstance(frame, _StdinClose | _Eof):
                    self._stdin.close_stdin()
                else:
                    self._signal(frame.signal)
        except ConnectionClosed:
            pass

    async def _write(self, data: bytes) -> None:
        if not self._flags.stdin:
            raise ValidationError("this exec was started with stdin: false; it takes no input",
                                  field="stdin")
        await self._stdin.write(data)

    def _signal(self, raw: str) -> None:
        name = raw[3:] if raw.startswith("SIG") else raw
        if name not in _SIGNALS:
            raise ValidationError(f"unknown signal {raw!r}", field="signal")
        if self._stream is None:
            self._pending_signals.append(name)
        else:
            self._shared.io.submit(_signal_quietly, self._stream, name)

    def abort(self) -> None:
        """The client left, the server stops, or the client broke the protocol: kill the
        process; ``attach`` then drains what is left and returns."""
        self._aborted = True
        self._sender.abandon()
        if self._stream is not None:
            self._shared.io.submit(_kill, self._stream)

    def finish(self) -> None:
        """Release the session's thread and timer (the exec is over or abandoned)."""
        self._sender.abandon()
        self._stdin.stop()
        if self._timer is not None:
            self._timer.cancel()


def _signal_quietly(stream: rt.ExecStream, name: str) -> None:
    try:
        stream.signal(name)
    except Exception as exc:  # the process already ended
        log.debug("exec signal %s: %s", name, exc)


def _kill(stream: rt.ExecStream) -> None:
    """KILL the process; if that cannot be done, close the stream (which kills too)."""
    try:
        stream.signal("KILL")
    except Exception:
        try:
            stream.close()
        except Exception as exc:
            log.debug("exec close: %s", exc)


def _settled_on(loop: asyncio.AbstractEventLoop,
                future: concurrent.futures.Future[Reply]) -> asyncio.Future[Reply]:
    """An asyncio future completed with the actor's ``future``.

    Unlike ``asyncio.wrap_future``, cancelling it does not cancel the actor's future (the
    actor still records the exec's end), and a completion after the loop closed is
    dropped instead of raising in the actor's thread."""
    waiter: asyncio.Future[Reply] = loop.create_future()

    def settle(done: concurrent.futures.Future[Reply]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.cancel()
            return
        exc = done.exception()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def on_done(done: concurrent.futures.Future[Reply]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, done)

    future.add_done_callback(on_done)
    return waiter


def _exit_frame(result: rt.ExecResult) -> bytes:
    frame: dict[str, Any] = {"type": "exit", "exit_code": result.exit_code}
    if result.truncated:
        frame["truncated"] = True
    if result.timed_out:
        frame["timed_out"] = True
    return encode(frame)


async def serve_exec(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    """Handle one exec connection from the request frame to the exit frame."""
    deps = shared.deps
    try:
        command, flags = parse_exec_request(await first_frame(ws, "the exec request"))
        state = find_container(deps, hs.ref, hs.principal)
    except BerthdError as exc:
        await fail(ws, exc)
        return
    session = ExecSession(shared, ws, flags, command.timeout)
    ctx = hs.principal.context(hs.correlation_id, hs.request_id)
    try:
        future: concurrent.futures.Future[Reply] = await shared.blocking(
            deps.supervisor.container_command, state.id, command, ctx,
            attach=session.attach, tty=flags.tty, output_cap=deps.limits.output_cap_bytes)
    except Exception as exc:
        session.finish()
        await fail(ws, as_error(exc))
        return
    outcome = _settled_on(shared.loop, future)
    inputs = asyncio.create_task(session.pump_input(ws))
    closed = asyncio.create_task(ws.wait_closed())
    try:
        await asyncio.wait((outcome, inputs, closed), return_when=asyncio.FIRST_COMPLETED)
        if not outcome.done():
            # the client left or broke the protocol, or the server is stopping
            protocol_error = inputs.exception() if inputs.done() and not inputs.cancelled() else None
            session.abort()
            await asyncio.wait((outcome,), timeout=ABORT_GRACE)
            if protocol_error is not None:
                await fail(ws, as_error(protocol_error))
            return
        try:
            reply = outcome.result()
        except Exception as exc:
            await fail(ws, as_error(exc))
            return
        result = reply.result.result if isinstance(reply.result, ExecOutcome) else None
        if result is None:
            await fail(ws, BerthdError("the exec ended without a result"))
            return
        try:
            await ws.send(_exit_frame(result), text=True)
        except ConnectionClosed:
            return
        await ws.close()
    finally:
        session.finish()
        for task in (inputs, closed):
            task.cancel()
        await asyncio.gather(inputs, closed, return_exceptions=True)
        outcome.cancel()  # detaches this waiter only; the actor still records the end


async def run_announced(
    shared: Shared, ws: ServerConnection,
    submit: Callable[[str, threading.Event], concurrent.futures.Future[Reply]],
    announced: threading.Event, listener: asyncio.Task[None],
) -> Reply | None:
    """Run one execution for a WebSocket client (kernel or session): ``submit(result_id,
    started)`` hands it to its actor; once it has its turn (``started``: the intent is on
    the log, so the id can be attached to, even after a restart) the client gets
    ``{"type": "started", "result_id"}`` first, then ``announced`` lets the output frames
    through. Answers the actor's reply, or None when the client left first (the actor
    still records the result)."""
    result_id = new_id()
    started = threading.Event()  # executions run one at a time: this one may wait its turn
    try:
        future = await shared.blocking(submit, result_id, started)
        future.add_done_callback(lambda _f: started.set())
        await shared.blocking(started.wait)
        if not (future.done() and future.exception() is not None):
            await ws.send(encode({"type": "started", "result_id": result_id}), text=True)
    finally:
        announced.set()
    outcome = _settled_on(shared.loop, future)
    await asyncio.wait((outcome, listener), return_when=asyncio.FIRST_COMPLETED)
    if not outcome.done():
        outcome.cancel()
        return None
    return outcome.result()
