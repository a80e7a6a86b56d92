"""Sessions: named, expiring work contexts for a client.

A session opens a kernel (and its sandbox) on demand, counts what it ran, and expires
``ttl_seconds`` after its last activity; expiry is an event (``SessionExpired``) decided
from an injected clock, so it is tested with a frozen one and happens after a restart
too. A policy's ``allow`` list matches argv prefixes; a denied command is recorded
(``CommandDenied``) and refused, never reported as a success.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from berthd.domain.base import Command, Event
from berthd.domain.container import NAME_RE, NoNul
from berthd.domain.errors import Conflict, ExpiredSession, PolicyDenied, ValidationError
from berthd.domain.image import ImageRef

__all__ = [
    "SESSION_EVENTS",
    "CloseSession",
    "CommandDenied",
    "CommandExecuted",
    "CreateSession",
    "ExecuteInSession",
    "ExecuteWithRetry",
    "ExpireSession",
    "FINAL",
    "Policy",
    "SessionClosed",
    "SessionExpired",
    "SessionKernelAttached",
    "SessionKernelLost",
    "SessionOpened",
    "SessionState",
    "allowed",
    "decide",
    "due_to_expire",
    "evolve",
    "refusal",
    "replay",
]

Code = Annotated[str, msgspec.Meta(max_length=1 << 20)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """``allow``: argv prefixes, written as command lines ("kubectl get", "ls")."""

    allow: list[Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]] | None = None


class CreateSession(Command):
    name: Annotated[str, msgspec.Meta(pattern=NAME_RE, max_length=63)] | None = None
    language: Literal["python", "bash"] = "python"
    image: ImageRef | None = None
    profile: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = "default"
    runtime: Literal["docker", "local"] | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 86400)] = 3600
    policy: Policy | None = None
    metadata: dict[Annotated[str, msgspec.Meta(max_length=256)], Any] = {}


class ExecuteInSession(Command):
    code: Code | None = None
    command: Annotated[list[NoNul], msgspec.Meta(min_length=1, max_length=4096)] | None = None
    timeout: Timeout | None = None


class ExecuteWithRetry(Command):
    code: Code
    on_error_code: Code | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    timeout: Timeout | None = None


class CloseSession(Command):
    pass


class ExpireSession(Command):
    """The daemon's own: expire the session if its ``expires_at`` has passed."""


class SessionEvent(Event, frozen=True, kw_only=True):
    kind = "session"


class SessionOpened(SessionEvent, frozen=True, kw_only=True):
    id: str
    name: str
    language: str = "python"
    image: str | None = None
    profile: str = "default"
    runtime: str | None = None
    ttl_seconds: int = 3600
    policy: Policy | None = None
    metadata: dict[str, Any] = {}
    owner: str = "admin"
    created_at: str = ""
    expires_at: str = ""


class SessionKernelAttached(SessionEvent, frozen=True, kw_only=True):
    kernel_id: str
    container_id: str


class SessionKernelLost(SessionEvent, frozen=True, kw_only=True):
    """The session's kernel is gone (destroyed from outside, dead, lost): the next
    execution opens a new one (``SessionKernelAttached``)."""

    kernel_id: str
    reason: str
    at: str = ""


class CommandExecuted(SessionEvent, frozen=True, kw_only=True):
    """One execution in the session. For ``mode == "code"`` the result is the kernel's
    (``ExecutionFinished`` on the kernel's stream); for ``mode == "command"`` the result is
    here, output capped, so ``GET /v1/results/{id}`` serves it from the log."""

    result_id: str
    mode: str  # code | command
    status: str  # ok | error | timeout | dead
    executed_at: str
    expires_at: str
    command: list[str] = []
    exit_code: int | None = None
    stdout: str = ""  # capped (command mode)
    stderr: str = ""  # capped (command mode)
    duration_ms: float = 0.0
    truncated: bool = False
    execution_count: int = 0


class CommandDenied(SessionEvent, frozen=True, kw_only=True):
    command: list[str]
    reason: str
    at: str = ""


class SessionExpired(SessionEvent, frozen=True, kw_only=True):
    at: str


class SessionClosed(SessionEvent, frozen=True, kw_only=True):
    at: str


SESSION_EVENTS: tuple[type[Event], ...] = (
    SessionOpened, SessionKernelAttached, CommandExecuted, CommandDenied, SessionExpired, SessionClosed,
    SessionKernelLost,
)

FINAL = frozenset({"expired", "closed"})


