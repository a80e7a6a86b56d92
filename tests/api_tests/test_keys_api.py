"""API keys through a real daemon on loopback: made by admins only, shown once, stored
hashed, revoked at once; a user key sees only what it created; the audit names who."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import requests
from websockets.sync.client import connect

from tests.daemon_process import DaemonProcess


def make_key(d: DaemonProcess, **body: Any) -> dict[str, Any]:
    r = d.post("/v1/keys", {"role": "user", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def as_key(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def ws_entities(d: DaemonProcess, secret: str) -> set[str]:
    """The entity ids of every event the WebSocket shows this key, from the start to the head."""
    head = d.get("/v1/info").json()["log_position"]
    seen: set[str] = set()
    with connect(f"{d.ws}/v1/events?after=0", additional_headers=as_key(secret)) as ws:
        got = None
        while True:
            try:
                frame = json.loads(ws.recv(timeout=1.0))
            except TimeoutError:
                break  # no more events for this key
            got = frame["position"]
            seen.add(frame["entity"]["id"])
            if got >= head:
                break
    return seen


def test_create_list_revoke(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    made = requests.post(d.url("/v1/keys"), json={"name": "ci-bot", "role": "user", "rate_limit": 500},
                         headers={**d.headers, "X-Correlation-ID": "corr-key-1"}, timeout=30)
    assert made.status_code == 201, made.text
    key = made.json()
    assert set(key) >= {"id", "name", "role", "rate_limit", "created_at", "key"}
    assert key["role"] == "user" and key["rate_limit"] == 500 and key["key"].startswith("berthd_")
    assert key["rate_limits"] == {"general": 500, "executions": 50, "sessions": 20}
    assert key["quotas"] == {"containers": 50, "kernels": 20, "sessions": 20}

    # the secret is never served again, and never written to the log
    listed = d.get("/v1/keys").json()
    mine = [k for k in listed["items"] if k["id"] == key["id"]]
    assert len(mine) == 1 and "key" not in mine[0] and mine[0]["name"] == "ci-bot"
    assert key["key"] not in d.get("/v1/keys").text and key["key"] not in d.get(f"/v1/keys/{key['id']}").text
    log = d.get("/v1/events", params={"entity": f"key-{key['id']}"}).json()["items"]
    assert [e["type"] for e in log] == ["ApiKeyCreated"] and key["key"] not in json.dumps(log)
    assert log[0]["principal"] == "admin" and log[0]["correlation_id"] == "corr-key-1"

    # the new key works at once, and is refused at once when revoked
    assert requests.get(d.url("/v1/containers"), headers=as_key(key["key"]), timeout=10).status_code == 200
    revoked = requests.delete(d.url(f"/v1/keys/{key['id']}"),
                              headers={**d.headers, "X-Correlation-ID": "corr-key-2"}, timeout=30)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    r = requests.get(d.url("/v1/containers"), headers=as_key(key["key"]), timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    assert key["id"] not in [k["id"] for k in d.get("/v1/keys").json()["items"]]
    assert key["id"] in [k["id"] for k in d.get("/v1/keys", params={"revoked": "true"}).json()["items"]]
    assert d.delete(f"/v1/keys/{key['id']}").status_code == 200  # revoking twice: still revoked

    # berthd audit shows who made and revoked it, with the correlation ids
    out = subprocess.run([sys.executable, "-m", "berthd", "audit", "--data-dir", str(d.data_dir),
                          "--entity", f"key-{key['id']}", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["type"], r["principal"], r["correlation_id"]) for r in rows] == [
        ("ApiKeyCreated", "admin", "corr-key-1"), ("ApiKeyRevoked", "admin", "corr-key-2")]


def test_refusals(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    user = make_key(d, name="plain-user")
    head = d.get("/v1/info").json()
    for body, field in (({"role": "user"}, "name"), ({"name": "x", "role": "root"}, "role"),
                        ({"name": "x", "rate_limit": 0}, "rate_limit"), ({"name": "x", "secret": "s"}, "secret"),
                        ({"name": "x", "quotas": {"containers": -1}}, "quotas.containers"),
                        ({"name": "x", "rate_limit": 5, "rate_limits": {"general": 6}}, "rate_limit")):
        r = d.post("/v1/keys", body)
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == field, (body, r.text)
    taken = d.post("/v1/keys", {"name": "plain-user"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "CONFLICT"
    for method, path in (("post", "/v1/keys"), ("get", "/v1/keys"), ("get", f"/v1/keys/{user['id']}"),
                         ("delete", f"/v1/keys/{user['id']}")):
        r = requests.request(method, d.url(path), json={"name": "x"}, headers=as_key(user["key"]), timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN", (method, path)
    assert requests.get(d.url("/v1/keys"), timeout=10).status_code == 401
    missing = d.delete("/v1/keys/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "KEY_NOT_FOUND"
    bootstrap = d.delete("/v1/keys/admin")
    assert bootstrap.status_code == 409
    assert d.get("/v1/containers").status_code == 200  # the bootstrap key still works
    assert d.get("/v1/info").json().get("log_position", 0) >= head.get("log_position", 0)


def test_admin_role_key_sees_everything(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    admin2 = make_key(d, name="second-admin", role="admin")
    assert admin2["quotas"] is None and admin2["rate_limits"]["general"] == 100
    c = d.post("/v1/containers", {"image": "host", "command": ["sleep", "300"]}).json()
    try:
        r = requests.get(d.url(f"/v1/containers/{c['id']}"), headers=as_key(admin2["key"]), timeout=10)
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "100"
        assert requests.post(d.url("/v1/keys"), json={"name": "made-by-admin2"}, headers=as_key(admin2["key"]),
                             timeout=10).status_code == 201
    finally:
        d.delete(f"/v1/containers/{c['id']}", params={"force": "true"})


def test_a_user_key_sees_only_its_own(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    alice, bob = make_key(d, name="alice"), make_key(d, name="bob")
    a, b = as_key(alice["key"]), as_key(bob["key"])

    def call(method: str, path: str, headers: dict[str, str], body: Any = None) -> requests.Response:
        return requests.request(method, d.url(path), json=body, headers=headers, timeout=120)

    c = call("POST", "/v1/containers", a, {"image": "host", "command": ["sleep", "300"], "name": "alice-box"})
    assert c.status_code == 201, c.text
    cid = c.json()["id"]
    assert c.json()["owner"] == alice["id"]
    k = call("POST", "/v1/kernels", a, {"language": "bash", "image": "host"})
    assert k.status_code == 201, k.text
    kid = k.json()["id"]
    s = call("POST", "/v1/sessions", a, {"language": "bash"})
    assert s.status_code == 201, s.text
    sid = s.json()["id"]
    ran = call("POST", f"/v1/kernels/{kid}/execute", a, {"code": "echo hi"})
    assert ran.status_code == 200, ran.text
    rid = ran.json()["result_id"]
    try:
        # bob: 404 for every one of alice's entities, by id or by name, read or write
        for method, path, code in (
            ("GET", f"/v1/containers/{cid}", "CONTAINER_NOT_FOUND"),
            ("GET", "/v1/containers/alice-box", "CONTAINER_NOT_FOUND"),
            ("POST", f"/v1/containers/{cid}/exec", "CONTAINER_NOT_FOUND"),
            ("POST", f"/v1/containers/{cid}/stop", "CONTAINER_NOT_FOUND"),
            ("DELETE", f"/v1/containers/{cid}", "CONTAINER_NOT_FOUND"),
            ("GET", f"/v1/containers/{cid}/logs", "CONTAINER_NOT_FOUND"),
            ("GET", f"/v1/kernels/{kid}", "KERNEL_NOT_FOUND"),
            ("POST", f"/v1/kernels/{kid}/execute", "KERNEL_NOT_FOUND"),
            ("DELETE", f"/v1/kernels/{kid}", "KERNEL_NOT_FOUND"),
            ("GET", f"/v1/sessions/{sid}", "SESSION_NOT_FOUND"),
            ("POST", f"/v1/sessions/{sid}/execute", "SESSION_NOT_FOUND"),
            ("DELETE", f"/v1/sessions/{sid}", "SESSION_NOT_FOUND"),
            ("GET", f"/v1/results/{rid}", "RESULT_NOT_FOUND"),
        ):
            body = {"command": ["true"]} if path.endswith("/exec") else {"code": "echo x"} if "execute" in path else None
            r = call(method, path, b, body)
            assert r.status_code == 404 and r.json()["error"]["code"] == code, (method, path, r.text)
        for path in ("/v1/containers", "/v1/kernels", "/v1/sessions"):
            assert call("GET", path, b).json()["items"] == []
            assert len(call("GET", path, a).json()["items"]) >= 1
        # events: alice sees hers, bob none of them; the audit is admin only
        bob_events = call("GET", "/v1/events", b).json()["items"]
        assert not {e["entity"]["id"] for e in bob_events} & {cid, kid, sid}
        alice_events = {e["entity"]["id"] for e in call("GET", "/v1/events", a, None).json()["items"]}
        assert {cid, kid, sid} <= alice_events
        # ... and the same on the events WebSocket (one ownership rule for both)
        assert {cid, kid, sid} <= ws_entities(d, alice["key"])
        assert not ws_entities(d, bob["key"]) & {cid, kid, sid}
        assert call("GET", "/v1/audit", a).status_code == 403
        # the admin sees all of it
        assert d.get(f"/v1/containers/{cid}").status_code == 200
        assert d.get(f"/v1/results/{rid}").status_code == 200
        # every event alice caused names her key
        principals = {e["principal"] for e in d.get("/v1/events", params={"entity": cid}).json()["items"]
                      if e.get("principal") not in (None, "system")}
        assert principals == {alice["id"]}
    finally:
        call("DELETE", f"/v1/sessions/{sid}", a)
        call("DELETE", f"/v1/kernels/{kid}", a)
        call("DELETE", f"/v1/containers/{cid}?force=true", a)
