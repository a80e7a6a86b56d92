"""/v1/keys: API keys, for admin keys only (a ``user`` key gets 403 ``FORBIDDEN``).

A key is ``berthd_`` + 43 random URL-safe characters. ``POST`` answers it once; the log
gets only its SHA-256 (``ApiKeyCreated``, with the creator as principal and the request's
correlation id), so ``GET`` lists keys without secrets. ``DELETE`` appends
``ApiKeyRevoked`` and answers once the keys view has it: from that answer on the key gets
401. The bootstrap admin key (id ``admin``) cannot be revoked through the API (409): it is
the operator's way back in.

What a ``user`` key sees: only what it created — containers, their exec and files, kernels,
sessions, results (404 for anyone else's, never 403), and on ``/v1/events`` the events of
its own containers, kernels and sessions; ``/v1/audit`` and ``/v1/keys`` are admin only.
"""

from __future__ import annotations

import secrets

import falcon
import msgspec

from berthd.actors import append_retrying, new_id, rfc3339
from berthd.domain import node as n
from berthd.domain.errors import Conflict, Forbidden, KeyNotFound, ValidationError
from berthd.events.readmodels import KeyRecord
from berthd.http.auth import hash_key
from berthd.http.deps import Deps
from berthd.http.keypolicy import quotas, rate_limits
from berthd.http.resources._common import context_of
from berthd.http.wire import decode_body, query_int, send_json

__all__ = ["KeyCollection", "KeyCreatedView", "KeyItem", "KeyList", "KeyView", "QuotasView", "RateLimitsView"]


class RateLimitsView(msgspec.Struct, kw_only=True):
    general: int
    executions: int
    sessions: int


class QuotasView(msgspec.Struct, kw_only=True):
    containers: int
    kernels: int
    sessions: int


class KeyView(msgspec.Struct, kw_only=True):
    """A key without its secret. ``rate_limit`` is the general budget per minute (API.md);
    ``rate_limits`` and ``quotas`` are what applies to it, defaults included; ``null`` for
    the bootstrap admin key, which is not limited. Admin keys have no quotas."""

    id: str
    name: str
    role: str
    rate_limit: int | None
    created_at: str
    revoked: bool = False
    revoked_at: str | None = None
    rate_limits: RateLimitsView | None = None
    quotas: QuotasView | None = None


class KeyCreatedView(KeyView, kw_only=True):
    key: str  # the secret: in this answer only


class KeyList(msgspec.Struct):
    items: list[KeyView]
    total: int
    limit: int
    offset: int


def _admin_only(req: falcon.Request) -> None:
    if not context_of(req).is_admin:
        raise Forbidden("managing API keys needs an admin key")


def key_view(deps: Deps, r: KeyRecord) -> KeyView:
    bootstrap = r.key_id == "admin"
    limits = None if bootstrap else RateLimitsView(**rate_limits(r, deps.key_defaults))
    quota = None if bootstrap or r.role == "admin" else QuotasView(**quotas(r, deps.key_defaults))
    return KeyView(id=r.key_id, name=r.name, role=r.role, rate_limit=limits.general if limits else None,
                   created_at=r.created_at, revoked=r.revoked, revoked_at=r.revoked_at, rate_limits=limits,
                   quotas=quota)


class KeyCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _admin_only(req)
        deps = self.deps
        cmd = decode_body(req, n.CreateApiKey, deps.limits.max_body_bytes)
        limits = cmd.rate_limits or n.KeyRateLimits()
        if cmd.rate_limit is not None and limits.general is not None and limits.general != cmd.rate_limit:
            raise ValidationError("rate_limit and rate_limits.general disagree; give one", field="rate_limit")
        if deps.keys.name_taken(cmd.name):
            raise Conflict(f"a live key is already named '{cmd.name}'; pick another name", name=cmd.name)
        quota = cmd.quotas or n.KeyQuotas()
        key_id, secret = new_id(), "berthd_" + secrets.token_urlsafe(32)
        event = n.ApiKeyCreated(
            key_id=key_id, name=cmd.name, role=cmd.role, key_hash=hash_key(secret),
            rate_limit=cmd.rate_limit or limits.general, created_at=rfc3339(deps.clock()),
            executions_rate_limit=limits.executions, sessions_rate_limit=limits.sessions,
            max_containers=quota.containers, max_kernels=quota.kernels, max_sessions=quota.sessions,
        )
        position = append_retrying(deps.store, f"key-{key_id}", [event],
                                   context_of(req).meta(deps.clock, deps.node_id))
        deps.runner.wait_for(position, deps.limits.read_your_writes_timeout)  # the key works on return
        record = deps.keys.get(key_id) or KeyRecord(
            key_id, event.name, event.role, event.key_hash, event.rate_limit, event.created_at,
            executions_rate_limit=event.executions_rate_limit, sessions_rate_limit=event.sessions_rate_limit,
            max_containers=event.max_containers, max_kernels=event.max_kernels, max_sessions=event.max_sessions)
        send_json(resp, KeyCreatedView(**msgspec.structs.asdict(key_view(deps, record)), key=secret), falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _admin_only(req)
        limit = query_int(req, "limit", 50, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        revoked = req.get_param_as_bool("revoked", default=False)
        rows = [r for r in self.deps.keys.all() if revoked or not r.revoked]
        rows.sort(key=lambda r: (r.created_at, r.key_id))
        page = rows[offset:offset + limit]
        send_json(resp, KeyList([key_view(self.deps, r) for r in page], len(rows), limit, offset))


class KeyItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def _find(self, id: str) -> KeyRecord:
        record = self.deps.keys.get(id)
        if record is None:
            raise KeyNotFound(f"no key '{id}'", id=id)
        return record

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        _admin_only(req)
        send_json(resp, key_view(self.deps, self._find(id)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        _admin_only(req)
        deps = self.deps
        record = self._find(id)
        if record.key_id == "admin":
            raise Conflict("the bootstrap admin key cannot be revoked through the API: it is the "
                           "operator's way in (keep DATA_DIR/admin.key private, or set BERTHD_ADMIN_KEY)", id=id)
        if not record.revoked:
            position = append_retrying(deps.store, f"key-{record.key_id}", [n.ApiKeyRevoked(key_id=record.key_id)],
                                       context_of(req).meta(deps.clock, deps.node_id))
            deps.runner.wait_for(position, deps.limits.read_your_writes_timeout)
            if deps.rate_limiter is not None:
                deps.rate_limiter.forget(record.key_id)
        send_json(resp, key_view(deps, deps.keys.get(record.key_id) or record))
