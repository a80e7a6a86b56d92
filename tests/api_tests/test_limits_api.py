"""Rate limits and quotas through a real daemon on loopback, with defaults from a config
file: token buckets per key and budget, the X-RateLimit-* headers, 429 with Retry-After,
403 QUOTA_EXCEEDED counted from the read models. No sleeps: budgets are per minute and
each test spends them within a few requests."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.daemon_process import DaemonProcess

BOX = {"image": "host", "command": ["sleep", "300"]}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    base = pathlib.Path(tmp_path_factory.mktemp("berthd"))
    config = base / "berthd.toml"
    config.write_text("[rate_limits]\ngeneral = 30\nexecutions = 5\nsessions = 3\n\n"
                      "[quotas]\ncontainers = 4\nkernels = 2\nsessions = 2\n")
    daemon = DaemonProcess(base / "data", runtime="local", args=("--config", str(config))).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def make_key(d: DaemonProcess, name: str, **body: Any) -> dict[str, str]:
    r = d.post("/v1/keys", {"name": name, "role": "user", **body})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def call(d: DaemonProcess, method: str, path: str, key: dict[str, str], body: Any = None) -> requests.Response:
    return requests.request(method, d.url(path), json=body, headers=key, timeout=120)


def test_general_budget_headers_and_429(d: DaemonProcess) -> None:
    key = make_key(d, "three-a-minute", rate_limit=3)
    seen = []
    for path in ("/v1/containers", "/v1/containers/nope", "/v1/containers?limit=0"):  # 200, 404, 400
        r = call(d, "GET", path, key)
        seen.append((r.status_code, r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]))
        assert 0 < int(r.headers["X-RateLimit-Reset"]) <= 60
    assert seen == [(200, "3", "2"), (404, "3", "1"), (400, "3", "0")]
    refused = call(d, "GET", "/v1/containers", key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20  # one token comes back every 20 s
    assert refused.headers["X-RateLimit-Remaining"] == "0" and refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.json()["error"]["details"]["budget"] == "general"
    # a refusal costs a token too: the budget counts requests, not successes
    assert call(d, "GET", "/v1/containers/nope", key).status_code == 429
    # a path with no route answers 404, and still shows (and spends) the budget
    nowhere = call(d, "GET", "/v1/nowhere", key)
    assert nowhere.status_code == 404 and nowhere.headers["X-RateLimit-Remaining"] == "0"


def test_budgets_are_separate(d: DaemonProcess) -> None:
    key = make_key(d, "separate", rate_limit=2, rate_limits={"executions": 2, "sessions": 1})
    box = call(d, "POST", "/v1/containers", key, BOX)
    assert box.status_code == 201, box.text
    cid = box.json()["id"]
    assert call(d, "GET", f"/v1/containers/{cid}", key).status_code == 200
    assert call(d, "GET", f"/v1/containers/{cid}", key).status_code == 429  # general spent
    ran = [call(d, "POST", f"/v1/containers/{cid}/exec", key, {"command": ["true"]}) for _ in range(3)]
    assert [r.status_code for r in ran] == [200, 200, 429]
    assert ran[0].headers["X-RateLimit-Limit"] == "2" and ran[2].json()["error"]["details"]["budget"] == "executions"
    opened = [call(d, "POST", "/v1/sessions", key, {"language": "bash"}) for _ in range(2)]
    assert [r.status_code for r in opened] == [201, 429], opened[0].text
    assert opened[1].json()["error"]["details"]["budget"] == "sessions"
    d.delete(f"/v1/sessions/{opened[0].json()['id']}")
    d.delete(f"/v1/containers/{cid}", params={"force": "true"})


def test_config_defaults_and_the_unlimited_bootstrap_key(d: DaemonProcess) -> None:
    key = make_key(d, "defaults")
    r = call(d, "GET", "/v1/containers", key)
    assert r.headers["X-RateLimit-Limit"] == "30"
    listed = {k["name"]: k for k in d.get("/v1/keys").json()["items"]}
    assert listed["defaults"]["rate_limits"] == {"general": 30, "executions": 5, "sessions": 3}
    assert listed["defaults"]["quotas"] == {"containers": 4, "kernels": 2, "sessions": 2}
    admin = d.get("/v1/containers")
    assert admin.status_code == 200 and "X-RateLimit-Limit" not in admin.headers
    for _ in range(40):  # more than any default budget
        assert d.get("/v1/health").status_code == 200
        assert d.get("/v1/info").status_code == 200


def test_container_and_session_quotas(d: DaemonProcess) -> None:
    key = make_key(d, "small-quota", quotas={"containers": 1, "sessions": 1, "kernels": 0})
    first = call(d, "POST", "/v1/containers", key, BOX)
    assert first.status_code == 201, first.text
    second = call(d, "POST", "/v1/containers", key, BOX)
    assert second.status_code == 403 and second.json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert second.json()["error"]["details"] == {"resource": "containers", "limit": 1, "in_use": 1}
    # an exited container still counts; a removed one does not
    assert call(d, "POST", f"/v1/containers/{first.json()['id']}/stop", key, {"timeout": 1}).status_code == 200
    assert call(d, "POST", "/v1/containers", key, BOX).status_code == 403
    assert call(d, "DELETE", f"/v1/containers/{first.json()['id']}?force=true", key).status_code == 200
    third = call(d, "POST", "/v1/containers", key, BOX)
    assert third.status_code == 201
    call(d, "DELETE", f"/v1/containers/{third.json()['id']}?force=true", key)

    kernel = call(d, "POST", "/v1/kernels", key, {"language": "bash", "image": "host"})
    assert kernel.status_code == 403 and kernel.json()["error"]["details"]["resource"] == "kernels"
    # a session opens a kernel (with its sandbox): no room for a kernel, no session
    refused = call(d, "POST", "/v1/sessions", key, {"language": "bash"})
    assert refused.status_code == 403 and refused.json()["error"]["details"]["resource"] == "kernels"
    key = make_key(d, "small-session-quota", quotas={"containers": 1, "sessions": 1, "kernels": 1})
    s1 = call(d, "POST", "/v1/sessions", key, {"language": "bash"})
    assert s1.status_code == 201
    assert call(d, "POST", "/v1/sessions", key, {"language": "bash"}).json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert call(d, "DELETE", f"/v1/sessions/{s1.json()['id']}", key).status_code == 200
    s2 = call(d, "POST", "/v1/sessions", key, {"language": "bash"})
    assert s2.status_code == 201
    call(d, "DELETE", f"/v1/sessions/{s2.json()['id']}", key)
    # quotas are per key: the admin is not held by this key's count
    theirs = d.post("/v1/containers", BOX)
    assert theirs.status_code == 201
    d.delete(f"/v1/containers/{theirs.json()['id']}", params={"force": "true"})


def test_concurrent_creates_cannot_overshoot_a_quota(d: DaemonProcess) -> None:
    key = make_key(d, "racer", quotas={"containers": 2})
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: call(d, "POST", "/v1/containers", key, BOX), range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201, 201, 403, 403, 403, 403], [r.text for r in answers]
    live = call(d, "GET", "/v1/containers", key).json()["items"]
    assert len(live) == 2
    for c in live:
        call(d, "DELETE", f"/v1/containers/{c['id']}?force=true", key)


def test_websocket_connections_spend_the_same_budgets(d: DaemonProcess) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    key = make_key(d, "ws-two-a-minute", rate_limit=2)
    for _ in range(2):
        with connect(f"{d.ws}/v1/events", additional_headers=key):
            pass
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{d.ws}/v1/events", additional_headers=key)
    response = refused.value.response
    assert response.status_code == 429
    assert response.headers["X-RateLimit-Limit"] == "2" and response.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert b"RATE_LIMITED" in response.body
    # the HTTP API and the WebSocket draw from one bucket
    assert call(d, "GET", "/v1/containers", key).status_code == 429
