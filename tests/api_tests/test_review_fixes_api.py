"""Security review fixes, each through a real daemon on loopback (local runtime, image
"host"): image removal is admin only; a kernel's sandbox and a session's kernel count
against the key's quotas at create time; a full disk under an ``Idempotency-Key`` answers
503 ``STORE_UNAVAILABLE`` and keeps nothing; an accepted WebSocket handshake of a
rate-limited key carries the ``X-RateLimit-*`` headers."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.conftest import fill_disk
from tests.daemon_process import DaemonProcess

BOX = {"image": "host", "command": ["sleep", "300"]}
KERNEL = {"language": "bash", "image": "host"}
SESSION = {"language": "bash"}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    base = pathlib.Path(tmp_path_factory.mktemp("berthd"))
    config = base / "berthd.toml"
    config.write_text("[rate_limits]\ngeneral = 200\nexecutions = 50\nsessions = 20\n")
    daemon = DaemonProcess(base / "data", runtime="local", args=("--config", str(config))).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def make_key(d: DaemonProcess, name: str, role: str = "user", **body: Any) -> dict[str, str]:
    r = d.post("/v1/keys", {"name": name, "role": role, **body})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def call(d: DaemonProcess, method: str, path: str, key: dict[str, str], body: Any = None,
         **kw: Any) -> requests.Response:
    return requests.request(method, d.url(path), json=body, headers={**key, **kw.pop("headers", {})},
                            timeout=120, **kw)


def refused(r: requests.Response, resource: str) -> dict[str, Any]:
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "QUOTA_EXCEEDED" and error["details"]["resource"] == resource, error
    details: dict[str, Any] = error["details"]
    return details


def live_containers(d: DaemonProcess, key: dict[str, str]) -> list[dict[str, Any]]:
    r = call(d, "GET", "/v1/containers", key, params={"limit": 1000})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def clean_up(d: DaemonProcess, key: dict[str, str]) -> None:
    for s in call(d, "GET", "/v1/sessions", key).json()["items"]:
        call(d, "DELETE", f"/v1/sessions/{s['id']}", key)
    for k in call(d, "GET", "/v1/kernels", key).json()["items"]:
        call(d, "DELETE", f"/v1/kernels/{k['id']}", key)
    for c in live_containers(d, key):
        call(d, "DELETE", f"/v1/containers/{c['id']}?force=true", key)


# ---------------------------------------------------------------------- 1. images


def test_image_removal_is_admin_only_and_pull_stays_open(d: DaemonProcess) -> None:
    user = make_key(d, "image-user")
    r = call(d, "DELETE", "/v1/images/busybox:latest", user)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "FORBIDDEN"
    # the same code as the other admin-only endpoints
    assert call(d, "GET", "/v1/audit", user).json()["error"]["code"] == "FORBIDDEN"
    assert call(d, "DELETE", "/v1/images/host?force=true", user).status_code == 403
    # nothing was removed: the image is still listed
    assert any("host" in " ".join(i["tags"]) or i["id"] for i in d.get("/v1/images").json()["items"])
    pulled = call(d, "POST", "/v1/images/pull", user, {"ref": "host"})
    assert pulled.status_code == 200, pulled.text
    assert call(d, "GET", "/v1/images", user).status_code == 200
    # an admin key (not only the bootstrap one) gets past the check: the runtime answers
    admin = make_key(d, "image-admin", role="admin")
    assert call(d, "DELETE", "/v1/images/busybox:latest", admin).status_code == 404
    assert d.delete("/v1/images/busybox:latest").status_code == 404


# ---------------------------------------------------------------------- 2. quotas


def test_a_kernels_sandbox_needs_room_in_the_containers_quota(d: DaemonProcess) -> None:
    key = make_key(d, "kernel-sandboxes", quotas={"containers": 1, "kernels": 5, "sessions": 5})
    try:
        first = call(d, "POST", "/v1/kernels", key, KERNEL)
        assert first.status_code == 201, first.text
        # the review's repro: each further kernel would have brought one more sandbox
        for _ in range(3):
            assert refused(call(d, "POST", "/v1/kernels", key, KERNEL), "containers") == \
                {"resource": "containers", "limit": 1, "in_use": 1}
        refused(call(d, "POST", "/v1/containers", key, BOX), "containers")
        assert len(live_containers(d, key)) == 1
        # joining a container brings no sandbox: the containers quota does not refuse it
        box_id = live_containers(d, key)[0]["id"]
        joined = call(d, "POST", "/v1/kernels", key, {**KERNEL, "container": box_id})
        assert joined.status_code == 201, joined.text
        assert [c["id"] for c in live_containers(d, key)] == [box_id]
        # the sandbox is freed with its kernel
        assert call(d, "DELETE", f"/v1/kernels/{joined.json()['id']}", key).status_code == 200
        assert call(d, "DELETE", f"/v1/kernels/{first.json()['id']}", key).status_code == 200
        assert live_containers(d, key) == []
        again = call(d, "POST", "/v1/kernels", key, KERNEL)
        assert again.status_code == 201, again.text
    finally:
        clean_up(d, key)


def test_a_kernel_needs_room_in_the_kernels_quota_first(d: DaemonProcess) -> None:
    key = make_key(d, "no-kernels", quotas={"containers": 5, "kernels": 0, "sessions": 5})
    assert refused(call(d, "POST", "/v1/kernels", key, KERNEL), "kernels") == \
        {"resource": "kernels", "limit": 0, "in_use": 0}
    # a session opens a kernel: it needs room there too
    refused(call(d, "POST", "/v1/sessions", key, SESSION), "kernels")
    assert call(d, "GET", "/v1/sessions", key).json()["items"] == []


def test_a_session_needs_room_for_its_kernel_and_sandbox(d: DaemonProcess) -> None:
    key = make_key(d, "session-sandboxes", quotas={"containers": 1, "kernels": 5, "sessions": 5})
    try:
        box = call(d, "POST", "/v1/containers", key, BOX)
        assert box.status_code == 201, box.text
        refused(call(d, "POST", "/v1/sessions", key, SESSION), "containers")
        assert call(d, "DELETE", f"/v1/containers/{box.json()['id']}?force=true", key).status_code == 200

        s1 = call(d, "POST", "/v1/sessions", key, SESSION)
        assert s1.status_code == 201, s1.text
        sid = s1.json()["id"]
        # the session has no kernel yet, but holds the room for it: its kernel and sandbox
        # open on demand, and must not find the quota taken by then
        refused(call(d, "POST", "/v1/sessions", key, SESSION), "containers")
        refused(call(d, "POST", "/v1/containers", key, BOX), "containers")
        refused(call(d, "POST", "/v1/kernels", key, KERNEL), "containers")
        ran = call(d, "POST", f"/v1/sessions/{sid}/execute", key, {"code": "echo hi"})
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"] == "hi\n"
        assert len(live_containers(d, key)) == 1  # the session's sandbox
        refused(call(d, "POST", "/v1/containers", key, BOX), "containers")
        # a kernel destroyed from outside is opened again on demand: still held
        kernel_id = call(d, "GET", f"/v1/sessions/{sid}", key).json()["kernel_id"]
        assert call(d, "DELETE", f"/v1/kernels/{kernel_id}", key).status_code == 200
        assert live_containers(d, key) == []
        refused(call(d, "POST", "/v1/containers", key, BOX), "containers")
        ran = call(d, "POST", f"/v1/sessions/{sid}/execute", key, {"code": "echo again"})
        assert ran.status_code == 200, ran.text
        assert len(live_containers(d, key)) == 1
        # closing the session frees all three
        assert call(d, "DELETE", f"/v1/sessions/{sid}", key).status_code == 200
        assert live_containers(d, key) == []
        box = call(d, "POST", "/v1/containers", key, BOX)
        assert box.status_code == 201, box.text
    finally:
        clean_up(d, key)


def test_concurrent_mixed_creates_cannot_overshoot_the_containers_quota(d: DaemonProcess) -> None:
    key = make_key(d, "mixed-racer", quotas={"containers": 2, "kernels": 10, "sessions": 10})
    routes = [("/v1/containers", BOX), ("/v1/kernels", KERNEL), ("/v1/sessions", SESSION)] * 3
    try:
        with ThreadPoolExecutor(len(routes)) as pool:
            answers = list(pool.map(lambda rb: call(d, "POST", rb[0], key, rb[1]), routes))
        codes = sorted(r.status_code for r in answers)
        assert codes == [201, 201] + [403] * 7, [r.text for r in answers]
        for r in answers:
            if r.status_code == 403:
                assert r.json()["error"]["code"] == "QUOTA_EXCEEDED"
        sessions = call(d, "GET", "/v1/sessions", key).json()["items"]
        for s in sessions:  # open their kernels: still within the quota
            ran = call(d, "POST", f"/v1/sessions/{s['id']}/execute", key, {"code": "true"})
            assert ran.status_code == 200, ran.text
        assert len(live_containers(d, key)) == 2
    finally:
        clean_up(d, key)


# ---------------------------------------------------------------------- 3. disk full


def keyed(d: DaemonProcess, body: Any, idempotency_key: str) -> requests.Response:
    return call(d, "POST", "/v1/containers", d.headers, body, headers={"Idempotency-Key": idempotency_key})


def test_disk_full_with_an_idempotency_key_is_503_and_keeps_nothing(small_disk: pathlib.Path) -> None:
    d = DaemonProcess(small_disk / "data", runtime="local").start()
    body = {"image": "host", "command": ["sleep", "1"], "start": False}
    try:
        first = keyed(d, body, "before")
        assert first.status_code == 201, first.text
        fill_disk(small_disk / "filler")
        for i in range(10):
            r = keyed(d, body, f"full-{i}")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "STORE_UNAVAILABLE", r.text
        # a replay needs no writing: it still answers
        replay = keyed(d, body, "before")
        assert replay.status_code == 201 and replay.headers.get("Idempotent-Replayed") == "true"
        (small_disk / "filler").unlink()
        # nothing half-written was kept: the keys are free (no 409 IDEMPOTENCY_IN_PROGRESS)
        created = []
        for i in range(10):
            r = keyed(d, body, f"full-{i}")
            assert r.status_code == 201, r.text
            assert "Idempotent-Replayed" not in r.headers
            created.append(r.json()["id"])
        again = keyed(d, body, "full-0")
        assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
        assert again.json()["id"] == created[0]
        live = d.get("/v1/containers", params={"limit": 1000}).json()["items"]
        assert sorted(c["id"] for c in live) == sorted([first.json()["id"], *created])
    finally:
        d.stop()


# ---------------------------------------------------------------------- 4. WebSocket headers


def test_an_accepted_websocket_handshake_carries_the_rate_limit_headers(d: DaemonProcess) -> None:
    from websockets.sync.client import connect

    key = make_key(d, "ws-headers", rate_limit=5)
    http = call(d, "GET", "/v1/containers", key)
    assert (http.headers["X-RateLimit-Limit"], http.headers["X-RateLimit-Remaining"]) == ("5", "4")
    with connect(f"{d.ws}/v1/events", additional_headers=key) as ws:
        assert ws.response is not None and ws.response.status_code == 101
        headers = ws.response.headers
        assert headers["X-RateLimit-Limit"] == "5"
        assert headers["X-RateLimit-Remaining"] == "3"  # the same bucket as HTTP
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
        assert "Retry-After" not in headers
        assert len(headers.get_all("X-RateLimit-Limit")) == 1
    # a refusal after the token was taken (a bad query) carries them once too
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as bad:
        connect(f"{d.ws}/v1/events?after=nope", additional_headers=key)
    response = bad.value.response
    assert response.status_code == 400, response.body
    assert response.headers.get_all("X-RateLimit-Remaining") == ["2"]
    # the bootstrap admin key and unlimited keys get none
    with connect(f"{d.ws}/v1/events", additional_headers=d.headers) as ws:
        assert ws.response is not None and "X-RateLimit-Limit" not in ws.response.headers


def test_metrics_need_an_admin_key(d: DaemonProcess) -> None:
    # node-wide figures (every key's entities counted together): not for user keys
    user = make_key(d, "metrics-user")
    r = call(d, "GET", "/metrics", user)
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    assert requests.get(d.url("/metrics"), timeout=10).status_code == 401
    assert "berthd_log_position" in d.get("/metrics").text
    # probes stay open
    assert requests.get(d.url("/v1/health"), timeout=10).status_code == 200
    assert requests.get(d.url("/v1/ready"), timeout=10).status_code == 200
