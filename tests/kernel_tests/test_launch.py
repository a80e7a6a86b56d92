"""Kernels in real sandboxes: the kernel contract inside a Docker container and inside a
local (bubblewrap) container, agents started by exec, and - the point of it all - kernel
state surviving a daemon killed with SIGKILL in the middle of an execution."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from berthd.kernel import (
    AgentClient,
    AgentPaths,
    AgentUnavailable,
    KernelDead,
    install_agent,
    kernel_spec,
    locate_agent,
    start_agent_by_exec,
)
from berthd.runtime.base import ContainerSpec, Mount, Runtime, RuntimeFailure
from berthd.runtime.docker import DockerRuntime
from berthd.runtime.fake import FakeRuntime
from berthd.runtime.local import LocalRuntime
from berthd.runtime.security import build_policy
from tests.conftest import missing
from tests.kernel_tests.contract import KILL_GRACE, Collector, KernelContract

REPO = Path(__file__).resolve().parents[2]
PYTHON_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")
NODE = f"kt-{uuid.uuid4().hex[:6]}"
EMPTY_BIN = os.path.join(tempfile.mkdtemp(prefix="berthd-no-bash-"), "bin")


def _bash_mounts() -> tuple[Mount, ...]:
    """The host's bash bound read-only at /usr/bin/bash (ahead of the image's /bin/bash on
    PATH): the bash kernel tests also cover a bash that comes from a host mount."""
    bash = shutil.which("bash")
    assert bash is not None
    return (Mount(host_path=os.path.realpath(bash), container_path="/usr/bin/bash", mode="ro"),)


@dataclass(frozen=True)
class Hosted:
    """A runtime, and the Python expression that builds another one like it (for the
    "daemon" subprocesses)."""

    runtime: Runtime
    constructor: str


def _cleanup(runtime: Runtime) -> None:
    for status in runtime.list_managed(NODE):
        runtime.remove(status.berth_id, force=True)
    runtime.close()


@pytest.fixture(scope="module")
def docker(docker_client: Any) -> Iterator[Hosted]:
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except Exception as exc:
        missing("Docker test image", f"{PYTHON_IMAGE} not found ({exc}); run ops/test-images.sh")
    root = tempfile.mkdtemp(prefix="berthd-kernel-docker-")
    runtime = DockerRuntime(NODE, client=docker_client, berth_root=root)
    # the bash kernels mount the host's bash, the no-bash test an empty /bin: both are roots
    os.mkdir(EMPTY_BIN)
    runtime.security = build_policy(mount_roots=[os.path.dirname(_bash_mounts()[0].host_path),
                                                 os.path.dirname(EMPTY_BIN)])
    yield Hosted(runtime, f"DockerRuntime({NODE!r}, berth_root={root!r})")
    _cleanup(runtime)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(os.path.dirname(EMPTY_BIN), ignore_errors=True)


@pytest.fixture(scope="module")
def local() -> Iterator[Hosted]:
    if shutil.which("bwrap") is None:
        missing("bubblewrap", "`bwrap` is not on PATH (apt-get install bubblewrap)")
    root = tempfile.mkdtemp(prefix="berthd-kernel-local-", dir="/tmp")
    os.chmod(root, 0o711)  # sandboxes run as per-container uids
    runtime = LocalRuntime(root, NODE, use_bwrap=True)
    yield Hosted(runtime, f"LocalRuntime({root!r}, {NODE!r}, use_bwrap=True)")
    _cleanup(runtime)
    shutil.rmtree(root, ignore_errors=True)


def start_kernel(
    runtime: Runtime, image: str, language: str, mounts: tuple[Mount, ...] = ()
) -> tuple[str, AgentPaths]:
    """A container whose main command is a kernel agent: its id and the agent's paths."""
    berth_id, kernel_id = uuid.uuid4().hex[:12], "k" + uuid.uuid4().hex[:8]
    base = ContainerSpec(berth_id=berth_id, node_id=NODE, image=image, mounts=mounts)
    runtime.create(kernel_spec(base, kernel_id, language, kill_grace=KILL_GRACE))
    paths = install_agent(runtime, berth_id, kernel_id)
    runtime.start(berth_id)
    return berth_id, paths


class _RuntimeKernels(KernelContract):
    image: str
    mounts: tuple[Mount, ...] = ()
    runtime: Runtime

    def start_agent(self, language: str) -> str:
        berth_id, paths = start_kernel(self.runtime, self.image, language, self.mounts)
        self.containers = [*getattr(self, "containers", []), berth_id]
        return paths.socket_path

    def stop_agents(self) -> None:
        for berth_id in getattr(self, "containers", []):
            self.runtime.remove(berth_id, force=True)
        self.containers = []