class SessionState(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    language: str = "python"
    image: str | None = None
    profile: str = "default"
    runtime: str | None = None
    ttl_seconds: int = 3600
    policy: Policy | None = None
    metadata: dict[str, Any] = {}
    owner: str = "admin"
    status: str = "active"  # active | expired | closed
    kernel_id: str | None = None
    container_id: str | None = None
    created_at: str = ""
    expires_at: str = ""
    last_activity: str = ""
    commands_executed: int = 0
    version: int = 0


@functools.singledispatch
def _apply(event: Event, s: SessionState) -> SessionState:
    return s


def evolve(state: SessionState | None, event: Event) -> SessionState | None:
    if isinstance(event, SessionOpened):
        return SessionState(
            id=event.id, name=event.name, language=event.language, image=event.image,
            profile=event.profile, runtime=event.runtime, ttl_seconds=event.ttl_seconds,
            policy=event.policy, metadata=event.metadata, owner=event.owner,
            created_at=event.created_at, expires_at=event.expires_at, last_activity=event.created_at,
            version=1,
        )
    if state is None:
        return None
    return msgspec.structs.replace(_apply(event, state), version=state.version + 1)


def replay(events: Iterable[Event]) -> SessionState | None:
    return functools.reduce(evolve, events, None)


@_apply.register
def _(e: SessionKernelAttached, s: SessionState) -> SessionState:
    return msgspec.structs.replace(s, kernel_id=e.kernel_id, container_id=e.container_id)


@_apply.register
def _(e: SessionKernelLost, s: SessionState) -> SessionState:
    if s.kernel_id != e.kernel_id:
        return s
    return msgspec.structs.replace(s, kernel_id=None, container_id=None)


@_apply.register
def _(e: CommandExecuted, s: SessionState) -> SessionState:
    return msgspec.structs.replace(s, commands_executed=s.commands_executed + 1,
                                   last_activity=e.executed_at, expires_at=e.expires_at)


@_apply.register
def _(e: SessionExpired, s: SessionState) -> SessionState:
    return msgspec.structs.replace(s, status="expired")


@_apply.register
def _(e: SessionClosed, s: SessionState) -> SessionState:
    return msgspec.structs.replace(s, status="closed")


def expiry(now: datetime, ttl_seconds: int) -> datetime:
    return now + timedelta(seconds=ttl_seconds)


def due_to_expire(state: SessionState | None, now: str) -> bool:
    """True when an active session's ``expires_at`` has passed (RFC 3339 strings of the
    same format compare in time order)."""
    return state is not None and state.status == "active" and bool(state.expires_at) and state.expires_at <= now


def allowed(policy: Policy | None, argv: list[str]) -> bool:
    """No policy or no allow list: everything. Otherwise an allow entry must be a prefix
    of the argv, word for word ("kubectl get" allows ["kubectl", "get", "pods"], not
    ["kubectl", "delete"] nor ["kubectl", "getx"])."""
    if policy is None or policy.allow is None:
        return True
    for entry in policy.allow:
        try:
            prefix = shlex.split(entry)
        except ValueError:
            continue
        if prefix and argv[: len(prefix)] == prefix:
            return True
    return False


def decide(state: SessionState | None, command: Command, *, now: str = "", expires_at: str = "",
           new_id: str = "", owner: str = "admin", name: str = "", busy: bool = False) -> list[Event]:
    """``busy``: an execution of the session is running or waiting. A busy session is in
    use, so it does not expire; its TTL runs again from the end of that activity."""
    if isinstance(command, CreateSession):
        if state is not None:
            raise Conflict(f"session {new_id} already exists", id=new_id)
        return [SessionOpened(
            id=new_id, name=name or command.name or f"session-{new_id}", language=command.language,
            image=command.image, profile=command.profile, runtime=command.runtime,
            ttl_seconds=command.ttl_seconds, policy=command.policy, metadata=dict(command.metadata),
            owner=owner, created_at=now, expires_at=expires_at,
        )]
    if state is None:
        raise ValidationError("no such session")
    if due_to_expire(state, now) and not busy:
        return [SessionExpired(at=now)]
    if isinstance(command, (CloseSession, ExpireSession)) and state.status in FINAL:
        return []  # already over: closing or expiring again changes nothing
    if state.status == "expired":
        raise ExpiredSession(f"session {state.name} expired at {state.expires_at}; open a new session",
                             id=state.id, status="expired")
    if state.status in FINAL:
        raise Conflict(f"session {state.name} is {state.status}; open a new session",
                       id=state.id, status=state.status)
    if isinstance(command, ExpireSession):
        return []
    if isinstance(command, CloseSession):
        return [SessionClosed(at=now)]
    if isinstance(command, ExecuteInSession):
        if (command.code is None) == (command.command is None):
            raise ValidationError("give exactly one of code or command", field="code")
        if command.command is not None and not allowed(state.policy, command.command):
            return [CommandDenied(command=list(command.command), at=now,
                                  reason="not in the session's policy allow list")]
        return []  # the execution itself is the kernel's; the session records its result
    if isinstance(command, ExecuteWithRetry):
        return []
    raise ValidationError(f"unknown command {type(command).__name__}")


def refusal(events: list[Event], state: SessionState) -> Exception | None:
    """The error to answer with when ``decide`` recorded a refusal (expiry, denial)."""
    for e in events:
        if isinstance(e, CommandDenied):
            return PolicyDenied(f"'{shlex.join(e.command)}' is not allowed by the session's policy",
                                allow=(state.policy.allow if state.policy else None) or [])
        if isinstance(e, SessionExpired):
            return ExpiredSession(f"session {state.name} expired at {state.expires_at}; open a new session",
                                  id=state.id, status="expired")
    return None
