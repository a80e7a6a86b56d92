"""POST /v1/run over HTTP on a real daemon (in this process), on the local runtime and on
Docker: the sandbox comes from the warm pool, the command runs, the sandbox is removed."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from berthd.actors.pool import POOL_LABEL
from berthd.daemon.config import Config
from berthd.daemon.lifecycle import Daemon
from tests.conftest import BUSYBOX_IMAGE, missing

PYTHON_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")


class Client:
    def __init__(self, daemon: Daemon, image: str) -> None:
        self.daemon = daemon
        self.image = image
        self.base = f"http://{daemon.endpoints['http']}"
        self.s = requests.Session()
        self.s.headers["Authorization"] = "Bearer " + (daemon.data_dir / "admin.key").read_text().strip()

    def run(self, **body: Any) -> requests.Response:
        body.setdefault("image", self.image)
        return self.s.post(self.base + "/v1/run", json=body, timeout=120)

    def get(self, path: str) -> requests.Response:
        return self.s.get(self.base + path, timeout=60)

    def pool_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.get("/v1/info").json()["pool"]
        return stats

    def status(self, berth_id: str) -> str:
        r = self.get(f"/v1/containers/{berth_id}")
        return str(r.json()["status"]) if r.status_code == 200 else str(r.status_code)

    def head(self) -> int:
        return int(self.get("/v1/info").json()["log_position"])


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["local", "docker", "docker-python"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One daemon at a time (module scope, parametrized): local first, then Docker with
    busybox (no python3: runs are runtime execs), then Docker with python3 (runs go through
    the sandboxes' exec agents, as on the local runtime)."""
    runtime = "docker" if str(request.param).startswith("docker") else "local"
    if runtime == "docker":
        docker_client = request.getfixturevalue("docker_client")
    image = {"local": "host", "docker": BUSYBOX_IMAGE, "docker-python": PYTHON_IMAGE}[request.param]
    if image == PYTHON_IMAGE:
        try:
            docker_client.images.get(PYTHON_IMAGE)
        except Exception as exc:
            missing("Docker test image", f"{PYTHON_IMAGE} not found ({exc}); run ops/test-images.sh")
    data = pathlib.Path(tmp_path_factory.mktemp(f"run-{request.param}")) / "data"
    daemon = Daemon(Config(data_dir=str(data), runtime=runtime, socket=False, pool_image=image,  # type: ignore[arg-type]
                           listen="127.0.0.1:0", ws_listen="127.0.0.1:0"))
    daemon.start()
    try:
        c = Client(daemon, image)
        eventually(lambda: c.pool_stats()["available"] >= 2, 60)
        yield c
    finally:
        daemon.stop()
    # the pool's idle sandboxes went with it
    if runtime == "docker":
        import docker

        engine = docker.from_env()
        try:
            left = engine.containers.list(all=True, filters={"label": f"berth.node={daemon.node_id}"})
            assert left == [], [x.name for x in left]
        finally:
            engine.close()


