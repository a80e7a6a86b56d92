"""Exec agents in real sandboxes (Docker with the python test image, the local runtime with
bubblewrap): an exec through the held agent gives exactly what the runtime exec gives;
an image without python3 falls back to the runtime exec; an agent killed with SIGKILL
takes its commands along, the exec that was waiting answers 137 with the output so far
(as a runtime exec whose container is killed does) and the next exec works."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from berthd.kernel.exec_agent import ExecAgents
from berthd.runtime.base import (
    ContainerSpec,
    ExecResult,
    ExecSpec,
    Runtime,
    RuntimeFailure,
    SandboxNotFound,
)
from berthd.runtime.docker import DockerRuntime
from berthd.runtime.local import LocalRuntime
from tests.conftest import BUSYBOX_IMAGE, missing

PYTHON_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")
NODE = f"xa-{uuid.uuid4().hex[:6]}"


class Box:
    """A running container, its runtime and its exec agents."""

    def __init__(self, runtime: Runtime, image: str) -> None:
        self.runtime = runtime
        self.id = uuid.uuid4().hex[:12]
        runtime.create(ContainerSpec(berth_id=self.id, node_id=NODE, image=image,
                                     command=("sleep", "infinity"), env={"FROM_SPEC": "1"}))
        runtime.start(self.id)
        self.agents = ExecAgents(runtime)

    def close(self) -> None:
        self.agents.forget(self.id)
        with contextlib.suppress(SandboxNotFound):  # a test may have removed it
            self.runtime.remove(self.id, force=True)


@pytest.fixture(scope="module")
def docker_runtime(docker_client: Any) -> Iterator[Runtime]:
    try:
        docker_client.images.get(PYTHON_IMAGE)
    except Exception as exc:
        missing("Docker test image", f"{PYTHON_IMAGE} not found ({exc}); run ops/test-images.sh")
    runtime = DockerRuntime(NODE, client=docker_client)
    yield runtime
    for status in runtime.list_managed(NODE):
        runtime.remove(status.berth_id, force=True)
    runtime.close()


@pytest.fixture(scope="module")
def local_runtime() -> Iterator[Runtime]:
    if shutil.which("bwrap") is None:
        missing("bubblewrap", "`bwrap` is not on PATH (apt-get install bubblewrap)")
    root = tempfile.mkdtemp(prefix="berthd-xa-local-", dir="/tmp")
    os.chmod(root, 0o711)  # sandboxes run as per-container uids
    runtime = LocalRuntime(root, NODE, use_bwrap=True)
    yield runtime
    for status in runtime.list_managed(NODE):
        runtime.remove(status.berth_id, force=True)
    runtime.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["docker", "local"])
def box(request: pytest.FixtureRequest) -> Iterator[Box]:
    if request.param == "docker":
        b = Box(request.getfixturevalue("docker_runtime"), PYTHON_IMAGE)
    else:
        b = Box(request.getfixturevalue("local_runtime"), "host")
    try:
        assert b.agents.warm(b.id), "the agent did not start"
        yield b
    finally:
        b.close()


SPECS = [
    ExecSpec(("true",)),
    ExecSpec(("sh", "-c", "echo $FROM_SPEC $X $HOME; id -u; pwd; cat; echo err >&2; exit 3"),
             env={"X": "y"}, stdin=b"in\n", workdir="/tmp"),
    ExecSpec(("sh", "-c", "env | sort")),
    ExecSpec(("sh", "-c", "yes | head -c 100000"), output_cap=10),
    ExecSpec(("sleep", "30"), timeout=0.5),
    ExecSpec(("no-such-command",)),
    ExecSpec(("true",), workdir="/no/such/dir"),
]


def _outcome(call: Any) -> tuple[Any, ...]:
    try:
        r = call()
    except Exception as exc:  # a refusal is an outcome too: the same one either way
        return (type(exc), str(exc))
    return (r.exit_code, r.stdout, r.stderr, r.truncated, r.timed_out)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: " ".join(s.command)[:30])
def test_an_exec_through_the_agent_gives_what_the_runtime_exec_gives(box: Box, spec: ExecSpec) -> None:
    through_agent = _outcome(lambda: box.agents.exec(box.id, spec))
    assert through_agent == _outcome(lambda: box.runtime.exec(box.id, spec))


def test_execs_go_through_the_held_agent(box: Box) -> None:
    before = box.agents.stats()
    results = []

    def one() -> None:
        results.append(box.agents.exec(box.id, ExecSpec(("sh", "-c", "sleep 0.3; echo ok"))))

    threads = [threading.Thread(target=one) for _ in range(4)]  # concurrent, one stream
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [b"ok\n"] * 4
    after = box.agents.stats()
    assert after["agent_execs"] == before["agent_execs"] + 4
    assert after["runtime_execs"] == before["runtime_execs"]


def test_an_image_without_python3_uses_the_runtime_exec(docker_runtime: Runtime) -> None:
    b = Box(docker_runtime, BUSYBOX_IMAGE)
    try:
        assert b.agents.warm(b.id) is False
        result = b.agents.exec(b.id, ExecSpec(("echo", "hi")))
        assert result.exit_code == 0 and result.stdout == b"hi\n"
        assert b.agents.stats() == {"agents": 0, "agent_execs": 0, "runtime_execs": 1}
        assert b.agents.warm(b.id) is False  # remembered: no second attempt
    finally:
        b.close()


def test_the_first_exec_starts_an_agent_for_the_next_ones(local_runtime: Runtime) -> None:
    b = Box(local_runtime, "host")
    try:
        assert b.agents.exec(b.id, ExecSpec(("true",))).exit_code == 0  # the runtime exec
        deadline = time.monotonic() + 30
        while not b.agents.ready(b.id):
            assert time.monotonic() < deadline, "no agent was started"
            time.sleep(0.02)
        assert b.agents.exec(b.id, ExecSpec(("true",))).exit_code == 0
        assert b.agents.stats()["agent_execs"] == 1
    finally:
        b.close()


def _host_pids(argv: list[str]) -> list[tuple[int, int]]:
    """(pid, ppid) of the host processes whose command line is ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != wanted:
                    continue
            with open(f"/proc/{entry}/stat") as f:
                found.append((int(entry), int(f.read().rsplit(")", 1)[1].split()[1])))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _exec_in_background(box: Box, spec: ExecSpec) -> tuple[threading.Thread, list[Any]]:
    outcome: list[BaseException | ExecResult] = []

    def wait_for_it() -> None:
        try:
            outcome.append(box.agents.exec(box.id, spec))
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    return waiter, outcome


