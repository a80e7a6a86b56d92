"""Token buckets and budgets, driven by a hand-moved clock: no sleeps."""

from __future__ import annotations

from berthd.http.ratelimit import Budget, RateLimiter, TokenBucket, budget_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_bursts_its_capacity_then_refuses_with_retry_after() -> None:
    bucket = TokenBucket(3, now=0.0)  # 3 per minute: one token every 20 s
    verdicts = [bucket.take(0.0) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts] == [2, 1, 0, 0]
    assert verdicts[0].limit == 3 and verdicts[0].reset == 20
    refused = verdicts[3]
    assert refused.retry_after == 20 and refused.reset == 60


def test_bucket_refills_at_capacity_per_minute_and_never_beyond() -> None:
    bucket = TokenBucket(60, now=0.0)  # one per second
    for _ in range(60):
        assert bucket.take(0.0).allowed
    assert not bucket.take(0.0).allowed
    assert not bucket.take(0.5).allowed
    later = bucket.take(1.0)  # one token back after a second
    assert later.allowed and later.remaining == 0
    full = bucket.take(3600.0)  # an hour later: full, not 3600 tokens
    assert full.allowed and full.remaining == 59 and full.reset == 1


def test_a_clock_going_backwards_takes_nothing_extra() -> None:
    bucket = TokenBucket(2, now=10.0)
    assert bucket.take(10.0).allowed and bucket.take(10.0).allowed
    assert not bucket.take(5.0).allowed


def allowed(limiter: RateLimiter, key: str, budget: Budget) -> bool:
    verdict = limiter.take(key, budget)
    assert verdict is not None
    return verdict.allowed


def test_limiter_keeps_budgets_and_keys_apart() -> None:
    clock = FakeClock()
    limits: dict[str, dict[Budget, int]] = {
        "k1": {"general": 2, "executions": 1, "sessions": 1},
        "k2": {"general": 1, "executions": 1, "sessions": 1},
    }
    limiter = RateLimiter(limits.get, clock=clock)
    assert allowed(limiter, "k1", "general")
    assert allowed(limiter, "k1", "general")
    assert not allowed(limiter, "k1", "general")
    assert allowed(limiter, "k1", "executions")  # its own budget
    assert allowed(limiter, "k2", "general")  # another key
    clock.now += 30.0  # half a minute: one general token back for k1
    assert allowed(limiter, "k1", "general")
    assert not allowed(limiter, "k1", "general")
    limiter.forget("k1")  # a revoked key's buckets go
    assert allowed(limiter, "k1", "general")


def test_unlimited_principals_get_no_verdict() -> None:
    limiter = RateLimiter(lambda key: {"general": 1, "executions": 1, "sessions": 1}, clock=FakeClock())
    assert limiter.take("admin", "general") is None  # the bootstrap admin key
    assert limiter.take("socket", "general") is None  # the unix socket
    assert RateLimiter(lambda key: None, clock=FakeClock()).take("k9", "general") is None


def test_budget_of_each_route() -> None:
    assert budget_of("POST", "/v1/containers/{id}/exec", {"id": "c"}) == "executions"
    assert budget_of("POST", "/v1/run", {}) == "executions"
    assert budget_of("POST", "/v1/kernels/{id}/{action}", {"action": "execute"}) == "executions"
    assert budget_of("POST", "/v1/kernels/{id}/{action}", {"action": "restart"}) == "general"
    assert budget_of("POST", "/v1/sessions/{id}/{action}", {"action": "execute_with_retry"}) == "executions"
    assert budget_of("POST", "/v1/sessions", {}) == "sessions"
    assert budget_of("GET", "/v1/sessions", {}) == "general"
    assert budget_of("POST", "/v1/containers", {}) == "general"
    assert budget_of("GET", None, {}) == "general"
