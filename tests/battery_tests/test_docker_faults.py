"""Docker faults: the engine stopped mid-request, hung, and killed containers.

berthd must answer 503 ``RUNTIME_UNAVAILABLE`` within 10 s (never hang, never 500), and
work again once the engine is back; a container the engine lost meanwhile is reconciled.
"""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Callable, Iterator

import docker
import pytest
import requests

from tests.battery_tests.engine import PrivateEngine
from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess


@pytest.fixture
def engine(tmp_path: pathlib.Path) -> Iterator[PrivateEngine]:
    e = PrivateEngine(tmp_path / "engine").start()
    try:
        e.load_test_image()
        yield e
    finally:
        e.destroy()


def _wait_status(d: DaemonProcess, cid: str, wanted: set[str], within: float) -> str:
    deadline = time.monotonic() + within
    status = ""
    while time.monotonic() < deadline:
        status = d.get(f"/v1/containers/{cid}").json()["status"]
        if status in wanted:
            return status
        time.sleep(0.2)
    return status


def test_engine_stopped_mid_request_is_503_and_recovers(figures: Callable[[str], None],
        engine: PrivateEngine, daemon_with: Callable[..., DaemonProcess]) -> None:
    d = daemon_with("", runtime="docker", extra_env={"DOCKER_HOST": engine.url})
    r = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    assert _wait_status(d, cid, {"running"}, 30) == "running"

    # an exec in flight when the engine goes away
    answer: dict[str, object] = {}

    def long_exec() -> None:
        t0 = time.monotonic()
        try:
            resp = d.post(f"/v1/containers/{cid}/exec", {"command": ["sleep", "60"]})
            answer.update(status=resp.status_code, body=resp.json())
        except requests.RequestException as exc:
            answer.update(status=None, body=str(exc))
        answer["after"] = time.monotonic() - t0

    t = threading.Thread(target=long_exec)
    t.start()
    time.sleep(1.5)
    stopped_at = time.monotonic()
    engine.stop()
    t.join(timeout=30)
    assert not t.is_alive(), "the in-flight exec hung after the engine stopped"
    in_flight = time.monotonic() - stopped_at

    # new requests while the engine is down
    t0 = time.monotonic()
    r = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "1"]})
    refused_in = time.monotonic() - t0
    figures(f"engine stopped: in-flight exec answered {answer.get('status')} after {in_flight:.1f} s; "
          f"a create answered {r.status_code} in {refused_in:.2f} s")
    assert answer["status"] == 503, answer
    assert answer["body"]["error"]["code"] == "RUNTIME_UNAVAILABLE"  # type: ignore[index]
    assert in_flight <= 10
    assert r.status_code == 503 and r.json()["error"]["code"] == "RUNTIME_UNAVAILABLE", r.text
    assert refused_in <= 10
    assert d.get("/v1/health").status_code == 200

    # the engine comes back: the container it stopped is reconciled, new work succeeds
    engine.start()
    status = _wait_status(d, cid, {"exited", "lost"}, 30)
    assert status in ("exited", "lost"), status
    deadline = time.monotonic() + 30
    while True:
        r = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]})
        if r.status_code == 201 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 201, r.text
    e = d.post(f"/v1/containers/{r.json()['id']}/exec", {"command": ["echo", "back"]})
    assert e.status_code == 200 and e.json()["stdout"] == "back\n", e.text
    figures(f"recovered: {cid} reconciled as {status}; create + exec work again")


def test_a_hung_engine_is_503_within_10_s(figures: Callable[[str], None], engine: PrivateEngine,
                                          daemon_with: Callable[..., DaemonProcess]) -> None:
    d = daemon_with("", runtime="docker", extra_env={"DOCKER_HOST": engine.url})
    r = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    engine.pause()
    try:
        t0 = time.monotonic()
        r = d.post(f"/v1/containers/{cid}/stop", {"timeout": 1})
        took = time.monotonic() - t0
        figures(f"hung engine: stop answered {r.status_code} in {took:.1f} s")
        assert r.status_code == 503 and r.json()["error"]["code"] == "RUNTIME_UNAVAILABLE", r.text
        assert took <= 10
        assert d.get("/v1/health").status_code == 200
    finally:
        engine.resume()
    deadline = time.monotonic() + 30
    while d.post(f"/v1/containers/{cid}/stop", {"timeout": 1}).status_code not in (200, 409):
        assert time.monotonic() < deadline, "no recovery after the engine resumed"
        time.sleep(0.5)
    assert _wait_status(d, cid, {"exited"}, 30) == "exited"


def test_a_container_killed_behind_our_back_is_recorded(figures: Callable[[str], None],
        engine: PrivateEngine, daemon_with: Callable[..., DaemonProcess]) -> None:
    d = daemon_with("", runtime="docker", extra_env={"DOCKER_HOST": engine.url})
    cid = d.post("/v1/containers", {"image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]}).json()["id"]
    assert _wait_status(d, cid, {"running"}, 30) == "running"
    c = docker.DockerClient(base_url=engine.url, timeout=30)
    try:
        c.containers.get(f"berth-{cid}").kill()
    finally:
        c.close()
    t0 = time.monotonic()
    status = _wait_status(d, cid, {"exited"}, 10)
    figures(f"killed behind our back: recorded as {status} after {time.monotonic() - t0:.1f} s")
    assert status == "exited"
