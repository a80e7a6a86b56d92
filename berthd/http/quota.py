"""Quotas: how many live containers, kernels and sessions one ``user`` key may hold.

Counted from the read models by owner (a container counts until it is ``removed`` or
``lost`` — an exited one still holds its disk; a kernel until ``destroyed``; a session
while ``active``), and the creates of one key
for one kind run one at a time: a create answers only once the projection has it
(read-your-writes), so the next one counts it. (Counting creates in flight next to the
read model instead counted a new entity twice between its projection and its answer.)

A create needs room in every quota the entities it brings count against:

- ``POST /v1/containers``: containers;
- ``POST /v1/kernels`` without ``container``: kernels and containers (the kernel gets a
  sandbox container of its own, which counts as one of the key's containers); with
  ``container`` (joining one of the key's containers): kernels only;
- ``POST /v1/sessions``: sessions, kernels and containers (a session opens one kernel with
  its sandbox on demand, at its first execution, and again if that kernel goes away).

So that an on-demand open cannot overshoot either, an active session that holds no live
kernel (not opened yet, or destroyed from outside) counts as one kernel and one container
of its key, and a kernel whose sandbox is not on the containers view yet (it is being
created) counts as one container. While a session opens its kernel, that kernel and its
sandbox may be counted twice for a moment: a create racing the open can be refused, never
let past the quota. A create takes the turns of every kind it counts against (in one
order, so two creates never wait on each other).

Admin keys, the bootstrap key and the unix socket have no quotas.
Over quota: 403 ``QUOTA_EXCEEDED`` with ``details`` {resource, limit, in_use} naming the
first quota without room (in the order sessions, kernels, containers); nothing is appended
to the log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import falcon
import msgspec

from berthd.domain import container as c
from berthd.domain import kernel as kd
from berthd.domain.errors import Busy, QuotaExceeded
from berthd.http.auth import Principal
from berthd.http.keypolicy import KeyPolicy, QuotaKind
from berthd.http.wire import read_body

if TYPE_CHECKING:
    from berthd.http.deps import Deps

__all__ = ["QuotaMiddleware", "CREATES", "kinds_of", "reserved"]

CREATES: dict[str, QuotaKind] = {"/v1/containers": "containers", "/v1/kernels": "kernels",
                                 "/v1/sessions": "sessions"}
"""The routes whose POST creates an entity, and the quota that entity counts against."""

_ORDER: tuple[QuotaKind, ...] = ("sessions", "kernels", "containers")
"""The order quotas are checked and turns taken in (one order for all: no deadlock)."""

_DEFAULT_MAX_BODY = 16 << 20

Reserved = Callable[[str], dict[QuotaKind, int]]
"""owner -> entities of each kind that the owner's live entities will still bring."""


class _Probe(msgspec.Struct):
    """What the quota check needs from a ``POST /v1/kernels`` body."""

    container: Any = None


def kinds_of(uri_template: str, body: bytes | None = None) -> tuple[QuotaKind, ...]:
    """The quotas a POST to ``uri_template`` (with this body, for kernels) needs room in."""
    kind = CREATES.get(uri_template)
    if kind == "sessions":
        return _ORDER
    if kind == "kernels":
        try:
            probe = msgspec.json.decode(body or b"{}", type=_Probe)
        except msgspec.MsgspecError:  # not ours to refuse: the resource answers 400
            return ("kernels", "containers")
        return ("kernels",) if probe.container is not None else ("kernels", "containers")
    return (kind,) if kind is not None else ()


def reserved(deps: Deps, owner: str) -> dict[QuotaKind, int]:
    """What the owner's live entities will still bring, not on the read models yet: a
    kernel and its sandbox for each active session without a live kernel, a sandbox for
    each live kernel whose own container is not on the containers view yet."""
    sessions_waiting = 0
    for s in deps.sessions_view.active():
        if s.owner != owner:
            continue
        kernel = deps.kernels_view.get(s.kernel_id) if s.kernel_id else None
        if kernel is None or kernel.status in kd.FINAL:
            sessions_waiting += 1
    sandboxes_coming = 0
    for kernel in deps.kernels_view.all():
        # a dead kernel's sandbox is not coming any more (it is on the view, or never will be)
        if kernel.owner == owner and kernel.own_container and kernel.status not in kd.FINAL \
                and kernel.status != "dead":
            box: c.ContainerState | None = deps.containers.get(kernel.container_id)
            if box is None:
                sandboxes_coming += 1
    return {"kernels": sessions_waiting, "containers": sessions_waiting + sandboxes_coming}


