"""Per-key rate limits: one token bucket per key and budget.

Three budgets, each request drawing one token from exactly one of them: ``executions``
(container exec, kernel and session execute, ``/v1/run``), ``sessions`` (opening a session)
and ``general`` (everything else). A bucket holds ``limit`` tokens and refills at
``limit`` per minute, so a key may burst its whole minute at once and then goes at the
refill rate.

Who is limited: every key made through ``POST /v1/keys`` (either role), with its own limits
or the configured defaults. Not limited: the unix socket and the bootstrap admin key
(``admin.key`` / ``BERTHD_ADMIN_KEY``, key id ``admin``) — the operator's way in must stay
open to revoke a key that floods the daemon. Buckets live in memory: a restart refills them.

Headers on every response to a limited key: ``X-RateLimit-Limit`` (the budget per minute),
``X-RateLimit-Remaining`` (whole tokens left), ``X-RateLimit-Reset`` (seconds until the
bucket is full again). A refusal is 429 ``RATE_LIMITED`` with ``Retry-After`` (seconds
until one token is back). The clock is injected: tests drive it by hand.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import falcon

from berthd.domain.errors import RateLimited
from berthd.http.auth import Authenticator, Principal

__all__ = ["Budget", "BUDGETS", "RateLimiter", "RateLimitMiddleware", "TokenBucket", "Verdict", "budget_of", "limit_headers", "refusal",
           "UNLIMITED_KEYS"]

Budget = Literal["general", "executions", "sessions"]
BUDGETS: tuple[Budget, ...] = ("general", "executions", "sessions")
UNLIMITED_KEYS = frozenset({"admin", "socket"})
"""Key ids never limited: the bootstrap admin key and the unix socket."""

Monotonic = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full
    retry_after: int  # seconds until one token is back (0 when allowed)


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``capacity`` per ``period`` seconds."""

    def __init__(self, capacity: int, now: float, period: float = 60.0) -> None:
        self.capacity = capacity
        self.rate = capacity / period  # tokens per second
        self.tokens = float(capacity)
        self.stamp = now

    def take(self, now: float) -> Verdict:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(float(self.capacity), self.tokens + elapsed * self.rate)
        self.stamp = now
        allowed = self.tokens >= 1.0
        if allowed:
            self.tokens -= 1.0
        missing = self.capacity - self.tokens
        return Verdict(
            allowed=allowed, limit=self.capacity, remaining=int(self.tokens),
            reset=math.ceil(missing / self.rate) if missing > 1e-9 else 0,
            retry_after=0 if allowed else max(1, math.ceil((1.0 - self.tokens) / self.rate)),
        )


class RateLimiter:
    """Buckets by (key id, budget). ``limits_of(key_id)`` gives the key's per-minute limits,
    or None for a key that is not limited."""

    def __init__(self, limits_of: Callable[[str], dict[Budget, int] | None],
                 clock: Monotonic = time.monotonic) -> None:
        self.limits_of = limits_of
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, Budget], TokenBucket] = {}

    def take(self, key_id: str, budget: Budget) -> Verdict | None:
        if key_id in UNLIMITED_KEYS:
            return None
        limits = self.limits_of(key_id)
        if limits is None:
            return None
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get((key_id, budget))
            if bucket is None or bucket.capacity != limits[budget]:
                bucket = self._buckets[(key_id, budget)] = TokenBucket(limits[budget], now)
            return bucket.take(now)

    def forget(self, key_id: str) -> None:
        """Drop a revoked key's buckets."""
        with self._lock:
            for budget in BUDGETS:
                self._buckets.pop((key_id, budget), None)


_EXECUTE_ACTIONS = {
    "/v1/kernels/{id}/{action}": ("execute",),
    "/v1/sessions/{id}/{action}": ("execute", "execute_with_retry"),
}


def budget_of(method: str, uri_template: str | None, params: dict[str, Any]) -> Budget:
    """Which budget a request draws from."""
    if method != "POST" or not uri_template:
        return "general"
    if uri_template in ("/v1/containers/{id}/exec", "/v1/run"):
        return "executions"
    if params.get("action") in _EXECUTE_ACTIONS.get(uri_template, ()):
        return "executions"
    if uri_template == "/v1/sessions":
        return "sessions"
    return "general"


class RateLimitMiddleware:
    """After auth: take a token for the key, set the headers, refuse with 429 when empty.
    A request to no route at all (404 before any resource, so before auth) still costs a
    general token of the key it carries, and carries the headers."""

    def __init__(self, limiter: RateLimiter, auth: Authenticator | None = None) -> None:
        self.limiter = limiter
        self.auth = auth

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        if resource is not None or self.auth is None:
            return
        principal = self.auth.verify(self.auth.secret_from_headers(
            req.get_header("Authorization"), req.get_header("X-API-Key")))
        verdict = self.limiter.take(principal.key_id, "general") if principal is not None else None
        if verdict is not None:
            _set_headers(resp, verdict)

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        principal: Principal | None = req.context.get("principal")
        if principal is None:
            return
        budget = budget_of(req.method, req.uri_template, params)
        verdict = self.limiter.take(principal.key_id, budget)
        if verdict is None:
            return
        _set_headers(resp, verdict)
        if not verdict.allowed:
            raise refusal(principal.key_id, budget, verdict)


def refusal(key_id: str, budget: Budget, verdict: Verdict) -> RateLimited:
    """The 429 for a key over its budget (HTTP and the WebSocket handshake alike)."""
    return RateLimited(
        f"key {key_id} is over its {budget} budget of {verdict.limit} requests per "
        f"minute; retry in {verdict.retry_after} s", budget=budget, limit=verdict.limit,
        retry_after=verdict.retry_after)


def limit_headers(verdict: Verdict) -> list[tuple[str, str]]:
    """``X-RateLimit-*`` (and ``Retry-After`` on a refusal) as header pairs."""
    pairs = [("X-RateLimit-Limit", str(verdict.limit)), ("X-RateLimit-Remaining", str(verdict.remaining)),
             ("X-RateLimit-Reset", str(verdict.reset))]
    if not verdict.allowed:
        pairs.append(("Retry-After", str(verdict.retry_after)))
    return pairs


def _set_headers(resp: falcon.Response, verdict: Verdict) -> None:
    for name, value in limit_headers(verdict):
        resp.set_header(name, value)
