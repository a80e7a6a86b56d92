"""The agent as a plain host subprocess: the contract, plus what only the agent itself
shows (its protocol on the wire, its socket, signals, the oldest Python it supports)."""

from __future__ import annotations

import ast
import glob
import json
import os
import signal
import socket
import time

import pytest

from berthd.kernel import AgentClient, agent_source
from tests.kernel_tests.contract import KernelContract
from tests.kernel_tests.helpers import HostAgents


class TestHostAgent(KernelContract):
    def start_agent(self, language: str) -> str:
        if not hasattr(self, "hosts"):
            self.hosts = HostAgents()
        return self.hosts.start(language)

    def stop_agents(self) -> None:
        if hasattr(self, "hosts"):
            self.hosts.stop()


@pytest.fixture
def hosts() -> HostAgents:
    agents = HostAgents()
    yield agents
    agents.stop()


def _raw(path: str) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock, sock.makefile("rb")


def _ask(sock: socket.socket, reader: object, request: object) -> dict[str, object]:
    sock.sendall((json.dumps(request) + "\n").encode())
    line = reader.readline()  # type: ignore[attr-defined]
    return json.loads(line)


def test_the_agent_is_python_3_8_syntax() -> None:
    ast.parse(agent_source(), "agent.py", feature_version=(3, 8))


def _oldest_python() -> str | None:
    found = sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3.8")) + sorted(
        glob.glob("/usr/bin/python3.[89]")
    )
    return found[0] if found else None


def test_the_agent_runs_on_python_3_8(hosts: HostAgents) -> None:
    python = _oldest_python()
    if python is None:
        pytest.skip("no Python 3.8/3.9 on this machine (pyenv or /usr/bin) to try the agent with")
    with AgentClient.connect(hosts.start("python", python=python), timeout=15) as client:
        assert client.hello.interpreter is not None
        assert client.hello.interpreter.startswith("Python 3.")
        client.execute("x = 41")
        assert client.execute("x + 1").return_value == "42"
        timed_out = client.execute("import time\ntime.sleep(30)", timeout=0.3)
        assert timed_out.status == "timeout"
        assert client.execute("x").return_value == "41"
    with AgentClient.connect(hosts.start("bash", python=python), timeout=15) as client:
        client.execute("cd /tmp")
        assert client.execute("pwd; sleep 30", timeout=0.3).status == "timeout"
        assert client.execute("pwd").stdout == "/tmp\n"


def test_protocol_errors_do_not_hurt(hosts: HostAgents) -> None:
    path = hosts.start("python")
    AgentClient.connect(path, timeout=15).close()  # waits until it listens
    sock, reader = _raw(path)
    try:
        sock.sendall(b"this is not json\n")
        assert json.loads(reader.readline())["code"] == "bad_request"  # type: ignore[attr-defined]
        assert _ask(sock, reader, {"op": "dance"})["code"] == "bad_request"
        assert _ask(sock, reader, {"op": "execute", "code": 1})["code"] == "bad_request"
        assert _ask(sock, reader, {"op": "execute", "code": "1", "timeout": -1})["code"] == (
            "bad_request"
        )
        assert _ask(sock, reader, {"op": "attach", "execution_id": "nope"})["code"] == (
            "unknown_execution"
        )
        started = _ask(sock, reader, {"op": "execute", "code": "2 * 21", "stream": False})
        assert started["type"] == "started"
        result = json.loads(reader.readline())  # type: ignore[attr-defined]
        assert result["type"] == "result" and result["return_value"] == "42"
        duplicate = _ask(
            sock,
            reader,
            {"op": "execute", "code": "other", "execution_id": started["execution_id"]},
        )
        assert duplicate["code"] == "duplicate_execution"
    finally:
        sock.close()


def test_one_agent_per_socket_and_stale_sockets(hosts: HostAgents) -> None:
    directory = hosts.directory()
    path = hosts.start("python", directory=directory)
    with AgentClient.connect(path, timeout=15) as client:
        client.execute("x = 1")
        second = hosts.start("python", directory=directory)  # same socket: refused
        assert hosts.processes[-1].wait(timeout=10) == 1
        assert "another agent already listens" in hosts.log(second)
        assert client.execute("x").return_value == "1"
        first = hosts.processes[0]
        first.send_signal(signal.SIGKILL)  # leaves its socket file behind
        first.wait()
    hosts.start("python", directory=directory)
    with AgentClient.connect(path, timeout=15) as client:
        assert client.execute("1").status == "ok"


def test_sigterm_stops_agent_and_interpreter(hosts: HostAgents) -> None:
    path = hosts.start("python")
    with AgentClient.connect(path, timeout=15) as client:
        worker = client.info().worker_pid
        assert worker is not None
        client.execute("import subprocess\np = subprocess.Popen(['sleep', '60'])")
        child = int(client.execute("p.pid").return_value or 0)
    agent = hosts.processes[0]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=10) == 128 + signal.SIGTERM
    assert not os.path.exists(path)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        os.path.exists(f"/proc/{p}") for p in (worker, child)
    ):
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{worker}") and not os.path.exists(f"/proc/{child}")


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("language", ["python", "bash"])
def test_no_worker_outlives_an_agent_killed_with_sigkill(hosts: HostAgents, language: str) -> None:
    """SIGKILL leaves the agent no chance to clean up: its worker must still end (the
    worker's parent-death signal), not spin on a dead control pipe."""
    path = hosts.start(language)
    with AgentClient.connect(path, timeout=15) as client:
        worker = client.info().worker_pid
        assert worker is not None and not _zombie_or_gone(worker)
        client.execute("x = 1" if language == "python" else "X=1")
    agent = hosts.processes[0]
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _zombie_or_gone(worker):
        time.sleep(0.02)
    assert _zombie_or_gone(worker), f"the {language} worker {worker} outlived its agent"


def test_a_missing_shell_is_a_dead_kernel(hosts: HostAgents) -> None:
    path = hosts.start("bash", extra=("--shell", "no-such-shell-berth"))
    with AgentClient.connect(path, timeout=15) as client:
        info = client.info()
        assert info.state == "dead"
        assert info.dead_reason is not None and "no-such-shell-berth" in info.dead_reason
        with pytest.raises(Exception, match="no-such-shell-berth"):
            client.execute("echo hi")


def test_shutdown(hosts: HostAgents) -> None:
    path = hosts.start("bash")
    client = AgentClient.connect(path, timeout=15)
    client.execute("echo hi")
    client.shutdown()
    assert hosts.processes[0].wait(timeout=10) == 0
