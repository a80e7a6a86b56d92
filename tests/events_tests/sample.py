"""Event types for the store tests: a small, stable vocabulary of our own, so these tests
do not move when the domain's events do."""

from __future__ import annotations

from typing import Any, ClassVar

from berthd.domain.base import Event, Meta, registry_of


class ThingCreated(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "thing"

    name: str
    size: int = 0


class ThingRenamed(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "thing"

    name: str
    reason: str = ""  # added "later": old payloads do not have it


class NoteAdded(Event, frozen=True, kw_only=True):
    kind: ClassVar[str] = "note"

    text: str
    tags: tuple[str, ...] = ()


class ThingArchived(Event, frozen=True, kw_only=True):
    """Known only to a "newer" berthd (``NEWER_REGISTRY``)."""

    kind: ClassVar[str] = "thing"

    why: str


class Unregistered(Event, frozen=True, kw_only=True):
    """In no registry: appending it is a programming error."""

    kind: ClassVar[str] = "thing"


REGISTRY = registry_of(ThingCreated, ThingRenamed, NoteAdded)
NEWER_REGISTRY = registry_of(ThingCreated, ThingRenamed, NoteAdded, ThingArchived)


def meta(**fields: Any) -> Meta:
    """Metadata with a fixed timestamp unless one is given."""
    fields.setdefault("timestamp", "2026-11-22T10:00:00Z")
    return Meta(**fields)
