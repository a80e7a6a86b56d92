"""What every event and command is made of.

Events are frozen msgspec Structs named in the past tense; their class name is their
type on the log, and ``kind`` names the entity kind whose stream they belong to. Add
fields only with defaults, never change a field's type, never rename an event class.

Commands are msgspec Structs named in the imperative, strict about unknown fields; they
are decoded once at the HTTP edge.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = ["Command", "Event", "Meta", "registry_of"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something that happened to one entity; ``kind`` is the entity kind."""

    kind: ClassVar[str] = ""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


class Command(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Something a client asks for; a refusal appends nothing."""


class Meta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Who caused an event, why, when and where; stored with every event."""

    timestamp: str  # RFC 3339 UTC with "Z"
    node_id: str = ""
    principal: str | None = None  # API key id, "admin", "socket" or "system"
    correlation_id: str | None = None
    request_id: str | None = None


def registry_of(*classes: type[Event]) -> dict[str, type[Event]]:
    """Map each event class's type name to the class, refusing duplicates."""
    out: dict[str, type[Event]] = {}
    for cls in classes:
        name = cls.type_name()
        if name in out:
            raise ValueError(f"duplicate event type {name}")
        out[name] = cls
    return out
