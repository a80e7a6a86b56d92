"""``/v1/kernels/{id}/execute``: run code and stream its output over a WebSocket.

Frames — client, first and only: ``{"code": "...", "timeout"?: s}`` to run code, or
``{"attach": result_id, "offset"?: N}`` to follow an execution again (running or
finished) from ``N`` characters into its combined output (the characters of the
``stdout`` and ``stderr`` frames received so far): nothing is lost or repeated. Server:
for code, first ``{"type": "started", "result_id": "..."}`` (the id to attach with), once
the execution has its turn (a kernel runs one at a time; others wait in FIFO order);
then ``{"type": "stdout"|"stderr", "data": "..."}`` as the code prints, then ``{"type":
"result", ...}`` with the fields of ``POST /v1/kernels/{id}/execute`` and close 1000; or
``{"type": "error", "error": {...}}`` (a dead kernel: ``KERNEL_DEAD``) and close 1008/1011.

The kernel's actor owns the execution: output frames are sent from its worker thread
(``ThreadSender``), so a slow client slows the reading of the agent, never the agent
itself (it keeps the output). A client that leaves does not stop the code; its result
is recorded and can be fetched or attached to again. An attach reads from the agent
directly and appends nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from berthd.actors import CommandContext
from berthd.actors.context import Reply
from berthd.actors.kernel import KernelResult, kernel_result, result_of
from berthd.domain import kernel as k
from berthd.domain.errors import BerthdError, ResultNotFound
from berthd.events.readmodels import StoredResult
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
from berthd.http.deps import Deps
from berthd.http.resources.kernels import capped_execute, find_kernel, kernels_of, result_view
from berthd.kernel import AgentClient, KernelError, UnknownExecution, locate_agent
from berthd.runtime import base as rt

__all__ = ["parse_kernel_request", "serve_kernel"]



class _Attach(msgspec.Struct, forbid_unknown_fields=True):
    attach: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


_decode_object = msgspec.json.Decoder(dict[str, Any]).decode


def parse_kernel_request(message: str | bytes) -> k.ExecuteCode | _Attach:
    """The first frame: an ``ExecuteCode`` or an attach; ``ValidationError`` naming the field."""
    try:
        body = _decode_object(message)
    except msgspec.MsgspecError as exc:
        raise validation_error(exc, "execute request (send a JSON object)") from None
    try:
        if "attach" in body:
            return msgspec.convert(body, _Attach)
        return msgspec.convert(body, k.ExecuteCode)
    except msgspec.ValidationError as exc:
        raise validation_error(exc, "execute request") from None


async def serve_kernel(shared: Shared, ws: ServerConnection, hs: Handshake) -> None:
    deps = shared.deps
    ctx = hs.principal.context(hs.correlation_id, hs.request_id)
    try:
        state = find_kernel(deps, hs.ref, ctx)
        request = parse_kernel_request(await first_frame(ws))
    except BerthdError as exc:
        await fail(ws, exc)
        return
    sender = ThreadSender(ws, shared.loop)

    def on_output(stream: str, text: str) -> None:
        send_output(sender, stream, text)

    listener = asyncio.create_task(discard_incoming(ws))
    try:
        result: KernelResult | None
        if isinstance(request, _Attach):
            result = await _attach(shared, deps, ctx, state, request, on_output)
        else:
            result = await _execute(shared, ws, deps, ctx, state, capped_execute(deps, request), on_output, listener)
        if result is None:
            return
        frame = {"type": "result", **msgspec.structs.asdict(result_view(result, state.id))}
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


async def _execute(shared: Shared, ws: ServerConnection, deps: Deps, ctx: CommandContext,
                   state: k.KernelState,
                   cmd: k.ExecuteCode, on_output: Callable[[str, str], None],
                   listener: asyncio.Task[None]) -> KernelResult | None:
    announced = threading.Event()

    def output_after_started(stream: str, text: str) -> None:
        announced.wait(FIRST_FRAME_TIMEOUT)  # the "started" frame goes first
        on_output(stream, text)

    def submit(result_id: str, started: threading.Event) -> concurrent.futures.Future[Reply]:
        return kernels_of(deps).kernel_command(state.id, cmd, ctx, on_output=output_after_started,
                                               result_id=result_id, started=started)

    reply = await run_announced(shared, ws, submit, announced, listener)
    result: KernelResult | None = reply.result if reply is not None else None
    return result


async def _attach(shared: Shared, deps: Deps, ctx: CommandContext, state: k.KernelState,
                  request: _Attach, on_output: Any) -> KernelResult:
    stored = deps.results.get(request.attach)
    if stored is None:  # told "started" a moment ago: the view may not have the intent yet
        head = await shared.blocking(deps.store.head)
        await shared.blocking(deps.runner.wait_for, head, deps.limits.read_your_writes_timeout)
        stored = deps.results.get(request.attach)
    if stored is None or stored.kernel_id != state.id or (not ctx.is_admin and stored.owner != ctx.owner):
        raise ResultNotFound(f"no result '{request.attach}' of kernel {state.name}", id=request.attach)
    runtime = deps.runtimes.get(state.runtime)

    def follow() -> KernelResult | None:
        if runtime is None:
            return None
        try:
            paths = locate_agent(runtime, state.container_id, state.id)
            with AgentClient.connect(paths.socket_path, timeout=5.0) as client:
                return kernel_result(request.attach, client.attach(request.attach, request.offset, on_output))
        except (UnknownExecution, KernelError, rt.RuntimeError_):
            return None

    result = await shared.blocking(follow)
    if result is not None:
        return result
    return _stored(deps, stored, request.attach)


def _stored(deps: Deps, stored: StoredResult, result_id: str) -> KernelResult:
    """The agent no longer has it: the log's copy (its output is not re-sent)."""
    latest = deps.results.get(result_id) or stored
    if latest.finished is None:
        raise ResultNotFound(f"execution {result_id} is no longer reachable", id=result_id)
    return result_of(latest.finished)
