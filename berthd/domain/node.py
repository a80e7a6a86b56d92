"""The daemon node itself: boots, stops, reconciliation findings, API keys.

These streams have one writer each (the daemon's lifecycle, the key service), so their
events are appended without an actor.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from berthd.domain.base import Command, Event

__all__ = [
    "NODE_EVENTS",
    "ApiKeyCreated",
    "ApiKeyRevoked",
    "CreateApiKey",
    "KeyQuotas",
    "KeyRateLimits",
    "NodeStarted",
    "NodeStopped",
    "OrphanContainerFound",
]


class NodeEvent(Event, frozen=True, kw_only=True):
    kind = "node"


class NodeStarted(NodeEvent, frozen=True, kw_only=True):
    version: str
    runtime: str
    isolation: str
    pid: int = 0


class NodeStopped(NodeEvent, frozen=True, kw_only=True):
    reason: str = "signal"


class OrphanContainerFound(NodeEvent, frozen=True, kw_only=True):
    """A container labelled by this node that has no stream: reported, left alone."""

    berth_id: str
    runtime: str
    runtime_ref: str | None = None
    state: str = ""


class KeyEvent(Event, frozen=True, kw_only=True):
    kind = "key"


class ApiKeyCreated(KeyEvent, frozen=True, kw_only=True):
    """A key was made. Only its SHA-256 is ever stored; the secret is shown once."""

    key_id: str
    name: str
    role: str
    key_hash: str
    rate_limit: int | None = None  # general requests per minute; None: the configured default
    created_at: str = ""
    executions_rate_limit: int | None = None  # per minute; None: the configured default
    sessions_rate_limit: int | None = None  # session creations per minute
    max_containers: int | None = None  # live at once; None: the configured default
    max_kernels: int | None = None
    max_sessions: int | None = None


class ApiKeyRevoked(KeyEvent, frozen=True, kw_only=True):
    key_id: str


PerMinute = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Quota = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class KeyRateLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Requests per minute for each budget; an absent one takes the configured default."""

    general: PerMinute | None = None
    executions: PerMinute | None = None
    sessions: PerMinute | None = None


class KeyQuotas(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Live entities a user key may hold at once; an absent one takes the configured default."""

    containers: Quota | None = None
    kernels: Quota | None = None
    sessions: Quota | None = None


class CreateApiKey(Command, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/keys``: ``rate_limit`` (API.md) is the general budget; ``rate_limits`` and
    ``quotas`` are extensions."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")]
    role: Literal["admin", "user"] = "user"
    rate_limit: PerMinute | None = None
    rate_limits: KeyRateLimits | None = None
    quotas: KeyQuotas | None = None


NODE_EVENTS: tuple[type[Event], ...] = (
    NodeStarted, NodeStopped, OrphanContainerFound, ApiKeyCreated, ApiKeyRevoked,
)
