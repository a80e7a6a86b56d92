"""Sessions through the HTTP API with a real daemon: a kernel opened on demand, code and
commands, the policy (403 POLICY_DENIED + CommandDenied), results by id,
execute_with_retry, activity extending the TTL, expiry by the timer and at a command, expiry
after a daemon restart, close — on the local runtime, and the basic path on Docker."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import requests

from berthd.actors import SYSTEM, append_retrying, system_clock
from berthd.domain import EVENT_TYPES
from berthd.domain.node import ApiKeyCreated
from berthd.events import open_store
from berthd.http.auth import hash_key
from tests.daemon_process import DaemonProcess

PYTHON_IMAGE = "berthd-test/python:3.11"


def wait_for(fn: Any, timeout: float = 10.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def open_session(d: DaemonProcess, **body: Any) -> dict[str, Any]:
    r = d.post("/v1/sessions", body)
    assert r.status_code == 201, r.text
    view: dict[str, Any] = r.json()
    return view


def execute(d: DaemonProcess, sid: str, status: int = 200, **body: Any) -> dict[str, Any]:
    r = d.post(f"/v1/sessions/{sid}/execute", body)
    assert r.status_code == status, r.text
    out: dict[str, Any] = r.json()
    return out


def events_of(d: DaemonProcess, sid: str) -> list[dict[str, Any]]:
    r = d.get("/v1/events", params={"entity": sid, "limit": 1000})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def kernel_status(d: DaemonProcess, kernel_id: str) -> str:
    status: str = d.get(f"/v1/kernels/{kernel_id}").json()["status"]
    return status


def test_code_and_commands_on_the_local_runtime(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    s = open_session(d, name="agent-1", policy={"allow": ["echo", "sh -c"]}, metadata={"task": "t1"})
    assert set(s) >= {"id", "name", "status", "language", "container_id", "kernel_id", "created_at",
                      "expires_at", "last_activity", "commands_executed", "metadata"}
    assert s["status"] == "active" and s["kernel_id"] is None and s["container_id"] is None
    assert s["metadata"] == {"task": "t1"} and s["expires_at"] > s["created_at"]
    sid = s["id"]

    one = execute(d, "agent-1", code="x = 41")  # by name; the kernel opens now
    assert one["status"] == "ok" and one["result_id"] and one["executed_at"]
    two = execute(d, sid, code="x + 1")
    assert two["return_value"] == "42" and two["error"] is None
    view = d.get(f"/v1/sessions/{sid}").json()
    assert view["kernel_id"] and view["container_id"] and view["commands_executed"] == 2
    assert view["expires_at"] >= s["expires_at"] and view["last_activity"] == two["executed_at"]
    assert kernel_status(d, view["kernel_id"]) == "idle"

    ok = execute(d, sid, command=["echo", "hello"])
    assert ok["status"] == "ok" and ok["exit_code"] == 0 and ok["stdout"] == "hello\n"
    assert ok["return_value"] is None and ok["error"] is None and ok["result_id"]
    assert set(ok) >= {"status", "stdout", "stderr", "return_value", "execution_count", "duration_ms",
                       "truncated", "error", "result_id", "executed_at"}
    bad = execute(d, sid, command=["sh", "-c", "echo oops >&2; exit 3"])
    assert bad["status"] == "error" and bad["exit_code"] == 3 and bad["stderr"] == "oops\n"

    stored = d.get(f"/v1/results/{ok['result_id']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["stdout"] == "hello\n" and stored.json()["status"] == "ok"
    assert d.get(f"/v1/results/{bad['result_id']}").json()["exit_code"] == 3
    assert d.get(f"/v1/results/{two['result_id']}").json()["return_value"] == "42"

    head = d.get("/v1/info").json()["log_position"]
    denied = d.post(f"/v1/sessions/{sid}/execute", {"command": ["rm", "-rf", "/tmp/x"]})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "POLICY_DENIED"
    prefix = d.post(f"/v1/sessions/{sid}/execute", {"command": ["sh", "-x"]})  # "sh -c" is word for word
    assert prefix.status_code == 403
    types = [e["type"] for e in events_of(d, sid)]
    assert types.count("CommandDenied") == 2 and "SessionKernelAttached" in types
    assert d.get("/v1/info").json()["log_position"] == head + 2  # only the audit events
    assert d.get(f"/v1/sessions/{sid}").json()["commands_executed"] == 4

    listed = d.get("/v1/sessions", params={"status": "active"}).json()
    assert sid in [i["id"] for i in listed["items"]]
    assert d.get("/v1/info").json()["counts"]["sessions"]["active"] >= 1

    closed = d.delete(f"/v1/sessions/{sid}")
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    assert kernel_status(d, view["kernel_id"]) == "destroyed"
    after = d.post(f"/v1/sessions/{sid}/execute", {"code": "1"})
    assert after.status_code == 409
    assert sid in [i["id"] for i in d.get("/v1/sessions", params={"status": "closed"}).json()["items"]]


def test_execute_with_retry(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    sid = open_session(d)["id"]
    r = d.post(f"/v1/sessions/{sid}/execute_with_retry",
               {"code": "x + 1", "on_error_code": "x = 41", "max_attempts": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["return_value"] == "42"
    attempts = body["attempts"]
    assert [a["status"] for a in attempts] == ["error", "ok"]
    assert attempts[0]["error"]["ename"] == "NameError" and attempts[-1]["result_id"] == body["result_id"]

    r = d.post(f"/v1/sessions/{sid}/execute_with_retry", {"code": "1/0", "max_attempts": 2})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "error" and len(body["attempts"]) == 2
    d.delete(f"/v1/sessions/{sid}")


def test_refusals(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    missing = d.get("/v1/sessions/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "SESSION_NOT_FOUND"
    for body, field in (({"ttl_seconds": 0}, "ttl_seconds"), ({"language": "ruby"}, "language"),
                        ({"policy": {"allow": "ls"}}, "policy.allow"), ({"bogus": 1}, "bogus")):
        r = d.post("/v1/sessions", body)
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == field, (body, r.text)
    sid = open_session(d, name="refusals")["id"]
    assert d.post("/v1/sessions", {"name": "refusals"}).status_code == 409
    for body in ({}, {"code": "1", "command": ["ls"]}):
        r = d.post(f"/v1/sessions/{sid}/execute", body)
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "code"
    assert d.get("/v1/sessions", params={"status": "bogus"}).status_code == 400
    d.delete(f"/v1/sessions/{sid}")


def test_ttl_expiry_and_activity(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    s = open_session(d, ttl_seconds=3)
    sid = s["id"]
    time.sleep(1.5)
    first = execute(d, sid, code="1")  # activity pushes expires_at to executed_at + ttl
    view = d.get(f"/v1/sessions/{sid}").json()
    assert view["expires_at"] > s["expires_at"] and view["last_activity"] == first["executed_at"]
    kernel_id = view["kernel_id"]
    expired = wait_for(lambda: d.get(f"/v1/sessions/{sid}").json()["status"] == "expired", timeout=10)
    assert expired
    assert wait_for(lambda: kernel_status(d, kernel_id) == "destroyed", timeout=10)
    assert "SessionExpired" in [e["type"] for e in events_of(d, sid)]
    r = d.post(f"/v1/sessions/{sid}/execute", {"code": "1"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "SESSION_EXPIRED"


def _add_user_key(data_dir: pathlib.Path, secret: str) -> None:
    """A user key, written to the log while the daemon is down (there is no keys API yet)."""
    store = open_store(str(data_dir / "berthd.db"), EVENT_TYPES)
    try:
        append_retrying(store, "key-user1", [ApiKeyCreated(
            key_id="user1", name="user1", role="user", key_hash=hash_key(secret))], SYSTEM.meta(system_clock, "t"))
    finally:
        store.close()


def test_expiry_after_a_daemon_restart(tmp_path: pathlib.Path) -> None:
    d = DaemonProcess(tmp_path / "data", runtime="local").start()
    try:
        sid = open_session(d, ttl_seconds=2)["id"]
        execute(d, sid, code="y = 1")
        kernel_id = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
        live = open_session(d, ttl_seconds=3600)["id"]
        d.kill()
        secret = "berthd_user1_secret"
        _add_user_key(d.data_dir, secret)
        time.sleep(2.5)
        d.start()
        view = d.get(f"/v1/sessions/{sid}").json()
        assert view["status"] == "expired"  # at boot, before the daemon answers anything
        assert kernel_status(d, kernel_id) == "destroyed"
        assert d.get(f"/v1/sessions/{live}").json()["status"] == "active"

        # a user key sees only its own sessions
        user = {"Authorization": f"Bearer {secret}"}
        r = requests.get(d.url(f"/v1/sessions/{live}"), headers=user, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "SESSION_NOT_FOUND"
        assert requests.post(d.url(f"/v1/sessions/{live}/execute"), json={"code": "1"}, headers=user,
                             timeout=10).status_code == 404
        mine = requests.post(d.url("/v1/sessions"), json={}, headers=user, timeout=10)
        assert mine.status_code == 201, mine.text
        listed = requests.get(d.url("/v1/sessions"), headers=user, timeout=10).json()
        assert [i["id"] for i in listed["items"]] == [mine.json()["id"]]
    finally:
        d.stop()


def test_code_and_command_on_docker(docker_daemon: DaemonProcess) -> None:
    d = docker_daemon
    sid = open_session(d, image=PYTHON_IMAGE, policy={"allow": ["python3 -c", "ls"]})["id"]
    execute(d, sid, code="x = 41")
    assert execute(d, sid, code="x + 1")["return_value"] == "42"
    ran = execute(d, sid, command=["python3", "-c", "print(6 * 7)"])
    assert ran["status"] == "ok" and ran["stdout"] == "42\n" and ran["exit_code"] == 0
    assert d.get(f"/v1/results/{ran['result_id']}").json()["stdout"] == "42\n"
    r = d.post(f"/v1/sessions/{sid}/execute", {"command": ["cat", "/etc/passwd"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "POLICY_DENIED"
    kernel_id = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
    assert d.delete(f"/v1/sessions/{sid}").json()["status"] == "closed"
    assert kernel_status(d, kernel_id) == "destroyed"
