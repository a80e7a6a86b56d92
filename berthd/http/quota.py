"""Quotas: how many live containers, kernels and sessions one ``user`` key may hold.

Counted from the read models by owner (a container counts until it is ``removed`` or
``lost`` — an exited one still holds its disk; a kernel until ``destroyed``; a session
while ``active``), plus the creations
of that key still in flight, so concurrent creates cannot overshoot: a create answers only
once the projection has it (read-your-writes), and only then leaves the in-flight count.
A kernel started without a container has a sandbox of its own, which counts as one of the
key's containers. Admin keys, the bootstrap key and the unix socket have no quotas.
Over quota: 403 ``QUOTA_EXCEEDED`` with ``details`` {resource, limit, in_use}; nothing is
appended to the log.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import falcon

from berthd.domain.errors import QuotaExceeded
from berthd.http.auth import Principal
from berthd.http.keypolicy import KeyPolicy, QuotaKind

__all__ = ["QuotaMiddleware", "CREATES"]

CREATES: dict[str, QuotaKind] = {"/v1/containers": "containers", "/v1/kernels": "kernels",
                                 "/v1/sessions": "sessions"}
"""The routes whose POST creates an entity, and the quota it counts against."""


class QuotaMiddleware:
    def __init__(self, policy: KeyPolicy, live: Callable[[str, QuotaKind], int]) -> None:
        self.policy = policy
        self.live = live  # (owner, kind) -> live entities of that owner, from the read models
        self._lock = threading.Lock()
        self._in_flight: Counter[tuple[str, QuotaKind]] = Counter()

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        kind = CREATES.get(req.uri_template or "") if req.method == "POST" else None
        principal: Principal | None = req.context.get("principal")
        if kind is None or principal is None:
            return
        quotas = self.policy.quotas_of(principal.key_id)
        if quotas is None:
            return
        owner, limit = principal.key_id, quotas[kind]
        with self._lock:
            in_use = self.live(owner, kind) + self._in_flight[(owner, kind)]
            if in_use >= limit:
                req.context.quota_refused = True
                raise QuotaExceeded(
                    f"key {owner} already holds {in_use} live {kind}, its quota is {limit}: remove some "
                    "first, or ask an admin for a key with a larger quota",
                    resource=kind, limit=limit, in_use=in_use)
            self._in_flight[(owner, kind)] += 1
        req.context.quota_held = (owner, kind)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        held: tuple[str, QuotaKind] | None = req.context.get("quota_held")
        if held is None:
            return
        req.context.quota_held = None
        with self._lock:
            self._in_flight[held] -= 1
            if self._in_flight[held] <= 0:
                del self._in_flight[held]
