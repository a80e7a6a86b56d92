"""Sessions through the HTTP API with a real daemon: a kernel opened on demand, code and
commands, the policy (403 POLICY_DENIED + CommandDenied), results by id,
execute_with_retry, activity extending the TTL, expiry by the timer and at a command, expiry
after a daemon restart, close — on the local runtime and on Docker."""

from __future__ import annotations

import contextlib
import json
import pathlib
import threading
import time
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from berthd.actors import SYSTEM, append_retrying, system_clock
from berthd.domain import EVENT_TYPES
from berthd.domain.kernel import KernelDestroyRequested
from berthd.domain.node import ApiKeyCreated
from berthd.domain.session import SessionClosed
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


@pytest.fixture(params=["local", "docker"])
def rt(request: pytest.FixtureRequest) -> tuple[DaemonProcess, dict[str, Any]]:
    """The same session test on both runtimes: the daemon, and what a session body needs."""
    d: DaemonProcess = request.getfixturevalue(f"{request.param}_daemon")
    return d, ({"image": PYTHON_IMAGE} if request.param == "docker" else {})


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


def test_concurrent_executes_in_one_session_queue(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    sid = open_session(d)["id"]
    execute(d, sid, code="order = []")
    n = 8
    answers: dict[int, requests.Response] = {}

    def send(i: int) -> None:
        answers[i] = d.post(f"/v1/sessions/{sid}/execute",
                            {"code": f"import time\ntime.sleep(0.05)\norder.append({i})\n{i} * 100"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, r in answers.items():  # never 409 busy: each caller gets its own result
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and r.json()["return_value"] == str(i * 100)
    assert len(answers) == n
    order = execute(d, sid, code="order")["return_value"]
    assert sorted(eval(order)) == list(range(n))  # noqa: S307 - a list of ints from our own kernel
    # one at a time, in the order they were taken: the results' counts follow the log's order
    counts = [e["data"]["execution_count"] for e in events_of(d, sid) if e["type"] == "CommandExecuted"]
    assert counts == sorted(counts) and len(counts) == n + 2
    d.delete(f"/v1/sessions/{sid}")


def test_a_session_opens_a_new_kernel_after_its_kernel_was_deleted(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    sid = open_session(d)["id"]
    execute(d, sid, code="kept = 1")
    old = d.get(f"/v1/sessions/{sid}").json()
    assert d.delete(f"/v1/kernels/{old['kernel_id']}").status_code == 200
    again = execute(d, sid, code="'kept' in dir()")
    assert again["status"] == "ok" and again["return_value"] == "False"  # a new interpreter
    view = d.get(f"/v1/sessions/{sid}").json()
    assert view["kernel_id"] not in (None, old["kernel_id"]) and view["container_id"] != old["container_id"]
    assert kernel_status(d, view["kernel_id"]) == "idle"
    lost = [e for e in events_of(d, sid) if e["type"] == "SessionKernelLost"]
    assert len(lost) == 1 and lost[0]["data"]["kernel_id"] == old["kernel_id"]
    d.delete(f"/v1/sessions/{sid}")
    assert kernel_status(d, view["kernel_id"]) == "destroyed"


def ws_frames(d: DaemonProcess, sid: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with connect(f"{d.ws}/v1/sessions/{sid}/execute", additional_headers=d.headers, open_timeout=10) as ws:
        with contextlib.suppress(ConnectionClosed):  # an unknown session is answered before it is sent
            ws.send(json.dumps(request))
        with contextlib.suppress(ConnectionClosed):  # an error frame closes with 1008/1011
            while True:
                frames.append(json.loads(ws.recv(60)))
    return frames


def test_ws_execute_streams_code_output_then_the_result(rt: tuple[DaemonProcess, dict[str, Any]]) -> None:
    d, body = rt
    sid = open_session(d, policy={"allow": ["echo"]}, **body)["id"]
    code = "import time\nfor i in range(3):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)\n'end'"
    with connect(f"{d.ws}/v1/sessions/{sid}/execute", additional_headers=d.headers, open_timeout=10) as ws:
        ws.send(json.dumps({"code": code}))
        started = json.loads(ws.recv(60))
        assert started["type"] == "started" and started["result_id"]
        first = json.loads(ws.recv(10))
        assert first["type"] == "stdout" and first["data"].startswith("line 0")  # while it runs
        frames = [first, *(json.loads(m) for m in ws)]
    result = frames[-1]
    assert result["type"] == "result" and result["status"] == "ok" and result["return_value"] == "'end'"
    assert result["result_id"] == started["result_id"] and result["executed_at"]
    assert "".join(f["data"] for f in frames if f["type"] == "stdout") == "line 0\nline 1\nline 2\n"
    assert result["stdout"] == "line 0\nline 1\nline 2\n"
    assert d.get(f"/v1/results/{result['result_id']}").json()["return_value"] == "'end'"

    echoed = ws_frames(d, sid, {"command": ["echo", "hi"]})
    assert [f["type"] for f in echoed] == ["started", "result"]
    assert echoed[-1]["stdout"] == "hi\n" and echoed[-1]["result_id"] == echoed[0]["result_id"]
    assert d.get(f"/v1/results/{echoed[0]['result_id']}").json()["stdout"] == "hi\n"

    denied = ws_frames(d, sid, {"command": ["rm", "-rf", "/"]})
    assert [f["type"] for f in denied] == ["error"] and denied[0]["error"]["code"] == "POLICY_DENIED"
    bad = ws_frames(d, sid, {"code": "1", "command": ["echo"]})
    assert bad[0]["type"] == "error" and bad[0]["error"]["details"]["field"] == "code"
    missing = ws_frames(d, "nope", {"code": "1"})
    assert missing[0]["error"]["code"] == "SESSION_NOT_FOUND"
    assert d.get(f"/v1/sessions/{sid}").json()["commands_executed"] == 2
    d.delete(f"/v1/sessions/{sid}")


def test_execute_with_retry(rt: tuple[DaemonProcess, dict[str, Any]]) -> None:
    d, body = rt
    sid = open_session(d, **body)["id"]
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


def test_ttl_expiry_and_activity(rt: tuple[DaemonProcess, dict[str, Any]]) -> None:
    d, body = rt
    s = open_session(d, ttl_seconds=3, **body)
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


@pytest.mark.parametrize("runtime", ["local", "docker"])
def test_expiry_after_a_daemon_restart(tmp_path: pathlib.Path, runtime: str, request: pytest.FixtureRequest) -> None:
    if runtime == "docker":
        request.getfixturevalue("docker_client")  # the engine, or the reason it is missing
    body = {"image": PYTHON_IMAGE} if runtime == "docker" else {}
    d = DaemonProcess(tmp_path / "data", runtime=runtime).start()
    try:
        sid = open_session(d, ttl_seconds=2, **body)["id"]
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


def test_passivated_kernels_and_sessions_come_back_and_still_expire(tmp_path: pathlib.Path) -> None:
    d = DaemonProcess(tmp_path / "data", runtime="local", extra_env={"BERTHD_PASSIVATE_AFTER": "0.3"}).start()
    try:
        sid = open_session(d, ttl_seconds=5)["id"]
        execute(d, sid, code="x = 41")
        kid = d.post("/v1/kernels", {"image": "host"}).json()["id"]
        assert d.post(f"/v1/kernels/{kid}/execute", {"code": "y = 1"}).status_code == 200

        def counts() -> dict[str, Any]:
            got: dict[str, Any] = d.get("/v1/info").json()["counts"]
            return got

        assert wait_for(lambda: counts()["kernel_actors"] == 0 and counts()["session_actors"] == 0)
        assert execute(d, sid, code="x + 1")["return_value"] == "42"  # the same kernel, reconnected
        assert d.post(f"/v1/kernels/{kid}/execute", {"code": "y + 1"}).json()["return_value"] == "2"
        session_kernel = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
        assert [e["type"] for e in events_of(d, sid)].count("SessionKernelAttached") == 1
        assert wait_for(lambda: counts()["session_actors"] == 0)
        # the timer finds the due session in the view, not among live actors
        assert wait_for(lambda: d.get(f"/v1/sessions/{sid}").json()["status"] == "expired", timeout=15)
        assert wait_for(lambda: kernel_status(d, session_kernel) == "destroyed")
        assert kernel_status(d, kid) == "idle"
        d.delete(f"/v1/kernels/{kid}")
    finally:
        d.stop()


def test_destroys_cut_short_by_a_crash_are_finished_at_boot(tmp_path: pathlib.Path) -> None:
    """The daemon dies (SIGKILL) between recording an end and carrying it out: a session's
    close, a kernel's destroy. The next boot finishes both, sandboxes included."""
    d = DaemonProcess(tmp_path / "data", runtime="local").start()
    try:
        sid = open_session(d)["id"]
        execute(d, sid, code="1")
        session_kernel = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
        kernel = d.post("/v1/kernels", {"image": "host"}).json()
        d.kill()
        store = open_store(str(d.data_dir / "berthd.db"), EVENT_TYPES)
        try:  # the intents the daemon had recorded when it died
            meta = SYSTEM.meta(system_clock, "t")
            append_retrying(store, sid, [SessionClosed(at="2026-01-01T00:00:00.000Z")], meta)
            append_retrying(store, kernel["id"], [KernelDestroyRequested()], meta)
        finally:
            store.close()
        d.start()
        assert d.get(f"/v1/sessions/{sid}").json()["status"] == "closed"
        assert kernel_status(d, session_kernel) == "destroyed"  # at boot, before it answers anything
        assert kernel_status(d, kernel["id"]) == "destroyed"
        assert d.get(f"/v1/containers/{kernel['container_id']}").json()["status"] == "removed"
        sandbox = d.get(f"/v1/kernels/{session_kernel}").json()["container_id"]
        assert d.get(f"/v1/containers/{sandbox}").json()["status"] == "removed"
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
    # its kernel deleted from outside: the next execution opens a new one
    old = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
    assert d.delete(f"/v1/kernels/{old}").status_code == 200
    assert execute(d, sid, code="'x' in dir()")["return_value"] == "False"
    kernel_id = d.get(f"/v1/sessions/{sid}").json()["kernel_id"]
    assert kernel_id != old and kernel_status(d, kernel_id) == "idle"
    assert execute(d, sid, command=["ls", "/"])["status"] == "ok"  # in the new sandbox
    assert d.delete(f"/v1/sessions/{sid}").json()["status"] == "closed"
    assert kernel_status(d, kernel_id) == "destroyed"


def test_bash_session_on_docker(docker_daemon: DaemonProcess) -> None:
    d = docker_daemon
    sid = open_session(d, image=PYTHON_IMAGE, language="bash")["id"]
    assert execute(d, sid, code="cd /tmp && export WHO=berth")["status"] == "ok"
    assert execute(d, sid, code="echo $WHO@$PWD")["stdout"] == "berth@/tmp\n"
    assert execute(d, sid, code="false")["exit_code"] == 1
    d.delete(f"/v1/sessions/{sid}")
