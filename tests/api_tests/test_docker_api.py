"""Docker-only behaviour through the API: changes behind our back, reconciliation at boot,
orphans, and image pull/remove against a registry on loopback."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.conftest import BUSYBOX_IMAGE, missing
from tests.daemon_process import DaemonProcess


def wait_for(fn: Any, timeout: float = 5.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def engine_container(docker_client: Any, berth_id: str) -> Any:
    found = docker_client.containers.list(all=True, filters={"label": f"berth.id={berth_id}"})
    assert len(found) == 1
    return found[0]


def test_docker_kill_behind_our_back_is_recorded_within_5s(docker_daemon: DaemonProcess, docker_client: Any) -> None:
    d = docker_daemon
    view = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "300"]}).json()
    assert view["status"] == "running"
    engine_container(docker_client, view["id"]).kill()
    started = time.monotonic()
    state = wait_for(lambda: (s := d.get(f"/v1/containers/{view['id']}").json())["status"] == "exited" and s)
    assert state, "the exit was not recorded within 5 s"
    assert time.monotonic() - started < 5
    assert state["exit_code"] == 137
    d.delete(f"/v1/containers/{view['id']}")


def test_reconcile_after_sigkill(tmp_path: Any, docker_client: Any) -> None:
    d = DaemonProcess(tmp_path / "data", runtime="docker").start()
    try:
        exits = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "300"]}).json()
        vanishes = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "300"]}).json()
        stays = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "300"]}).json()
        node = d.get("/v1/info").json()["node_id"]
        d.kill()
        engine_container(docker_client, exits["id"]).kill()
        engine_container(docker_client, vanishes["id"]).remove(force=True)
        orphan = docker_client.containers.run(
            BUSYBOX_IMAGE, ["sleep", "300"], detach=True, init=True,
            labels={"berth.id": "0rphan0rphan", "berth.node": node})
        try:
            d.start()
            assert d.get(f"/v1/containers/{exits['id']}").json()["status"] == "exited"
            assert d.get(f"/v1/containers/{vanishes['id']}").json()["status"] == "lost"
            assert d.get(f"/v1/containers/{stays['id']}").json()["status"] == "running"
            events = d.get("/v1/events", params={"kind": "node", "type": "OrphanContainerFound"}).json()["items"]
            assert [e["data"]["berth_id"] for e in events] == ["0rphan0rphan"]
            orphan.reload()
            assert orphan.status == "running", "orphans are reported and left alone"
            exited = d.get("/v1/events", params={"entity": exits["id"], "type": "ContainerExited"}).json()["items"]
            assert exited[-1]["data"]["reason"] == "reconciled" and exited[-1]["principal"] == "system"
        finally:
            orphan.remove(force=True)
        for c in (exits, vanishes, stays):
            d.delete(f"/v1/containers/{c['id']}?force=true")
    finally:
        d.stop()


def test_images_list_pull_delete(docker_daemon: DaemonProcess) -> None:
    d = docker_daemon
    items = d.get("/v1/images", params={"limit": 1000}).json()["items"]
    assert any(BUSYBOX_IMAGE in i["tags"] for i in items)
    assert all({"id", "tags", "size", "created", "runtime"} <= set(i) for i in items)
    assert any(i["tags"] == ["host"] and i["runtime"] == "local" for i in items)
    registry = os.environ.get("BERTHD_TEST_REGISTRY")
    if not registry:
        missing("registry", "BERTHD_TEST_REGISTRY is not set; run ops/registry.sh")
    ref = f"{registry}/berthd-test/busybox:latest"
    d.delete(f"/v1/images/{ref}", params={"force": "true"})  # a leftover of an earlier run
    before = d.get("/v1/info").json()["log_position"]
    r = d.post("/v1/images/pull", {"ref": ref})
    assert r.status_code == 200, r.text
    assert ref in r.json()["tags"]
    types = [e["type"] for e in d.get("/v1/events", params={"after": before, "kind": "image"}).json()["items"]]
    assert types[0] == "ImagePullRequested" and types[-1] == "ImagePulled"
    r = d.delete(f"/v1/images/{ref}")
    assert r.status_code == 200, r.text
    r = d.delete(f"/v1/images/{ref}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "IMAGE_NOT_FOUND"
    r = d.post("/v1/images/pull", {"ref": f"{registry}/does-not/exist:1"})
    assert 400 <= r.status_code < 600 and r.status_code != 500
    assert r.json()["error"]["code"] in ("IMAGE_NOT_FOUND", "RUNTIME_FAILED")


@pytest.mark.parametrize("ref", ["../../etc", "UPPER:case", ""])
def test_bad_pull_refs(docker_daemon: DaemonProcess, ref: str) -> None:
    r = docker_daemon.post("/v1/images/pull", {"ref": ref})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "ref"
