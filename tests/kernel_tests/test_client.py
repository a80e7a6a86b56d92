"""The host-side client: finding the agent, refusing what is not one, losing and
regaining the connection, and calls from other threads while an execution runs."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from berthd.kernel import (
    AgentClient,
    AgentUnavailable,
    ConnectionLost,
    ProtocolError,
)
from tests.kernel_tests.contract import Background
from tests.kernel_tests.helpers import HostAgents


@pytest.fixture
def hosts() -> Iterator[HostAgents]:
    agents = HostAgents()
    yield agents
    agents.stop()


def test_no_agent_is_unavailable_after_the_timeout() -> None:
    began = time.monotonic()
    with pytest.raises(AgentUnavailable, match="no kernel agent answers"):
        AgentClient.connect("/tmp/berthd-no-such-dir/agent.sock", timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 2


def test_something_else_on_the_socket_is_refused() -> None:
    directory = tempfile.mkdtemp(prefix="berthd-not-agent-", dir="/tmp")
    path = os.path.join(directory, "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer_like_http() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b'{"type": "hello", "agent": "someone-else"}\n')
        conn.close()

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProtocolError, match="not a berthd kernel agent"):
            AgentClient.connect(path, timeout=5)
        # The last component must be the socket itself, never a symlink to one.
        link = os.path.join(directory, "link.sock")
        os.symlink(path, link)
        with pytest.raises(ProtocolError, match="not a unix socket"):
            AgentClient.connect(link, timeout=5)
    finally:
        thread.join(timeout=5)
        server.close()
        for name in ("agent.sock", "link.sock"):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_socket_paths_longer_than_sun_path(hosts: HostAgents) -> None:
    parent = tempfile.mkdtemp(prefix="berthd-long-", dir="/tmp")
    hosts.directories.append(parent)
    deep = os.path.join(parent, *["a-rather-long-directory-name"] * 5)
    os.makedirs(deep)
    path = hosts.start("python", directory=hosts.directory(deep))
    assert len(path) > 108
    with AgentClient.connect(path, timeout=15) as client:
        assert client.execute("6 * 7").return_value == "42"


def test_calls_from_other_threads_during_an_execution(hosts: HostAgents) -> None:
    client = AgentClient.connect(hosts.start("python"), timeout=15)
    try:
        running = Background(client, "import time\nprint('go', flush=True)\ntime.sleep(60)")
        running.wait_for_output("go")
        info = client.info()  # the main connection is busy: a side connection answers
        assert info.state == "busy" and info.current_execution is not None
        assert client.ping() < 1
        assert client.interrupt() == info.current_execution
        assert running.result().error is not None
        assert client.execute("1 + 1").return_value == "2"  # the main connection again
        with pytest.raises(ValueError):
            client.execute("1", timeout=0)
    finally:
        client.close()


def test_a_lost_agent_is_a_lost_connection_with_where_to_attach(hosts: HostAgents) -> None:
    path = hosts.start("python")
    client = AgentClient.connect(path, timeout=15)
    running = Background(client, "import time\nprint('go', flush=True)\ntime.sleep(60)")
    running.wait_for_output("go\n")  # print writes "go" and "\n" apart
    hosts.processes[0].send_signal(signal.SIGKILL)
    with pytest.raises(ConnectionLost) as lost:
        running.result()
    assert lost.value.execution_id is not None and lost.value.offset == 3
    with pytest.raises(AgentUnavailable):
        client.info()
    client.close()


def test_close_from_another_thread_abandons_the_wait(hosts: HostAgents) -> None:
    path = hosts.start("python")
    client = AgentClient.connect(path, timeout=15)
    running = Background(client, "import time\nprint('go', flush=True)\ntime.sleep(1)\n'late'")
    running.wait_for_output("go")
    began = time.monotonic()
    client.close()
    with pytest.raises(ConnectionLost) as lost:
        running.result()
    assert time.monotonic() - began < 0.5
    with AgentClient.connect(path, timeout=15) as other:  # it ran to its end all the same
        assert other.attach(str(lost.value.execution_id)).return_value == "'late'"
