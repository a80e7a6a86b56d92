"""/v1/sessions: expiring work contexts with a kernel opened on demand.

``execute`` takes ``code`` (run in the session's kernel) or ``command`` (an argv run in the
session's sandbox, checked against the session's policy: a denied one answers 403
``POLICY_DENIED`` and is recorded as ``CommandDenied``). Both answer the kernel result
fields plus ``result_id`` and ``executed_at``; ``execute_with_retry`` adds ``attempts``.
A session past its ``expires_at`` answers 409 ``SESSION_EXPIRED``. Executions in a session
run one at a time in arrival order (each caller gets its own result); more than the
queue's depth waiting answers 429 ``QUEUE_FULL``.
"""

from __future__ import annotations

import threading
from typing import Any

import falcon
import msgspec

from berthd.actors import CommandContext, Reply
from berthd.actors.session import SessionOutcome, SessionSupervisor
from berthd.domain import session as se
from berthd.domain.errors import RuntimeUnavailable, SessionNotFound, ValidationError
from berthd.http.deps import Deps
from berthd.http.precondition import set_etag
from berthd.http.resources._common import context_of, outcome, owned_page
from berthd.http.resources.containers import check_profile
from berthd.http.resources.kernels import queued_outcome
from berthd.http.views import ResultView
from berthd.http.wire import decode_body, query_int, send_json

__all__ = [
    "RetryResultView",
    "SessionAction",
    "SessionCollection",
    "SessionItem",
    "SessionList",
    "SessionResultView",
    "SessionView",
    "capped_timeout",
    "find_session",
    "session_result_view",
    "session_view",
]

STATUSES = ("active", "expired", "closed")


class SessionView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    status: str
    language: str
    container_id: str | None
    kernel_id: str | None
    created_at: str
    expires_at: str
    last_activity: str
    commands_executed: int
    metadata: dict[str, Any]
    ttl_seconds: int = 3600
    policy: se.Policy | None = None


class SessionList(msgspec.Struct):
    items: list[SessionView]
    total: int
    limit: int
    offset: int


class SessionResultView(ResultView, kw_only=True):
    """A kernel result plus when it ran in the session."""

    executed_at: str = ""


class RetryResultView(SessionResultView, kw_only=True):
    """The last attempt's result, and every attempt of ``code``."""

    attempts: list[SessionResultView] = []


def session_view(s: se.SessionState) -> SessionView:
    return SessionView(
        id=s.id, name=s.name, status=s.status, language=s.language, container_id=s.container_id,
        kernel_id=s.kernel_id, created_at=s.created_at, expires_at=s.expires_at,
        last_activity=s.last_activity, commands_executed=s.commands_executed, metadata=s.metadata,
        ttl_seconds=s.ttl_seconds, policy=s.policy,
    )


def _result_view(o: SessionOutcome, kernel_id: str) -> SessionResultView:
    r = o.result
    return SessionResultView(
        status=r.status, stdout=r.stdout, stderr=r.stderr, return_value=r.return_value,
        execution_count=r.execution_count, duration_ms=r.duration_ms, truncated=r.truncated,
        error=r.error, result_id=r.result_id, kernel_id=kernel_id, exit_code=r.exit_code,
        executed_at=o.executed_at,
    )


def sessions_of(deps: Deps) -> SessionSupervisor:
    if deps.sessions is None:
        raise RuntimeUnavailable("sessions are not enabled on this daemon")
    return deps.sessions


def find_session(deps: Deps, id_or_name: str, ctx: CommandContext) -> se.SessionState:
    """The session by id or name; another key's sessions are invisible (404, never 403)."""
    state = deps.sessions_view.get(id_or_name)
    if state is None or (not ctx.is_admin and state.owner != ctx.owner):
        raise SessionNotFound(f"no session '{id_or_name}'", id=id_or_name)
    return state


def fresh_session(deps: Deps, reply: Reply) -> se.SessionState:
    """Read-your-writes: the projection once it has the write, else the actor's state."""
    state: se.SessionState = reply.state
    if deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout):
        view = deps.sessions_view.get(state.id)
        if view is not None and view.version >= state.version:
            return view
    return state


def session_result_view(reply: Reply) -> SessionResultView:
    """An execution's answer, as ``POST .../execute`` and the WebSocket send it."""
    return _result_view(reply.result, _kernel_of(reply))


def capped_timeout(deps: Deps, timeout: float | None) -> float:
    """A request waits for the execution: never longer than a command may take."""
    cap = deps.limits.command_timeout
    return cap if timeout is None or timeout > cap else timeout


class SessionCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        cmd = decode_body(req, se.CreateSession, self.deps.limits.max_body_bytes, empty_ok=True)
        check_profile(self.deps, cmd.runtime, cmd.profile)
        ctx = context_of(req)
        reply = outcome(self.deps, sessions_of(self.deps).create_session(cmd, ctx))
        send_json(resp, session_view(fresh_session(self.deps, reply)), falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit", 50, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        status = req.get_param("status")
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}", field="status")
        ctx = context_of(req)
        page, total = owned_page(self.deps.sessions_view.all(), ctx,
                                 lambda s: status is None or s.status == status, limit, offset)
        send_json(resp, SessionList([session_view(s) for s in page], total, limit, offset))


class SessionItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        send_json(resp, session_view(set_etag(resp, find_session(self.deps, id, context_of(req)))))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        ctx = context_of(req)
        state = find_session(self.deps, id, ctx)
        reply = outcome(self.deps, sessions_of(self.deps).session_command(state.id, se.CloseSession(), ctx))
        send_json(resp, session_view(fresh_session(self.deps, reply)))


class SessionAction:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str, action: str) -> None:
        deps = self.deps
        limit = deps.limits.max_body_bytes
        if action == "execute":
            cmd = decode_body(req, se.ExecuteInSession, limit)
            if (cmd.code is None) == (cmd.command is None):
                raise ValidationError("give exactly one of 'code' or 'command'", field="code")
            timeout = capped_timeout(deps, cmd.timeout)
            cmd = msgspec.structs.replace(cmd, timeout=timeout)
            ctx = context_of(req)
            state = find_session(deps, id, ctx)
            started = threading.Event()  # a session runs one execution at a time: this one may wait
            future = sessions_of(deps).session_command(state.id, cmd, ctx, started=started)
            reply = queued_outcome(deps, future, started, timeout + 90.0)
            deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout)
            send_json(resp, session_result_view(reply))
        elif action == "execute_with_retry":
            retry = decode_body(req, se.ExecuteWithRetry, limit)
            timeout = capped_timeout(deps, retry.timeout)
            retry = msgspec.structs.replace(retry, timeout=timeout)
            ctx = context_of(req)
            state = find_session(deps, id, ctx)
            total = timeout * (2 * retry.max_attempts) + 90.0
            started = threading.Event()
            future = sessions_of(deps).session_command(state.id, retry, ctx, started=started)
            reply = queued_outcome(deps, future, started, total)
            deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout)
            o: SessionOutcome = reply.result
            kernel_id = _kernel_of(reply)
            last = _result_view(o, kernel_id)
            attempts = [_result_view(a, kernel_id) for a in o.attempts or []]
            send_json(resp, RetryResultView(**msgspec.structs.asdict(last), attempts=attempts))
        else:
            raise falcon.HTTPNotFound()


def _kernel_of(reply: Reply) -> str:
    state: se.SessionState | None = reply.state
    return (state.kernel_id or "") if state is not None else ""

