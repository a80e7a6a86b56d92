"""/v1/kernels and /v1/results: persistent code kernels and their executions.

Executions run one at a time: one sent while another runs waits its turn (FIFO) and gets
its own result; more than the queue's depth waiting answers 429 ``QUEUE_FULL``.

A kernel that died answers 409 ``KERNEL_DEAD`` to ``execute`` (never a result): the
details carry the ``result_id`` of the execution it died in, whose stored result
(``GET /v1/results/{id}``) has ``status: "dead"``.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import falcon
import msgspec

from berthd.actors import CommandContext, Reply
from berthd.actors.kernel import KernelResult, KernelSupervisor
from berthd.domain import kernel as k
from berthd.domain.errors import KernelNotFound, ResultNotFound, RuntimeUnavailable, ValidationError
from berthd.http.deps import Deps
from berthd.http.precondition import set_etag
from berthd.http.resources._common import context_of, outcome, owned_page
from berthd.http.resources.containers import check_profile
from berthd.http.views import KernelList, ResultView, kernel_view
from berthd.http.wire import decode_body, query_int, send_json

__all__ = ["KernelAction", "KernelCollection", "KernelItem", "ResultItem", "find_kernel",
           "kernels_of", "result_view", "fresh_kernel", "capped_execute", "queued_outcome"]

STATUSES = ("starting", "idle", "busy", "dead", "restarting", "destroyed")


def kernels_of(deps: Deps) -> KernelSupervisor:
    if deps.kernels is None:
        raise RuntimeUnavailable("kernels are not enabled on this daemon")
    return deps.kernels


def find_kernel(deps: Deps, id_or_name: str, ctx: CommandContext) -> k.KernelState:
    """The kernel by id or name; another key's kernels are invisible (404, never 403)."""
    state = deps.kernels_view.get(id_or_name)
    if state is None or (not ctx.is_admin and state.owner != ctx.owner):
        raise KernelNotFound(f"no kernel '{id_or_name}'", id=id_or_name)
    return state


def fresh_kernel(deps: Deps, reply: Reply) -> k.KernelState:
    """Read-your-writes: the projection once it has the write, else the actor's state."""
    state: k.KernelState = reply.state
    if deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout):
        view = deps.kernels_view.get(state.id)
        if view is not None and view.version >= state.version:
            return view
    return state


def capped_execute(deps: Deps, cmd: k.ExecuteCode) -> k.ExecuteCode:
    """A request waits for the execution: never longer than a command may take."""
    cap = deps.limits.command_timeout
    if cmd.timeout is None or cmd.timeout > cap:
        return msgspec.structs.replace(cmd, timeout=cap)
    return cmd


def queued_outcome(deps: Deps, future: Future[Reply], started: threading.Event, run_for: float) -> Reply:
    """An execution's outcome: however long it waits its turn (the queue is bounded and
    every execution capped), then at most ``run_for`` seconds once it has started."""
    while not started.wait(0.5) and not future.done():
        pass
    reply = outcome(deps, future, timeout=run_for)
    # read-your-writes: the answer may come straight from the commit, before the views have
    # it; a GET right after must show this execution (execution_count, last_activity)
    deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout)
    return reply


def result_view(r: KernelResult, kernel_id: str) -> ResultView:
    return ResultView(
        status=r.status, stdout=r.stdout, stderr=r.stderr, return_value=r.return_value,
        execution_count=r.execution_count, duration_ms=r.duration_ms, truncated=r.truncated,
        error=r.error, result_id=r.result_id, kernel_id=kernel_id, exit_code=r.exit_code,
    )


class KernelCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        cmd = decode_body(req, k.CreateKernel, self.deps.limits.max_body_bytes)
        check_profile(self.deps, cmd.runtime, cmd.profile)
        ctx = context_of(req)
        reply = outcome(self.deps, kernels_of(self.deps).create_kernel(cmd, ctx))
        send_json(resp, kernel_view(fresh_kernel(self.deps, reply)), falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit", 50, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        status = req.get_param("status")
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}", field="status")
        ctx = context_of(req)
        page, total = owned_page(self.deps.kernels_view.all(), ctx,
                                 lambda s: s.status == status if status else s.status not in k.FINAL,
                                 limit, offset)
        send_json(resp, KernelList([kernel_view(s) for s in page], total, limit, offset))


class KernelItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        send_json(resp, kernel_view(set_etag(resp, find_kernel(self.deps, id, context_of(req)))))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        ctx = context_of(req)
        state = find_kernel(self.deps, id, ctx)
        reply = outcome(self.deps, kernels_of(self.deps).kernel_command(state.id, k.DestroyKernel(), ctx))
        send_json(resp, kernel_view(fresh_kernel(self.deps, reply)))


class KernelAction:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str, action: str) -> None:
        deps = self.deps
        limit = deps.limits.max_body_bytes
        if action == "execute":
            cmd = capped_execute(deps, decode_body(req, k.ExecuteCode, limit))
            ctx = context_of(req)
            state = find_kernel(deps, id, ctx)
            started = threading.Event()  # executions run one at a time: this one may wait its turn
            future = kernels_of(deps).kernel_command(state.id, cmd, ctx, started=started)
            reply = queued_outcome(deps, future, started, (cmd.timeout or deps.limits.command_timeout) + 30.0)
            send_json(resp, result_view(reply.result, state.id))
        elif action == "restart":
            decode_body(req, k.RestartKernel, limit, empty_ok=True)
            ctx = context_of(req)
            state = find_kernel(deps, id, ctx)
            reply = outcome(deps, kernels_of(deps).kernel_command(state.id, k.RestartKernel(), ctx))
            send_json(resp, kernel_view(fresh_kernel(deps, reply)))
        elif action == "interrupt":
            decode_body(req, k.InterruptKernel, limit, empty_ok=True)
            ctx = context_of(req)
            state = find_kernel(deps, id, ctx)
            reply = outcome(deps, kernels_of(deps).kernel_command(state.id, k.InterruptKernel(), ctx))
            send_json(resp, {"id": state.id, "interrupted": reply.result})
        else:
            raise falcon.HTTPNotFound()


class ResultItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        ctx = context_of(req)
        stored = self.deps.results.get(id)
        if stored is None or (not ctx.is_admin and stored.owner != ctx.owner):
            raise ResultNotFound(f"no result '{id}'", id=id)
        f = stored.finished
        if f is None:
            send_json(resp, ResultView(
                status="running", stdout="", stderr="", return_value=None, execution_count=0,
                duration_ms=0.0, truncated=False, error=None, result_id=id, kernel_id=stored.kernel_id))
            return
        send_json(resp, ResultView(
            status=f.status, stdout=f.stdout, stderr=f.stderr, return_value=f.return_value,
            execution_count=f.execution_count, duration_ms=f.duration_ms, truncated=f.truncated,
            error=f.error, result_id=id, kernel_id=stored.kernel_id, exit_code=f.exit_code))
