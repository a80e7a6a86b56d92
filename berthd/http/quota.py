"""Quotas: how many live containers, kernels and sessions one ``user`` key may hold.

Counted from the read models by owner (a container counts until it is ``removed`` or
``lost`` — an exited one still holds its disk; a kernel until ``destroyed``; a session
while ``active``), and the creates of one key
for one kind run one at a time: a create answers only once the projection has it
(read-your-writes), so the next one counts it. (Counting creates in flight next to the
read model instead counted a new entity twice between its projection and its answer.)
A kernel started without a container has a sandbox of its own, which counts as one of the
key's containers. Admin keys, the bootstrap key and the unix socket have no quotas.
Over quota: 403 ``QUOTA_EXCEEDED`` with ``details`` {resource, limit, in_use}; nothing is
appended to the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import falcon

from berthd.domain.errors import Busy, QuotaExceeded
from berthd.http.auth import Principal
from berthd.http.keypolicy import KeyPolicy, QuotaKind

__all__ = ["QuotaMiddleware", "CREATES"]

CREATES: dict[str, QuotaKind] = {"/v1/containers": "containers", "/v1/kernels": "kernels",
                                 "/v1/sessions": "sessions"}
"""The routes whose POST creates an entity, and the quota it counts against."""


class QuotaMiddleware:
    def __init__(self, policy: KeyPolicy, live: Callable[[str, QuotaKind], int],
                 wait: float = 120.0) -> None:
        self.policy = policy
        self.live = live  # (owner, kind) -> live entities of that owner, from the read models
        self.wait = wait  # longest a create waits for the same key's previous one
        self._lock = threading.Lock()
        self._turns: dict[tuple[str, QuotaKind], threading.Lock] = {}

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
            turn = self._turns.setdefault((owner, kind), threading.Lock())
        if not turn.acquire(timeout=self.wait):
            raise Busy(f"key {owner} has another {kind} create running for over {self.wait:.0f} s; retry")
        try:
            in_use = self.live(owner, kind)
            if in_use >= limit:
                req.context.quota_refused = True
                raise QuotaExceeded(
                    f"key {owner} already holds {in_use} live {kind}, its quota is {limit}: remove some "
                    "first, or ask an admin for a key with a larger quota",
                    resource=kind, limit=limit, in_use=in_use)
        except BaseException:
            turn.release()
            raise
        req.context.quota_held = turn

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        turn: threading.Lock | None = req.context.get("quota_held")
        if turn is not None:
            req.context.quota_held = None
            turn.release()
