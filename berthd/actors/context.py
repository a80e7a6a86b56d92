"""What every command carries besides itself, and the injectable clock and id source."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from berthd.domain.base import Meta
from berthd.domain.errors import PreconditionFailed

__all__ = ["Clock", "CommandContext", "Reply", "SYSTEM", "check_if_match", "etag_of", "matches", "new_id",
           "require_version",
           "rfc3339", "settle", "system_clock"]

Clock = Callable[[], datetime]
"""Returns the current time (UTC, aware). Tests pass a frozen one."""


def system_clock() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with "Z", millisecond precision, as the API serves timestamps."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def new_id() -> str:
    """A short random id, 12 hex digits, as Docker shows them."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Who asks, and the ids that tie the resulting events to the request."""

    principal: str = "admin"
    owner: str = "admin"  # whose entities the principal acts as (a key id; "admin" for admin)
    is_admin: bool = True
    correlation_id: str | None = None
    request_id: str | None = None
    if_match: str | None = None  # the client's If-Match for the entity it addresses

    def meta(self, clock: Clock, node_id: str) -> Meta:
        return Meta(
            timestamp=rfc3339(clock()), node_id=node_id, principal=self.principal,
            correlation_id=self.correlation_id, request_id=self.request_id,
        )


def etag_of(version: int) -> str:
    """An entity's version as its HTTP entity tag."""
    return f'"{version}"'


def matches(if_match: str, version: int) -> bool:
    """Does an ``If-Match`` header name ``version`` (``*``, strong or weak tags)?"""
    current = etag_of(version)
    for tag in (t.strip() for t in if_match.split(",")):
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == current or tag == str(version):
            return True
    return False


def check_if_match(ctx: CommandContext, state: Any) -> CommandContext:
    """On the entity's own mailbox, so that two commands sent with the same ``If-Match``
    cannot both pass: 412 unless it names the current version. Returns the context
    without it, for what the command asks of other entities."""
    if ctx.if_match is None:
        return ctx
    require_version(ctx.if_match, state)
    return dataclasses.replace(ctx, if_match=None)


def require_version(if_match: str | None, state: Any) -> None:
    """412 unless ``if_match`` (if any) names ``state``'s version. Kernels and sessions
    check a queued execution's tag again when its turn comes: it runs only on the version
    its client saw."""
    version = getattr(state, "version", None)
    if if_match is not None and version is not None and not matches(if_match, version):
        raise PreconditionFailed(
            f"If-Match {if_match} does not match the current version {etag_of(version)}: "
            "GET it again and decide on what it is now", etag=etag_of(version))


SYSTEM = CommandContext(principal="system", owner="admin")
"""The context of what the daemon does on its own (exits observed, reconciliation)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """An actor's answer: the log position of its last event, the state, and a result."""

    position: int
    state: Any
    result: Any = None


def settle(future: Future[Any] | None, reply: Any, error: BaseException | None,
           as_error: Callable[[BaseException], BaseException]) -> None:
    """Complete a caller's future once: it may have been completed already, on another
    thread (a commit callback and the actor can race to answer)."""
    if future is None or future.done():
        return
    try:
        if error is not None:
            future.set_exception(as_error(error))
        else:
            future.set_result(reply)
    except InvalidStateError:
        pass
