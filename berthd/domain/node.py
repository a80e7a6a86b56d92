"""The daemon node itself: boots, stops, reconciliation findings, API keys.

These streams have one writer each (the daemon's lifecycle, the key service), so their
events are appended without an actor.
"""

from __future__ import annotations

from berthd.domain.base import Event

__all__ = [
    "NODE_EVENTS",
    "ApiKeyCreated",
    "ApiKeyRevoked",
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
    rate_limit: int | None = None
    created_at: str = ""


class ApiKeyRevoked(KeyEvent, frozen=True, kw_only=True):
    key_id: str


NODE_EVENTS: tuple[type[Event], ...] = (
    NodeStarted, NodeStopped, OrphanContainerFound, ApiKeyCreated, ApiKeyRevoked,
)
