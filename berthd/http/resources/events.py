"""/v1/events (the log, from a position) and /v1/audit (who did what, when)."""

from __future__ import annotations

import falcon

from berthd.domain.errors import Forbidden, ValidationError
from berthd.events.store import Recorded
from berthd.http.deps import Deps
from berthd.http.resources._common import context_of
from berthd.http.visibility import owner_of
from berthd.http.wire import query_int, send_json

__all__ = ["EventCollection", "AuditCollection"]


class EventCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = context_of(req)
        after = query_int(req, "after", 0, 0, 1 << 62)
        limit = query_int(req, "limit", 100, 1, 1000)
        types = tuple(t for t in (req.get_param_as_list("type") or []) if t)
        kind = req.get_param("kind")
        entity = req.get_param("entity")
        items: list[dict[str, object]] = []
        position = after
        head = self.deps.store.head()
        # scan forward until the page is full or the log ends, so filters never starve a page
        while len(items) < limit and position < head:
            batch = self.deps.store.read_all(after=position, limit=1000, types=types)
            if not batch:
                break
            for rec in batch:
                position = rec.position
                if (kind and rec.kind != kind) or (entity and rec.stream_id != entity):
                    continue
                if not ctx.is_admin and not self._visible(rec, ctx.owner):
                    continue
                items.append(rec.as_served())
                if len(items) >= limit:
                    break
        last = position if items and len(items) >= limit else max(position, head)
        send_json(resp, {"items": items, "last_position": last})

    def _visible(self, rec: Recorded, owner: str) -> bool:
        """A non-admin key sees the events of its own containers, kernels and sessions only."""
        return owner_of(self.deps, rec) == owner


class AuditCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not context_of(req).is_admin:
            raise Forbidden("the audit trail is for admin keys")
        limit = query_int(req, "limit", 100, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        since = req.get_param("since")
        if since is not None and not since[:4].isdigit():
            raise ValidationError("since is an RFC 3339 timestamp", field="since")
        rows, total = self.deps.audit.query(
            entity=req.get_param("entity"), since=since, principal=req.get_param("principal"),
            limit=limit, offset=offset)
        send_json(resp, {"items": [
            {"position": r.position, "timestamp": r.timestamp, "entity": {"kind": r.kind, "id": r.entity},
             "type": r.type, "principal": r.principal, "correlation_id": r.correlation_id,
             "request_id": r.request_id} for r in rows], "total": total, "limit": limit, "offset": offset})
