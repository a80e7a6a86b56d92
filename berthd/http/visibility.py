"""Who owns an event: the one rule behind what a non-admin key sees of the log, shared by
``GET /v1/events`` and the events WebSocket so the two can never disagree."""

from __future__ import annotations

from berthd.events.store import Recorded
from berthd.http.deps import Deps

__all__ = ["owner_of"]


def owner_of(deps: Deps, rec: Recorded) -> str | None:
    """The owner of the entity ``rec`` belongs to: from its read model, or, for an entity the
    projections have not reached yet, from the event itself (creation events carry it)."""
    find = {"container": deps.containers.get, "kernel": deps.kernels_view.get,
            "session": deps.sessions_view.get}.get(rec.kind)
    if find is None:
        return None  # node-level events (keys, images, ...) belong to no key
    state = find(rec.stream_id)
    owner = state.owner if state is not None else getattr(rec.event, "owner", None)
    return owner if isinstance(owner, str) else None
