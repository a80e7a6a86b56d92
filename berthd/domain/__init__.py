"""The pure core: commands, events, state, ``decide`` and ``evolve``. No I/O here."""

from __future__ import annotations

from berthd.domain.base import Command, Event, Meta, registry_of
from berthd.domain.container import CONTAINER_EVENTS
from berthd.domain.image import IMAGE_EVENTS
from berthd.domain.kernel import KERNEL_EVENTS
from berthd.domain.node import NODE_EVENTS
from berthd.domain.session import SESSION_EVENTS

__all__ = ["EVENT_TYPES", "Command", "Event", "Meta", "registry_of"]

EVENT_TYPES = registry_of(*CONTAINER_EVENTS, *IMAGE_EVENTS, *NODE_EVENTS, *KERNEL_EVENTS, *SESSION_EVENTS)
"""Every event type berthd writes, by type name: the codec's registry."""
