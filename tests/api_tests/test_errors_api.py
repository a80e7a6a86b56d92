"""Bad input: a clear 4xx with a stable code, never a 500, and nothing appended."""

from __future__ import annotations

import time

import pytest
import requests

from tests.daemon_process import DaemonProcess


def head(d: DaemonProcess) -> int:
    return d.get("/v1/info").json()["log_position"]


def error_of(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    return body["error"]


def test_health_needs_no_key_everything_else_does(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    assert requests.get(d.url("/v1/health"), timeout=10).json() == {"status": "ok"}
    for path in ("/v1/info", "/v1/containers", "/v1/events", "/v1/images"):
        r = requests.get(d.url(path), timeout=10)
        assert r.status_code == 401 and error_of(r)["code"] == "UNAUTHORIZED"
        r = requests.get(d.url(path), headers={"X-API-Key": "wrong"}, timeout=10)
        assert r.status_code == 401
    assert requests.get(d.url("/v1/info"), headers={"X-API-Key": d.key}, timeout=10).status_code == 200


@pytest.mark.parametrize("body, field", [
    (b"{not json", "$"),
    (b'{"image": 42}', "image"),
    (b'{"image": "host", "command": "sleep 1"}', "command"),
    (b'{"image": "host", "bogus": 1}', "bogus"),
    (b'{"command": ["true"]}', "image"),
    (b'{"image": "host", "limits": {"memory_mb": -5}}', "limits.memory_mb"),
    (b'{"image": "host", "name": "../etc"}', "name"),
    (b'{"image": "host", "mounts": [{"host_path": "relative", "container_path": "/x"}]}', "mounts[0].host_path"),
    (b'[]', "$"),
    (b'{"image": "host", "command": ["a\\u0000b"]}', "command[0]"),
    (b'{"image": "host", "env": {"K": "a\\u0000"}}', "env"),
    (b'{"image": "host", "name": "0123456789ab"}', "name"),
    (b'', "$"),
])
def test_bad_create_bodies_are_400_naming_the_field(local_daemon: DaemonProcess, body: bytes, field: str) -> None:
    d = local_daemon
    before = head(d)
    r = requests.post(d.url("/v1/containers"), data=body, headers={**d.headers, "Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "VALIDATION_ERROR"
    assert err["details"]["field"] == field
    assert head(d) == before, "nothing is appended for a refused command"


def test_unknown_things(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    r = d.get("/v1/containers/nope")
    assert r.status_code == 404 and error_of(r)["code"] == "CONTAINER_NOT_FOUND"
    r = d.post("/v1/containers/nope/start")
    assert r.status_code == 404
    r = d.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "NOT_FOUND"
    r = requests.patch(d.url("/v1/containers"), headers=d.headers, timeout=10)
    assert r.status_code == 405 and error_of(r)["code"] == "METHOD_NOT_ALLOWED"


def test_state_conflicts_are_409_and_append_nothing(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    view = d.post("/v1/containers", {"image": "host", "command": ["sleep", "30"], "start": False}).json()
    assert view["status"] == "created"
    before = head(d)
    for path in ("/stop", "/kill", "/exec"):
        r = d.post(f"/v1/containers/{view['id']}{path}", {"command": ["true"]} if path == "/exec" else None)
        assert r.status_code == 409, r.text
        assert error_of(r)["code"] == "CONFLICT"
    assert head(d) == before
    d.delete(f"/v1/containers/{view['id']}")


def test_bad_query_values(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    for params in ({"limit": "abc"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}, {"status": "weird"}):
        r = d.get("/v1/containers", params=params)
        assert r.status_code == 400, (params, r.text)
    r = d.get("/v1/events", params={"after": "x"})
    assert r.status_code == 400
    r = d.delete("/v1/containers/nope", params={"force": "maybe"})
    assert r.status_code == 400 and error_of(r)["details"]["field"] == "force"


def test_missing_image_is_a_clear_error(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    r = d.post("/v1/containers", {"image": "no-such-image:1"})
    assert 400 <= r.status_code < 500, r.text
    assert error_of(r)["code"] in ("IMAGE_NOT_FOUND", "VALIDATION_ERROR")


def test_body_too_large_is_413(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    big = b'{"image": "' + b"x" * (17 << 20) + b'"}'
    try:
        r = requests.post(d.url("/v1/containers"), data=big, headers={**d.headers, "Content-Type": "application/json"},
                          timeout=60)
    except requests.ConnectionError:
        # the server may close the connection once it has refused the body; it must live on
        assert requests.get(d.url("/v1/health"), timeout=10).status_code == 200
        return
    assert r.status_code == 413 and error_of(r)["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("path, body, field", [
    ("/kill", {"signal": "FOO"}, "signal"),
    ("/stop", {"timeout": -1}, "timeout"),
    ("/exec", {"command": []}, "command"),
    ("/exec", {"command": ["echo", "a\u0000"]}, "command[1]"),
    ("/exec", {"command": ["true"], "workdir": "relative"}, "workdir"),
])
def test_bad_action_bodies_are_400_and_append_nothing(local_daemon: DaemonProcess, path: str, body: dict,
                                                      field: str) -> None:
    d = local_daemon
    view = d.post("/v1/containers", {"image": "host", "command": ["sleep", "30"]}).json()
    before = head(d)
    r = d.post(f"/v1/containers/{view['id']}{path}", body)
    assert r.status_code == 400, r.text
    assert error_of(r)["details"]["field"] == field
    assert head(d) == before
    d.delete(f"/v1/containers/{view['id']}?force=true")


def test_no_command_on_the_host_image_is_400_and_appends_nothing(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    before = head(d)
    for body in ({"image": "host"}, {"image": "host", "start": False}):
        r = d.post("/v1/containers", body)
        assert r.status_code == 400, r.text
        assert error_of(r)["code"] == "VALIDATION_ERROR" and error_of(r)["details"]["field"] == "command"
    assert head(d) == before


def test_a_missing_executable_is_a_client_error_not_a_502(daemon_and_image: tuple[DaemonProcess, str]) -> None:
    """Local checks the command before it starts anything: 400 naming it. On Docker the
    container's init starts and reports the missing program as exit 127, as `docker run`."""
    d, image = daemon_and_image
    r = d.post("/v1/containers", {"image": image, "command": ["/no/such/program"], "start": False})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    try:
        started = d.post(f"/v1/containers/{cid}/start")
        if image == "host":
            assert started.status_code == 400, started.text
            assert error_of(started)["details"]["field"] == "command"
        else:
            assert started.status_code == 200, started.text
            deadline = time.monotonic() + 10
            while d.get(f"/v1/containers/{cid}").json()["exit_code"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert d.get(f"/v1/containers/{cid}").json()["exit_code"] == 127
    finally:
        d.delete(f"/v1/containers/{cid}?force=true")