def test_echo_hi_from_a_warm_sandbox(client: Client) -> None:
    eventually(lambda: client.pool_stats()["available"] >= 1)
    warm = {s["id"] for s in client.get(f"/v1/containers?label={POOL_LABEL}=1").json()["items"]
            if s["status"] == "running"}
    before = client.pool_stats()
    r = client.run(command=["echo", "hi"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_code"] == 0 and body["stdout"] == "hi\n" and body["stderr"] == ""
    assert body["timed_out"] is False and body["truncated"] is False
    assert body["duration_ms"] >= 0
    assert body["pool"] == "hit"
    assert body["container_id"] in warm  # it existed before the request came
    after = client.pool_stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    eventually(lambda: client.status(body["container_id"]) == "removed")


def test_a_hit_runs_through_the_sandboxes_exec_agent_where_the_image_has_python3(client: Client) -> None:
    runtime = "docker" if client.image != "host" else "local"
    eventually(lambda: client.pool_stats()["available"] >= 1)
    before = client.pool_stats()["exec_agents"][runtime]  # execs through agents / runtime execs
    r = client.run(command=["sh", "-c", "echo $0; exit 3", "agent"])
    assert r.status_code == 200, r.text
    assert r.json()["pool"] == "hit" and r.json()["exit_code"] == 3 and r.json()["stdout"] == "agent\n"
    after = client.pool_stats()["exec_agents"][runtime]
    through_agent = client.image != BUSYBOX_IMAGE
    assert after["agent_execs"] == before["agent_execs"] + (1 if through_agent else 0)
    assert after["runtime_execs"] == before["runtime_execs"] + (0 if through_agent else 1)
    # the run is on the log as any exec: the caller's principal on intent and outcome
    events = client.get(f"/v1/events?after=0&entity={r.json()['container_id']}").json()["items"]
    execs = [e for e in events if e["type"] in ("ExecStarted", "ExecFinished")]
    assert [e["type"] for e in execs] == ["ExecStarted", "ExecFinished"]
    assert execs[1]["data"]["exit_code"] == 3
    assert execs[0]["principal"] == execs[1]["principal"] != "system"
    eventually(lambda: client.status(r.json()["container_id"]) == "removed")


def test_stdin_exit_code_and_stderr(client: Client) -> None:
    r = client.run(command=["cat"], stdin="from stdin\n")
    assert r.status_code == 200, r.text
    assert r.json()["stdout"] == "from stdin\n"
    r = client.run(command=["sh", "-c", "echo oops >&2; exit 7"])
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 7 and r.json()["stderr"] == "oops\n"
    eventually(lambda: client.status(r.json()["container_id"]) == "removed")


def test_timeout(client: Client) -> None:
    started = time.monotonic()
    r = client.run(command=["sleep", "30"], timeout=0.5)
    assert r.status_code == 200, r.text
    assert r.json()["timed_out"] is True
    assert time.monotonic() - started < 15
    eventually(lambda: client.status(r.json()["container_id"]) == "removed")


def test_fast_false_creates_a_cold_sandbox(client: Client) -> None:
    before = client.pool_stats()
    r = client.run(command=["echo", "cold"], fast=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pool"] == "cold" and body["stdout"] == "cold\n"
    after = client.pool_stats()
    assert after["cold"] == before["cold"] + 1 and after["hits"] == before["hits"]
    # a cold sandbox belongs to the caller's request: its first event is the caller's
    events = client.get(f"/v1/events?after=0&entity={body['container_id']}&limit=1").json()["items"]
    assert events[0]["type"] == "ContainerCreateRequested" and events[0]["principal"] != "system"
    eventually(lambda: client.status(body["container_id"]) == "removed")


def test_burst_misses_then_refills(client: Client) -> None:
    before = client.pool_stats()
    ids = [client.run(command=["true"]).json()["container_id"] for _ in range(4)]
    assert len(set(ids)) == 4  # never reused
    after = client.pool_stats()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 4
    eventually(lambda: client.pool_stats()["available"] >= 2, 60)
    for berth_id in ids:
        eventually(lambda berth_id=berth_id: client.status(berth_id) == "removed")  # type: ignore[misc]


@pytest.mark.parametrize("body, field", [
    ({}, "command"),
    ({"command": []}, "command"),
    ({"command": "echo hi"}, "command"),
    ({"command": ["true"], "timeout": 0}, "timeout"),
    ({"command": ["true"], "timeout": "soon"}, "timeout"),
    ({"command": ["true"], "fast": "yes"}, "fast"),
    ({"command": ["true"], "image": "Not A Ref!"}, "image"),
    ({"command": ["true"], "profile": "BAD PROFILE"}, "profile"),
    ({"command": ["true"], "stdin": 5}, "stdin"),
    ({"command": ["true"], "bogus": 1}, "bogus"),
])
def test_validation_names_the_field_and_appends_nothing(client: Client, body: dict[str, Any], field: str) -> None:
    head = client.head()
    r = client.s.post(client.base + "/v1/run", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["details"]["field"] == field
    assert client.head() == head


def test_unauthenticated_is_refused(client: Client) -> None:
    r = requests.post(client.base + "/v1/run", json={"command": ["true"]}, timeout=30)
    assert r.status_code == 401
