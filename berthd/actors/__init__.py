"""The behaviour: entity actors around the pure domain, and their supervisor."""

from berthd.actors.container import ContainerActor, ExecOutcome, map_runtime_error
from berthd.actors.context import (
    SYSTEM,
    Clock,
    CommandContext,
    Reply,
    new_id,
    rfc3339,
    system_clock,
)
from berthd.actors.image import ImageService
from berthd.actors.supervisor import Supervisor, append_retrying

__all__ = [
    "SYSTEM",
    "Clock",
    "CommandContext",
    "ContainerActor",
    "ExecOutcome",
    "ImageService",
    "Reply",
    "Supervisor",
    "append_retrying",
    "map_runtime_error",
    "new_id",
    "rfc3339",
    "system_clock",
]
