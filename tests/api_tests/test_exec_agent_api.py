"""``POST /v1/containers/{id}/exec`` through the containers' exec agents, over HTTP on a real
daemon (in this process), on the local runtime and on Docker: with python3 in the image
the first exec starts an agent and the next ones run through it, with the same answers and
the same events; without python3 (busybox) every exec is a runtime exec; a restarted
container gets a new agent."""

from __future__ import annotations

import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from berthd.daemon.config import Config
from berthd.daemon.lifecycle import Daemon
from berthd.kernel.exec_agent import ExecAgents, exec_agents
from tests.conftest import BUSYBOX_IMAGE, missing

PYTHON_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Client:
    def __init__(self, daemon: Daemon, runtime: str) -> None:
        self.daemon = daemon
        self.base = f"http://{daemon.endpoints['http']}"
        self.s = requests.Session()
        self.s.headers["Authorization"] = "Bearer " + (daemon.data_dir / "admin.key").read_text().strip()
        assert daemon.deps is not None
        self.agents: ExecAgents = exec_agents(daemon.deps.runtimes[runtime])

    def post(self, path: str, body: Any = None) -> requests.Response:
        return self.s.post(self.base + path, json=body, timeout=120)

    def create(self, image: str) -> str:
        r = self.post("/v1/containers", {"image": image, "command": ["sleep", "infinity"],
                                         "env": {"FROM_SPEC": "spec"}})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])

    def exec(self, berth_id: str, **body: Any) -> dict[str, Any]:
        r = self.post(f"/v1/containers/{berth_id}/exec", body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def remove(self, berth_id: str) -> None:
        self.s.delete(f"{self.base}/v1/containers/{berth_id}?force=true", timeout=120)


@pytest.fixture(scope="module", params=["local", "docker"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    runtime = str(request.param)
    if runtime == "docker":
        try:
            request.getfixturevalue("docker_client").images.get(PYTHON_IMAGE)
        except Exception as exc:
            missing("Docker test image", f"{PYTHON_IMAGE} not found ({exc}); run ops/test-images.sh")
    data = pathlib.Path(tmp_path_factory.mktemp(f"xa-{runtime}")) / "data"
    daemon = Daemon(Config(data_dir=str(data), runtime=runtime, socket=False, pool_size=0,  # type: ignore[arg-type]
                           listen="127.0.0.1:0", ws_listen="127.0.0.1:0"))
    daemon.start()
    try:
        yield Client(daemon, runtime)
    finally:
        daemon.stop()


@pytest.fixture
def python_box(client: Client) -> Iterator[str]:
    berth_id = client.create("host" if _runtime(client) == "local" else PYTHON_IMAGE)
    yield berth_id
    client.remove(berth_id)


def _runtime(client: Client) -> str:
    return client.agents.runtime.name


def test_execs_after_the_first_run_through_the_agent_with_the_same_answers(
    client: Client, python_box: str
) -> None:
    body = {"command": ["sh", "-c", "echo $FROM_SPEC $X; cat; echo err >&2; exit 4"],
            "env": {"X": "x"}, "stdin": "in\n", "workdir": "/tmp"}
    before = client.agents.stats()
    first = client.exec(python_box, **body)  # a runtime exec; it starts the agent
    eventually(lambda: client.agents.ready(python_box))
    second = client.exec(python_box, **body)
    after = client.agents.stats()
    assert after["runtime_execs"] == before["runtime_execs"] + 1
    assert after["agent_execs"] == before["agent_execs"] + 1
    for answer in (first, second):
        assert (answer["exit_code"], answer["stdout"], answer["stderr"]) == (4, "spec x\nin\n", "err\n")
        assert answer["timed_out"] is False and answer["truncated"] is False
    timed = client.exec(python_box, command=["sleep", "30"], timeout=0.5)
    assert timed["timed_out"] is True and timed["exit_code"] == 137
    missing_cmd = client.exec(python_box, command=["no-such-command"])  # the runtime's answer
    assert missing_cmd["exit_code"] in (126, 127)
    # on the log like any exec: the caller's principal on intent and outcome
    events = client.s.get(f"{client.base}/v1/events?after=0&entity={python_box}", timeout=60).json()["items"]
    ours = [e for e in events if e["type"] in ("ExecStarted", "ExecFinished")
            and e["data"].get("exec_id") == second["exec_id"]]
    assert [e["type"] for e in ours] == ["ExecStarted", "ExecFinished"]
    assert ours[1]["data"]["exit_code"] == 4 and ours[1]["data"]["stdout_bytes"] == len("spec x\nin\n")
    assert ours[0]["principal"] == ours[1]["principal"] != "system"


def test_a_restarted_container_gets_a_new_agent(client: Client, python_box: str) -> None:
    client.exec(python_box, command=["true"])
    eventually(lambda: client.agents.ready(python_box))
    r = client.post(f"/v1/containers/{python_box}/restart", {"timeout": 1})
    assert r.status_code == 200, r.text
    eventually(lambda: not client.agents.ready(python_box))  # it died with the container
    assert client.exec(python_box, command=["echo", "back"])["stdout"] == "back\n"
    eventually(lambda: client.agents.ready(python_box))
    before = client.agents.stats()["agent_execs"]
    assert client.exec(python_box, command=["echo", "agent"])["stdout"] == "agent\n"
    assert client.agents.stats()["agent_execs"] == before + 1


@pytest.mark.parametrize("action", ["kill", "delete"])
def test_an_exec_whose_container_is_killed_or_removed_answers_137_not_a_server_error(
    client: Client, action: str
) -> None:
    # a fuzzer found this as a 502: another request ended the container while its agent
    # ran a command. A runtime exec answers 200, exit code 137 and the output so far.
    berth_id = client.create("host" if _runtime(client) == "local" else PYTHON_IMAGE)
    try:
        client.exec(berth_id, command=["true"])
        eventually(lambda: client.agents.ready(berth_id))
        answers: list[requests.Response] = []
        waiter = threading.Thread(target=lambda: answers.append(client.post(
            f"/v1/containers/{berth_id}/exec", {"command": ["sh", "-c", "echo hi; sleep 60"]})))
        waiter.start()
        time.sleep(1.0)
        if action == "kill":
            r = client.post(f"/v1/containers/{berth_id}/kill")
        else:
            r = client.s.delete(f"{client.base}/v1/containers/{berth_id}?force=true", timeout=60)
        assert r.status_code in (200, 204), r.text
        waiter.join(60)
        assert len(answers) == 1 and answers[0].status_code == 200, answers and answers[0].text
        assert (answers[0].json()["exit_code"], answers[0].json()["stdout"]) == (137, "hi\n")
    finally:
        client.remove(berth_id)


def test_removing_the_container_ends_its_agent(client: Client) -> None:
    berth_id = client.create("host" if _runtime(client) == "local" else PYTHON_IMAGE)
    client.exec(berth_id, command=["true"])
    eventually(lambda: client.agents.ready(berth_id))
    client.remove(berth_id)
    assert not client.agents.ready(berth_id)


@pytest.mark.parametrize("client", ["docker"], indirect=True)  # local has only the host image
def test_an_image_without_python3_always_takes_the_runtime_exec(client: Client) -> None:
    berth_id = client.create(BUSYBOX_IMAGE)
    try:
        before = client.agents.stats()
        for _ in range(3):
            assert client.exec(berth_id, command=["echo", "hi"])["stdout"] == "hi\n"
            time.sleep(0.3)  # time for a (failing) agent start
        after = client.agents.stats()
        assert after["runtime_execs"] == before["runtime_execs"] + 3
        assert after["agent_execs"] == before["agent_execs"]
        assert not client.agents.ready(berth_id)
    finally:
        client.remove(berth_id)


def test_a_graceful_stop_ends_the_exec_agents(docker_client: Any, tmp_path: pathlib.Path) -> None:
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except Exception as exc:
        missing("Docker test image", f"{PYTHON_IMAGE} not found ({exc}); run ops/test-images.sh")
    daemon = Daemon(Config(data_dir=str(tmp_path / "data"), runtime="docker", socket=False,  # type: ignore[arg-type]
                           pool_size=0, listen="127.0.0.1:0", ws_listen="127.0.0.1:0"))
    daemon.start()
    stopped = False
    try:
        c = Client(daemon, "docker")
        berth_id = c.create(PYTHON_IMAGE)
        c.exec(berth_id, command=["true"])
        eventually(lambda: c.agents.stats()["agents"] >= 1)
        container = docker_client.containers.get(f"berth-{berth_id}")

        def agent_running() -> bool:
            return any("serve-exec" in " ".join(p) for p in container.top(ps_args="-eo pid,args")["Processes"])

        assert agent_running()
        daemon.stop()
        stopped = True
        eventually(lambda: not agent_running(), timeout=10)  # not the 60 s heartbeat timeout
        container.remove(force=True)
    finally:
        if not stopped:
            daemon.stop()
