"""``/v1/sessions/{id}/execute``: run code or a command in a session, streamed over a
WebSocket.

Frames — client, first and only: the body of ``POST /v1/sessions/{id}/execute``
(``{"code": "..."}`` or ``{"command": [...]}``, ``"timeout"?``). Server: ``{"type":
"started", "result_id": "..."}`` once the execution has its turn (a session runs one at a
time, in arrival order); for code, ``{"type": "stdout"|"stderr", "data": "..."}`` as it
prints (a command's output comes whole in the result); then ``{"type": "result", ...}``
with the fields of the HTTP answer and close 1000; or ``{"type": "error", "error":
{...}}`` (``POLICY_DENIED``, ``SESSION_EXPIRED``, ``KERNEL_DEAD``, ``QUEUE_FULL``, ...)
and close 1008/1011.

The session's actor owns the execution: a client that leaves does not stop it; its
result is recorded (``GET /v1/results/{id}``), and code can be followed again with
``{"attach": result_id}`` on ``/v1/kernels/{kernel_id}/execute``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from berthd.actors.context import Reply
from berthd.domain import session as se
from berthd.domain.errors import BerthdError, ValidationError
from berthd.http._ws_common import (
    FIRST_FRAME_TIMEOUT,
    Handshake,
    Shared,
    ThreadSender,
    as_error,
    discard_incoming,
    encode,
    fail,
    first_frame,
    send_output,
    validation_error,
)
from berthd.http._ws_exec import run_announced
from berthd.http.resources.sessions import (
    capped_timeout,
    find_session,
    session_result_view,
    sessions_of,
)

__all__ = ["parse_session_request", "serve_session"]


_decode_object = msgspec.json.Decoder(dict[str, Any]).decode


def parse_session_request(message: str | bytes) -> se.ExecuteInSession:
    """The first frame: an ``ExecuteInSession`` with exactly one of code or command."""
    try:
        cmd = msgspec.convert(_decode_object(message), se.ExecuteInSession)
    except msgspec.MsgspecError as exc:
        raise validation_error(exc, "execute request") from None
    if (cmd.code is None) == (cmd.command is None):
        raise ValidationError("give exactly one of 'code' or 'command'", field="code")
    return cmd


async def serve_session(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    deps = shared.deps
    ctx = hs.principal.context(hs.correlation_id, hs.request_id)
    try:
        state = find_session(deps, hs.ref, ctx)
        cmd = parse_session_request(await first_frame(ws))
        cmd = msgspec.structs.replace(cmd, timeout=capped_timeout(deps, cmd.timeout))
    except BerthdError as exc:
        await fail(ws, exc)
        return
    sender = ThreadSender(ws, shared.loop)
    announced = threading.Event()

    def on_output(stream: str, text: str) -> None:
        announced.wait(FIRST_FRAME_TIMEOUT)  # the "started" frame goes first
        send_output(sender, stream, text)

    listener = asyncio.create_task(discard_incoming(ws))
    try:
        def submit(result_id: str, started: threading.Event) -> concurrent.futures.Future[Reply]:
            return sessions_of(deps).session_command(state.id, cmd, ctx, started=started,
                                                     result_id=result_id, on_output=on_output)

        reply = await run_announced(shared, ws, submit, announced, listener)
        if reply is None:  # the client left; the actor still records the result
            return
        frame = {"type": "result", **msgspec.structs.asdict(session_result_view(reply))}
        await ws.send(encode(frame), text=True)
        await ws.close()
    except ConnectionClosed:
        pass
    except Exception as exc:
        await fail(ws, as_error(exc))
    finally:
        sender.abandon()
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