class TestDockerKernel(_RuntimeKernels):
    image = PYTHON_IMAGE
    mounts = _bash_mounts()

    @pytest.fixture(autouse=True)
    def _runtime(self, docker: Hosted) -> None:
        self.runtime = docker.runtime


class TestLocalKernel(_RuntimeKernels):
    image = "host"

    @pytest.fixture(autouse=True)
    def _runtime(self, local: Hosted) -> None:
        self.runtime = local.runtime


# -------------------------------------------------------------------- surviving the daemon

LONG_RUN = textwrap.dedent(
    """
    import time
    for i in range(100):
        print(f"line {i}", flush=True)
        time.sleep(0.01)
    x + 1
    """
)

# A "daemon": starts a kernel container, sets x = 41, starts a long execution and is
# SIGKILLed in the middle of it, after printing how far its output got.
DAEMON = textwrap.dedent(
    """
    import os, signal
    from berthd.kernel import AgentClient, install_agent, kernel_spec
    from berthd.runtime.base import ContainerSpec
    from berthd.runtime.docker import DockerRuntime
    from berthd.runtime.local import LocalRuntime
    runtime = {runtime}
    base = ContainerSpec(berth_id={berth_id!r}, node_id={node!r}, image={image!r})
    runtime.create(kernel_spec(base, "k1", "python"))
    paths = install_agent(runtime, {berth_id!r}, "k1")
    runtime.start({berth_id!r})
    client = AgentClient.connect(paths.socket_path, timeout=30)
    client.execute("x = 41")
    seen = []
    def on_output(stream, text):
        seen.append(text)
        if len("".join(seen)) >= 30:
            print(len("".join(seen)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    client.execute({code!r}, on_output=on_output, execution_id="in-flight")
    """
)