def _started(argv: list[str]) -> tuple[int, int]:
    """(pid, ppid) of the command once it runs, and what it wrote before had time to
    reach the daemon."""
    deadline = time.monotonic() + 20
    while not (found := _host_pids(argv)):
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.02)
    time.sleep(0.3)
    return found[0]


def test_a_sigkilled_agent_kills_its_command_which_answers_137_with_its_output(box: Box) -> None:
    # the agent's guardian SIGKILLs the command: 137 and what it wrote, as a runtime exec
    # whose process was killed answers (never a made-up success)
    argv = ["sleep", f"3000.{random.randrange(10**6):06d}"]  # findable on the host
    waiter, outcome = _exec_in_background(box, ExecSpec(("sh", "-c", f"echo before; exec {' '.join(argv)}")))
    command, agent = _started(argv)
    os.kill(agent, signal.SIGKILL)
    waiter.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ExecResult), outcome
    assert (outcome[0].exit_code, outcome[0].stdout, outcome[0].timed_out) == (137, b"before\n", False)
    deadline = time.monotonic() + 10
    while _alive(command) or _alive(agent):
        assert time.monotonic() < deadline, "the agent's command survived it"
        time.sleep(0.02)
    # the next exec works (the runtime exec), and a new agent takes over after it
    assert box.agents.exec(box.id, ExecSpec(("echo", "again"))).stdout == b"again\n"
    assert box.agents.warm(box.id)
    assert box.agents.exec(box.id, ExecSpec(("echo", "back"))).stdout == b"back\n"


@pytest.mark.parametrize("how", ["kill", "remove"])
def test_a_container_killed_under_an_exec_answers_as_the_runtime_exec_does(box: Box, how: str) -> None:
    # what the fuzzer once found as a 502: the container goes away while its agent runs
    # a command. A runtime exec answers 137 and the output so far; so does the agent.
    argv = ["sleep", f"3000.{random.randrange(10**6):06d}"]
    waiter, outcome = _exec_in_background(box, ExecSpec(("sh", "-c", f"echo hi; exec {' '.join(argv)}")))
    _started(argv)
    if how == "kill":
        box.runtime.kill(box.id)
    else:
        box.runtime.remove(box.id, force=True)
    waiter.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ExecResult), outcome
    assert (outcome[0].exit_code, outcome[0].stdout) == (137, b"hi\n")
    assert not box.agents.ready(box.id)


def test_forget_ends_the_agent(box: Box) -> None:
    argv = ["sleep", f"3000.{random.randrange(10**6):06d}"]
    waiter, outcome = _exec_in_background(box, ExecSpec(tuple(argv)))
    command, agent = _started(argv)
    box.agents.forget(box.id)
    waiter.join(30)
    assert len(outcome) == 1 and getattr(outcome[0], "exit_code", None) == 137, outcome
    deadline = time.monotonic() + 10
    while _alive(command) or _alive(agent):
        assert time.monotonic() < deadline, "the agent or its command survived"
        time.sleep(0.02)
    assert not box.agents.ready(box.id)


def test_a_runtime_exec_after_a_stop_or_a_removal_is_refused(docker_runtime: Runtime) -> None:
    # the Docker runtime remembers the engine id of a container it exec'd in (no inspect per
    # exec): the engine's own refusals must still come out as before
    b = Box(docker_runtime, BUSYBOX_IMAGE)
    try:
        assert b.agents.exec(b.id, ExecSpec(("true",))).exit_code == 0
        docker_runtime.stop(b.id, timeout=1)
        with pytest.raises(RuntimeFailure, match="not running"):
            b.agents.exec(b.id, ExecSpec(("true",)))
        docker_runtime.start(b.id)
        assert b.agents.exec(b.id, ExecSpec(("echo", "again"))).stdout == b"again\n"
    finally:
        b.close()
    with pytest.raises(SandboxNotFound):
        docker_runtime.exec(b.id, ExecSpec(("true",)))


def test_the_daemon_keeps_no_more_than_the_cap_whatever_the_agent_sends() -> None:
    # the agent caps output itself, but anything in the sandbox may write to its stdout:
    # the daemon's own copy is capped too
    from berthd.kernel.exec_agent import _Run

    run = _Run(cap=10)
    for _ in range(1000):
        run.add("stdout", b"x" * 4096)
    run.add("stderr", b"e" * 3)
    assert (bytes(run.stdout), bytes(run.stderr), run.truncated) == (b"x" * 10, b"eee", True)
    exact = _Run(cap=4)
    exact.add("stdout", b"abcd")
    assert (bytes(exact.stdout), exact.truncated) == (b"abcd", False)