class QuotaMiddleware:
    def __init__(self, policy: KeyPolicy, live: Callable[[str, QuotaKind], int],
                 wait: float = 120.0, reserved: Reserved | None = None,
                 max_body_bytes: int | None = None) -> None:
        self.policy = policy
        self.live = live  # (owner, kind) -> live entities of that owner, from the read models
        self.wait = wait  # longest a create waits for the same key's previous one
        # owner -> what its live entities will still bring; None: from the resource's deps
        self.reserved = reserved
        self.max_body_bytes = max_body_bytes  # None: the resource's deps.limits
        self._lock = threading.Lock()
        self._turns: dict[tuple[str, QuotaKind], threading.Lock] = {}

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        template = req.uri_template or ""
        principal: Principal | None = req.context.get("principal")
        if req.method != "POST" or template not in CREATES or principal is None:
            return
        quotas = self.policy.quotas_of(principal.key_id)
        if quotas is None:
            return
        deps: Deps | None = getattr(resource, "deps", None)
        body = None
        if CREATES[template] == "kernels":  # with or without a container of its own?
            max_body = self.max_body_bytes or (deps.limits.max_body_bytes if deps is not None
                                               else _DEFAULT_MAX_BODY)
            body = read_body(req, max_body)
            req.context.raw_body = body  # the resource decodes the same bytes
        kinds = kinds_of(template, body)
        owner = principal.key_id
        turns = self._take_turns(owner, kinds)
        try:
            extra = self._reserved(owner, deps)
            for kind in kinds:
                limit = quotas[kind]
                in_use = self.live(owner, kind) + extra.get(kind, 0)
                if in_use >= limit:
                    req.context.quota_refused = True
                    raise QuotaExceeded(
                        f"key {owner} already holds {in_use} live {kind}, its quota is {limit}"
                        f"{_why(template, kind)}: remove some first, or ask an admin for a key "
                        "with a larger quota",
                        resource=kind, limit=limit, in_use=in_use)
        except BaseException:
            _release(turns)
            raise
        req.context.quota_held = turns

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        turns: list[threading.Lock] | None = req.context.get("quota_held")
        if turns is not None:
            req.context.quota_held = None
            _release(turns)

    def _reserved(self, owner: str, deps: Deps | None) -> dict[QuotaKind, int]:
        if self.reserved is not None:
            return self.reserved(owner)
        return reserved(deps, owner) if deps is not None else {}

    def _take_turns(self, owner: str, kinds: tuple[QuotaKind, ...]) -> list[threading.Lock]:
        """The turns of ``kinds`` for this key, in ``_ORDER``; 503 ``BUSY`` past ``wait``."""
        held: list[threading.Lock] = []
        deadline = time.monotonic() + self.wait
        for kind in _ORDER:
            if kind not in kinds:
                continue
            with self._lock:
                turn = self._turns.setdefault((owner, kind), threading.Lock())
            if not turn.acquire(timeout=max(0.0, deadline - time.monotonic())):
                _release(held)
                raise Busy(f"key {owner} has another create counting against its {kind} quota running "
                           f"for over {self.wait:.0f} s; retry")
            held.append(turn)
        return held


def _release(turns: list[threading.Lock]) -> None:
    for turn in reversed(turns):
        turn.release()


def _why(template: str, kind: QuotaKind) -> str:
    if template == "/v1/kernels" and kind == "containers":
        return " (a kernel without 'container' gets a sandbox container of its own)"
    if template == "/v1/sessions" and kind != "sessions":
        return " (a session opens a kernel with a sandbox container of its own)"
    return ""