def _survives_a_sigkilled_daemon(hosted: Hosted, image: str) -> None:
    runtime = hosted.runtime
    berth_id = uuid.uuid4().hex[:12]
    script = DAEMON.format(
        runtime=hosted.constructor, berth_id=berth_id, node=NODE, image=image, code=LONG_RUN
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    offset = int(done.stdout)
    # A new daemon: finds the agent from the container id and kernel id alone.
    client = AgentClient.connect(locate_agent(runtime, berth_id, "k1").socket_path, timeout=10)
    try:
        rest = Collector()
        result = client.attach("in-flight", offset, rest)
        expected = "".join(f"line {i}\n" for i in range(100))
        assert result.stdout == expected
        assert rest.text() == expected[offset:]  # from where the dead daemon stopped
        assert result.return_value == "42"
        assert client.execute("x + 1").return_value == "42"
    finally:
        client.close()
        runtime.remove(berth_id, force=True)


def test_docker_kernel_survives_a_sigkilled_daemon(docker: Hosted) -> None:
    _survives_a_sigkilled_daemon(docker, PYTHON_IMAGE)


def test_local_kernel_survives_a_sigkilled_daemon(local: Hosted) -> None:
    _survives_a_sigkilled_daemon(local, "host")


# -------------------------------------------------------------------- starting agents


def test_agents_started_by_exec_in_a_running_docker_container(docker: Hosted) -> None:
    docker_runtime = docker.runtime
    berth_id = uuid.uuid4().hex[:12]
    spec = ContainerSpec(
        berth_id=berth_id,
        node_id=NODE,
        image=PYTHON_IMAGE,
        command=("sleep", "300"),
        berth_dir=True,
        mounts=_bash_mounts(),
    )
    docker_runtime.create(spec)
    docker_runtime.start(berth_id)
    try:
        python = start_agent_by_exec(docker_runtime, berth_id, "py", "python", kill_grace=1)
        shell = start_agent_by_exec(docker_runtime, berth_id, "sh", "bash")
        with AgentClient.connect(python.socket_path, timeout=10) as client:
            client.execute("x = 41")
        # The execs are over; the agents live on in the container, found again by id.
        with AgentClient.connect(locate_agent(docker_runtime, berth_id, "py").socket_path) as c:
            assert c.execute("x + 1").return_value == "42"
        with AgentClient.connect(shell.socket_path, timeout=10) as client:
            client.execute("cd /tmp && export N=1")
            assert client.execute('echo "$PWD $N"').stdout == "/tmp 1\n"
        with pytest.raises(RuntimeFailure, match="another agent already listens"):
            start_agent_by_exec(docker_runtime, berth_id, "py", "python")
        with pytest.raises(RuntimeFailure, match="no such file"):
            start_agent_by_exec(docker_runtime, berth_id, "bad", "python", python="/no/such/python")
    finally:
        docker_runtime.remove(berth_id, force=True)


def _agents_by_exec(runtime: Runtime, berth_id: str) -> None:
    python = start_agent_by_exec(runtime, berth_id, "py", "python", kill_grace=1)
    with AgentClient.connect(python.socket_path, timeout=10) as client:
        client.execute("x = 41")
    # The call is over; the agent lives on in the container, found again by id.
    with AgentClient.connect(locate_agent(runtime, berth_id, "py").socket_path) as c:
        assert c.execute("x + 1").return_value == "42"
    with pytest.raises(RuntimeFailure, match="another agent already listens"):
        start_agent_by_exec(runtime, berth_id, "py", "python")
    with pytest.raises(RuntimeFailure, match="not found"):
        start_agent_by_exec(runtime, berth_id, "bad", "python", python="/no/such/python", timeout=5)
    with pytest.raises(RuntimeFailure, match="did not start"):  # runs, but never listens
        start_agent_by_exec(runtime, berth_id, "mute", "python", python="false", timeout=2)


def _processes_of(uid: int) -> list[str]:
    """What runs as ``uid`` (ps), zombies left out."""
    listing = subprocess.run(["ps", "-o", "stat=,args=", "-u", str(uid)], capture_output=True, text=True)
    return [line for line in listing.stdout.splitlines() if line.strip() and not line.strip().startswith("Z")]


def test_agents_started_by_exec_in_a_running_local_container(local: Hosted) -> None:
    local_runtime = local.runtime
    berth_id = uuid.uuid4().hex[:12]
    spec = ContainerSpec(
        berth_id=berth_id, node_id=NODE, image="host", command=("sleep", "300"), berth_dir=True
    )
    local_runtime.create(spec)
    local_runtime.start(berth_id)
    try:
        _agents_by_exec(local_runtime, berth_id)
        with AgentClient.connect(locate_agent(local_runtime, berth_id, "py").socket_path) as c:
            assert c.execute("__import__('os').getuid()").return_value == "65534"
        uid = json.loads(Path(local_runtime.inspect(berth_id).runtime_ref or "", "spec.json").read_text())["uid"]
        assert _processes_of(uid)
        local_runtime.stop(berth_id, timeout=2)
        assert _processes_of(uid) == []  # the agent and its worker ended with the container
        with pytest.raises(AgentUnavailable):
            AgentClient.connect(locate_agent(local_runtime, berth_id, "py").socket_path, timeout=1)
    finally:
        local_runtime.remove(berth_id, force=True)


def test_agents_started_by_exec_in_a_running_fake_container() -> None:
    runtime = FakeRuntime(NODE)
    berth_id = uuid.uuid4().hex[:12]
    runtime.create(ContainerSpec(berth_id=berth_id, node_id=NODE, image="host", berth_dir=True,
                                 command=("sleep", "300")))
    runtime.start(berth_id)
    try:
        _agents_by_exec(runtime, berth_id)
    finally:
        runtime.remove(berth_id, force=True)
        runtime.close()


def test_a_bash_kernel_without_bash_is_dead(docker: Hosted) -> None:
    docker_runtime = docker.runtime
    # the image has bash in /bin (and nowhere else): an empty /bin over it leaves python3
    # (in /usr/bin) and takes bash away
    no_bash = (Mount(host_path=EMPTY_BIN, container_path="/bin", mode="ro"),)
    berth_id, paths = start_kernel(docker_runtime, PYTHON_IMAGE, "bash", no_bash)
    try:
        with AgentClient.connect(paths.socket_path, timeout=15) as client:
            assert client.hello.state == "dead"
            with pytest.raises(KernelDead, match="not on PATH"):
                client.execute("echo hi")
    finally:
        docker_runtime.remove(berth_id, force=True)


def test_shutdown_ends_the_kernel_container(local: Hosted) -> None:
    local_runtime = local.runtime
    berth_id, paths = start_kernel(local_runtime, "host", "python")
    try:
        client = AgentClient.connect(paths.socket_path, timeout=15)
        assert client.execute("import os\nos.getcwd()").return_value == "'/workspace'"
        assert client.execute("os.getuid()").return_value == "65534"  # bubblewrap's user
        client.shutdown()
        deadline = time.monotonic() + 10
        status = local_runtime.inspect(berth_id)
        while status.state == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
            status = local_runtime.inspect(berth_id)
        assert status.state == "exited" and status.exit_code == 0
    finally:
        local_runtime.remove(berth_id, force=True)


def test_the_fake_runtime_hosts_kernels_too() -> None:
    runtime = FakeRuntime(NODE)
    try:
        berth_id, paths = start_kernel(runtime, "host", "python")
        with AgentClient.connect(paths.socket_path, timeout=15) as client:
            client.execute("x = 41")
        found = locate_agent(runtime, berth_id, paths.kernel_id)
        with AgentClient.connect(found.socket_path) as client:
            assert client.execute("x + 1").return_value == "42"
            assert client.restart().execution_count == 0
    finally:
        runtime.close()
