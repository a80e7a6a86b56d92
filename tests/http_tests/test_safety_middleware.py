"""The safety middleware chain in process (falcon.testing), one layer: rate limits on a
hand-moved clock, Idempotency-Key around failing and succeeding resources, quotas and
If-Match against plain read-model stand-ins."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import falcon
import falcon.testing
import pytest

from berthd.domain.errors import Conflict
from berthd.http.auth import Principal
from berthd.http.errors import register_error_handlers
from berthd.http.idempotency import IdempotencyMiddleware, IdempotencyStore
from berthd.http.precondition import IfMatchMiddleware, Versioned, set_etag
from berthd.http.quota import QuotaMiddleware
from berthd.http.ratelimit import Budget, RateLimiter, RateLimitMiddleware
from berthd.http.wire import read_body


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class AsKey:
    """Stands in for AuthMiddleware: the principal comes from a test header."""

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        req.context.principal = Principal(key_id=req.get_header("X-Test-Key") or "k1", role="user")


@dataclass
class Box:
    owner: str
    version: int


class Boxes:
    """POST creates (fails once on demand), GET shows one with its ETag."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = False
        self.boxes = {"b1": Box("k1", 3)}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.calls += 1
        body = read_body(req, 1 << 20)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        if body == b"conflict":
            raise Conflict("name taken")
        resp.status = falcon.HTTP_201
        resp.set_header("Location", f"/boxes/{self.calls}")
        resp.set_header("ETag", '"1"')
        resp.data = b'{"n": %d}' % self.calls

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        set_etag(resp, self.boxes[id])
        resp.media = {"id": id}

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        self.boxes[id].version += 1
        resp.media = {"deleted": id}


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Any:
    clock = Clock()
    limits: dict[str, dict[Budget, int]] = {"k1": {"general": 100, "executions": 100, "sessions": 100},
                                            "slow": {"general": 2, "executions": 1, "sessions": 1}}
    limiter = RateLimiter(limits.get, clock=clock)
    store = IdempotencyStore(str(tmp_path / "idem.db"), lambda: datetime(2026, 1, 1, tzinfo=UTC))
    live: dict[tuple[str, str], int] = {}

    class Policy:
        def quotas_of(self, key_id: str) -> dict[str, int] | None:
            return {"containers": 1, "kernels": 1, "sessions": 1}

    boxes = Boxes()
    finders: dict[str, Any] = {"/boxes/{id}": lambda id: boxes.boxes.get(id)}
    app = falcon.App(middleware=[
        AsKey(), RateLimitMiddleware(limiter), IdempotencyMiddleware(store, 1 << 20),
        QuotaMiddleware(Policy(), lambda owner, kind: live.get((owner, kind), 0)),  # type: ignore[arg-type]
        IfMatchMiddleware(finders),
    ])
    register_error_handlers(app)
    app.add_route("/boxes", boxes)
    app.add_route("/boxes/{id}", boxes)
    app.add_route("/v1/containers", boxes)
    client = falcon.testing.TestClient(app)
    yield client, clock, boxes, live
    store.close()


def test_a_5xx_frees_the_key_and_an_answer_is_replayed_with_its_headers(env: Any) -> None:
    client, _, boxes, _ = env
    boxes.fail_next = True
    failed = client.simulate_post("/boxes", body=b"x", headers={"Idempotency-Key": "k"})
    assert failed.status_code == 500
    ok = client.simulate_post("/boxes", body=b"x", headers={"Idempotency-Key": "k"})
    assert ok.status_code == 201 and boxes.calls == 2
    again = client.simulate_post("/boxes", body=b"x", headers={"Idempotency-Key": "k"})
    assert again.status_code == 201 and again.content == ok.content and boxes.calls == 2
    assert again.headers["Location"] == ok.headers["Location"] and again.headers["ETag"] == '"1"'
    assert again.headers["Idempotent-Replayed"] == "true"
    # a 4xx is an answer: replayed, not run again
    first = client.simulate_post("/boxes", body=b"conflict", headers={"Idempotency-Key": "c"})
    assert first.status_code == 409 and first.json["error"]["code"] == "CONFLICT"
    assert client.simulate_post("/boxes", body=b"conflict", headers={"Idempotency-Key": "c"}).content == first.content
    assert boxes.calls == 3
    # without the header nothing is kept
    client.simulate_post("/boxes", body=b"x")
    client.simulate_post("/boxes", body=b"x")
    assert boxes.calls == 5


def test_rate_limit_refills_on_the_clock(env: Any) -> None:
    client, clock, _, _ = env
    slow = {"X-Test-Key": "slow"}
    assert [client.simulate_get("/boxes/b1", headers=slow).status_code for _ in range(3)] == [200, 200, 429]
    refused = client.simulate_get("/boxes/b1", headers=slow)
    assert refused.headers["Retry-After"] == "30" and refused.json["error"]["code"] == "RATE_LIMITED"
    clock.now += 30.0
    again = client.simulate_get("/boxes/b1", headers=slow)
    assert again.status_code == 200 and again.headers["X-RateLimit-Remaining"] == "0"
    assert client.simulate_get("/boxes/b1").headers["X-RateLimit-Limit"] == "100"  # another key


def test_quota_counts_live_and_in_flight(env: Any) -> None:
    client, _, _, live = env
    assert client.simulate_post("/v1/containers", body=b"x").status_code == 201
    live[("k1", "containers")] = 1  # the read model now has it
    over = client.simulate_post("/v1/containers", body=b"x")
    assert over.status_code == 403 and over.json["error"]["details"] == {
        "resource": "containers", "limit": 1, "in_use": 1}
    # a quota refusal is not kept against the Idempotency-Key: it may pass once room is made
    assert client.simulate_post("/v1/containers", body=b"y", headers={"Idempotency-Key": "q"}).status_code == 403
    live[("k1", "containers")] = 0
    assert client.simulate_post("/v1/containers", body=b"y", headers={"Idempotency-Key": "q"}).status_code == 201


def test_if_match(env: Any) -> None:
    client, _clock, boxes, _live = env
    etag = client.simulate_get("/boxes/b1").headers["ETag"]
    assert etag == '"3"'
    stale = client.simulate_delete("/boxes/b1", headers={"If-Match": '"2"'})
    assert stale.status_code == 412 and stale.json["error"]["details"]["etag"] == '"3"'
    assert client.simulate_delete("/boxes/b1", headers={"If-Match": etag}).status_code == 200
    assert client.simulate_delete("/boxes/b1", headers={"If-Match": etag}).status_code == 412
    boxes.boxes["b2"] = Box("someone-else", 1)
    assert client.simulate_delete("/boxes/b2", headers={"If-Match": '"9"'}).status_code == 200  # left to the resource
    versioned: Versioned = boxes.boxes["b1"]  # what IfMatchMiddleware reads
    assert versioned.version == 4
