"""The Containers, Events and System API of API.md against a real daemon on loopback."""

from __future__ import annotations

import time
import uuid

import requests

from tests.daemon_process import DaemonProcess

VIEW_FIELDS = {"id", "name", "image", "command", "status", "runtime", "created_at", "env", "mounts",
               "ports", "limits", "profile", "labels", "owner"}


def _name() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def create(d: DaemonProcess, image: str, **body: object) -> dict:
    r = d.post("/v1/containers", {"image": image, "command": ["sleep", "300"], **body})
    assert r.status_code == 201, r.text
    return r.json()


def test_lifecycle_exec_files_logs(daemon_and_image: tuple[DaemonProcess, str]) -> None:
    d, image = daemon_and_image
    name = _name()
    view = create(d, image, name=name, env={"GREETING": "hi"}, labels={"suite": "api"})
    assert set(view) >= VIEW_FIELDS
    assert (view["name"], view["status"], view["image"]) == (name, "running", image)
    assert view["started_at"].endswith("Z") and view["created_at"].endswith("Z")

    # by name and by id
    assert d.get(f"/v1/containers/{name}").json()["id"] == view["id"]
    assert d.get(f"/v1/containers/{view['id']}").json()["name"] == name

    r = d.post(f"/v1/containers/{name}/exec", {"command": ["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "hi\n", "oops\n")
    assert set(out) >= {"exec_id", "duration_ms", "truncated", "timed_out"}
    assert out["exec_id"] != view["id"]

    r = d.post(f"/v1/containers/{name}/exec", {"command": ["cat"], "stdin": "piped"})
    assert r.json()["stdout"] == "piped"

    r = requests.put(d.url(f"/v1/containers/{name}/files"), params={"path": "/tmp/data.bin"},
                     data=b"\x00\x01binary", headers=d.headers, timeout=30)
    assert r.status_code == 201, r.text
    r = d.get(f"/v1/containers/{name}/files", params={"path": "/tmp/data.bin"})
    assert r.status_code == 200 and r.content == b"\x00\x01binary"

    assert "logs" in d.get(f"/v1/containers/{name}/logs", params={"tail": 10}).json()

    listed = d.get("/v1/containers", params={"label": "suite=api"}).json()
    assert {"items", "total", "limit", "offset"} <= set(listed)
    assert name in [c["name"] for c in listed["items"]]

    r = d.post(f"/v1/containers/{name}/stop", {"timeout": 5})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "exited"
    r = d.post(f"/v1/containers/{name}/start")
    assert r.status_code == 200 and r.json()["status"] == "running"
    r = d.post(f"/v1/containers/{name}/restart")
    assert r.status_code == 200 and r.json()["status"] == "running"
    r = d.post(f"/v1/containers/{name}/kill")
    assert r.status_code == 200 and r.json()["status"] == "exited"
    r = d.delete(f"/v1/containers/{name}")
    assert r.status_code == 200 and r.json() == {"id": view["id"], "status": "removed"}
    assert d.get(f"/v1/containers/{view['id']}").json()["status"] == "removed"
    assert name not in [c["name"] for c in d.get("/v1/containers").json()["items"]]

    # everything above is on the log, in order
    events = d.get("/v1/events", params={"entity": view["id"], "limit": 1000}).json()["items"]
    types = [e["type"] for e in events]
    assert types[:4] == ["ContainerCreateRequested", "ContainerCreated", "ContainerStartRequested",
                         "ContainerStarted"]
    assert types[-2:] == ["ContainerRemoveRequested", "ContainerRemoved"]
    assert {"ExecStarted", "ExecFinished", "FileWritten", "ContainerStopRequested", "ContainerExited"} <= set(types)
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["entity"] == {"kind": "container", "id": view["id"]} for e in events)


def test_exits_on_its_own_are_recorded(daemon_and_image: tuple[DaemonProcess, str]) -> None:
    d, image = daemon_and_image
    view = create(d, image, command=["sh", "-c", "exit 7"])
    deadline = time.monotonic() + 5
    state = view
    while time.monotonic() < deadline and state["status"] != "exited":
        time.sleep(0.1)
        state = d.get(f"/v1/containers/{view['id']}").json()
    assert (state["status"], state["exit_code"]) == ("exited", 7)
    d.delete(f"/v1/containers/{view['id']}")


def test_long_exec_does_not_block_kill(daemon_and_image: tuple[DaemonProcess, str]) -> None:
    import threading

    d, image = daemon_and_image
    view = create(d, image)
    result: dict[str, requests.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "exec", d.post(f"/v1/containers/{view['id']}/exec", {"command": ["sleep", "60"]})))
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    r = d.post(f"/v1/containers/{view['id']}/kill")
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 10
    t.join(timeout=30)
    assert "exec" in result
    assert result["exec"].status_code in (200, 409), result["exec"].text  # ended by the kill
    d.delete(f"/v1/containers/{view['id']}?force=true")


def test_exec_timeout(daemon_and_image: tuple[DaemonProcess, str]) -> None:
    d, image = daemon_and_image
    view = create(d, image)
    r = d.post(f"/v1/containers/{view['id']}/exec", {"command": ["sleep", "30"], "timeout": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["timed_out"] is True
    r = d.post(f"/v1/containers/{view['id']}/exec", {"command": ["echo", "still usable"]})
    assert r.json()["stdout"] == "still usable\n"
    d.delete(f"/v1/containers/{view['id']}?force=true")


def test_correlation_id_is_echoed_and_recorded(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    r = requests.post(d.url("/v1/containers"), json={"image": "host", "command": ["sleep", "30"]},
                      headers={**d.headers, "X-Correlation-ID": "corr-123"}, timeout=60)
    assert r.status_code == 201
    assert r.headers["X-Correlation-ID"] == "corr-123" and r.headers["X-Request-ID"]
    events = d.get("/v1/events", params={"entity": r.json()["id"]}).json()["items"]
    assert events and all(e["correlation_id"] == "corr-123" for e in events)
    assert all(e["principal"] == "admin" for e in events)
    d.delete(f"/v1/containers/{r.json()['id']}?force=true")


def test_name_taken_is_409(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    name = _name()
    create(d, "host", name=name)
    r = d.post("/v1/containers", {"image": "host", "name": name, "command": ["sleep", "1"]})
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
    d.delete(f"/v1/containers/{name}?force=true")
