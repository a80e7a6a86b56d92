"""The agent's exec mode (``agent.py serve-exec``) as a plain host subprocess, spoken to
on its stdin/stdout exactly as the daemon does over a held runtime exec: the ``run`` op
(argv, env, workdir, stdin, timeout, output cap), concurrent commands, and what happens
to commands when the agent's stream ends or the agent is killed."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from berthd.kernel import exec_agent_command, exec_agent_payload


class Agent:
    """One exec-mode agent: requests in on its stdin, answers read from its stdout."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(exec_agent_command(sys.executable)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env if env is not None else {"PATH": os.environ["PATH"]},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.outputs: dict[Any, dict[str, bytes]] = {}
        self.proc.stdin.write(exec_agent_payload())
        self.proc.stdin.flush()
        self.hello = self.read()

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def frame(self) -> dict[str, Any]:
        """The next frame as the agent sent it."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the agent ended: {self.proc.stderr.read() if self.proc.stderr else ''!r}"
        frame: dict[str, Any] = json.loads(line)
        return frame

    def read(self) -> dict[str, Any]:
        """The next answer; a result gets the ``output`` frames of its command folded in
        (``stdout``/``stderr``, base64, as the daemon assembles them)."""
        while True:
            frame = self.frame()
            if frame["type"] != "output":
                break
            kept = self.outputs.setdefault(frame["id"], {"stdout": b"", "stderr": b""})
            kept[frame["stream"]] += base64.b64decode(frame["data"])
        if frame["type"] == "result":
            kept = self.outputs.pop(frame["id"], {"stdout": b"", "stderr": b""})
            frame.update({k: base64.b64encode(v).decode() for k, v in kept.items()})
        return frame

    def run(self, argv: list[str], **fields: Any) -> dict[str, Any]:
        self.send({"op": "run", "id": "r", "argv": argv, **fields})
        frame = self.read()
        if frame["type"] == "result":
            frame["stdout"] = base64.b64decode(frame["stdout"])
            frame["stderr"] = base64.b64decode(frame["stderr"])
        return frame

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent()
    yield a
    a.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_hello_says_who_and_what(agent: Agent) -> None:
    assert agent.hello["type"] == "hello" and agent.hello["mode"] == "exec"
    assert agent.hello["agent_pid"] == agent.proc.pid
    assert agent.hello["uid"] == os.getuid()


def test_run_gives_exit_code_and_both_streams_as_bytes(agent: Agent) -> None:
    frame = agent.run(["sh", "-c", "printf 'out\\377'; echo err >&2; exit 7"])
    assert frame["type"] == "result" and frame["id"] == "r"
    assert frame["exit_code"] == 7
    assert frame["stdout"] == b"out\xff" and frame["stderr"] == b"err\n"
    assert frame["timed_out"] is False and frame["truncated"] is False
    assert frame["duration_ms"] >= 0


def test_env_is_the_agents_own_updated_by_the_request() -> None:
    # a C locale: Python coerces it (LC_CTYPE=C.UTF-8 in its environ); commands must not see that
    a = Agent(env={"PATH": os.environ["PATH"], "KEEP": "1", "OVER": "old"})
    try:
        frame = a.run(["env"], env={"OVER": "new", "ADDED": "x"})
        lines = set(frame["stdout"].decode().splitlines())
        assert lines == {f"PATH={os.environ['PATH']}", "KEEP=1", "OVER=new", "ADDED=x"}
    finally:
        a.close()


def test_workdir_stdin_and_a_signal_exit(agent: Agent, tmp_path: Any) -> None:
    assert agent.run(["pwd"], workdir=str(tmp_path))["stdout"] == f"{tmp_path}\n".encode()
    data = b"line\n" * 50_000  # more than a pipe holds: written as the command reads
    frame = agent.run(["wc", "-c"], stdin=base64.b64encode(data).decode())
    assert frame["stdout"].strip() == str(len(data)).encode()
    assert agent.run(["cat"])["stdout"] == b""  # no stdin: /dev/null, never the agent's
    assert agent.run(["sh", "-c", "kill -9 $$"])["exit_code"] == 137


def test_output_beyond_the_cap_is_dropped_and_flagged(agent: Agent) -> None:
    frame = agent.run(["sh", "-c", "yes | head -c 300000; yes e | head -c 10 >&2"], output_cap=1000)
    assert frame["stdout"] == b"y\n" * 500 and frame["stderr"] == b"e\ne\ne\ne\ne\n"
    assert frame["truncated"] is True and frame["exit_code"] == 0


def test_timeout_kills_the_whole_session(agent: Agent, tmp_path: Any) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    frame = agent.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert frame["timed_out"] is True and frame["exit_code"] == 137
    assert time.monotonic() - started < 5
    assert _wait_gone([int(pidfile.read_text())]) == []


def test_kill_on_exit_ends_what_the_command_left_running(agent: Agent, tmp_path: Any) -> None:
    pidfile = tmp_path / "pid"
    script = f"sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}"
    assert agent.run(["sh", "-c", script], kill_on_exit=True)["exit_code"] == 0
    assert _wait_gone([int(pidfile.read_text())]) == []
    # without it (Docker's exec semantics) a background process lives on, and one that
    # holds the output pipes open delays the answer by at most the drain time
    started = time.monotonic()
    frame = agent.run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; echo done"])
    assert frame["stdout"] == b"done\n" and time.monotonic() - started < 5
    survivor = int(pidfile.read_text())
    assert _alive(survivor)
    os.kill(survivor, signal.SIGKILL)


def test_a_command_that_cannot_start_is_refused_not_run(agent: Agent, tmp_path: Any) -> None:
    frame = agent.run(["/no/such/command"])
    assert frame["type"] == "error" and frame["code"] == "spawn_failed" and frame["id"] == "r"
    frame = agent.run(["true"], workdir=str(tmp_path / "missing"))
    assert frame["type"] == "error" and frame["code"] == "spawn_failed"


@pytest.mark.parametrize("fields, message", [
    ({"argv": []}, "argv"),
    ({"argv": "true"}, "argv"),
    ({"argv": ["true"], "env": {"A": 1}}, "env"),
    ({"argv": ["true"], "timeout": 0}, "timeout"),
    ({"argv": ["true"], "output_cap": -1}, "output_cap"),
    ({"argv": ["true"], "stdin": 5}, "stdin"),
])
def test_bad_requests_are_answered_and_the_agent_goes_on(
    agent: Agent, fields: dict[str, Any], message: str
) -> None:
    agent.send({"op": "run", "id": 9, **fields})
    frame = agent.read()
    assert frame["type"] == "error" and frame["code"] == "bad_request" and frame["id"] == 9
    assert message in frame["message"]
    agent.send({"op": "nope", "id": 10})
    assert agent.read()["code"] == "bad_request"
    agent.proc.stdin.write(b"not json\n")  # type: ignore[union-attr]
    agent.proc.stdin.flush()  # type: ignore[union-attr]
    assert agent.read()["code"] == "bad_request"
    assert agent.run(["true"])["exit_code"] == 0


def test_commands_run_concurrently_and_answers_carry_their_ids(agent: Agent) -> None:
    agent.send({"op": "run", "id": "slow", "argv": ["sh", "-c", "sleep 1; echo slow"]})
    agent.send({"op": "run", "id": "fast", "argv": ["echo", "fast"]})
    agent.send({"op": "ping", "id": "p"})
    frames = [agent.read() for _ in range(3)]
    assert {f["id"] for f in frames[:2]} == {"fast", "p"} and frames[2]["id"] == "slow"
    assert base64.b64decode(frames[2]["stdout"]) == b"slow\n"


def test_output_is_sent_as_it_comes_before_the_result(agent: Agent) -> None:
    # so that the daemon keeps what a command wrote when the agent dies under it
    agent.send({"op": "run", "id": "s", "argv": ["sh", "-c", "echo one; sleep 1; echo two >&2"]})
    started = time.monotonic()
    first = agent.frame()
    assert first == {"type": "output", "id": "s", "stream": "stdout",
                     "data": base64.b64encode(b"one\n").decode()}
    assert time.monotonic() - started < 0.9, "the output waited for the command's end"
    second, result = agent.frame(), agent.frame()
    assert (second["stream"], base64.b64decode(second["data"])) == ("stderr", b"two\n")
    assert result["type"] == "result" and result["exit_code"] == 0
    assert "stdout" not in result and "stderr" not in result


def test_cancel_kills_a_running_command(agent: Agent) -> None:
    agent.send({"op": "run", "id": "c", "argv": ["sleep", "300"]})
    time.sleep(0.2)
    agent.send({"op": "cancel", "id": "c"})
    frame = agent.read()
    assert frame["id"] == "c" and frame["exit_code"] == 137


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _start_sleepers(agent: Agent, n: int) -> list[int]:
    for i in range(n):
        agent.send({"op": "run", "id": i, "argv": ["sleep", "300"]})
    agent.send({"op": "ping", "id": "p"})
    assert agent.read()["type"] == "pong"  # every run request was handled
    deadline = time.monotonic() + 10
    while len(pids := _children_of(agent.proc.pid)) < n:
        assert time.monotonic() < deadline, pids
        time.sleep(0.01)
    return pids


def test_end_of_stream_kills_every_command_and_ends_the_agent(agent: Agent) -> None:
    pids = _start_sleepers(agent, 3)
    agent.proc.stdin.close()  # type: ignore[union-attr]  # the daemon closed the stream, or died
    assert agent.proc.wait(timeout=10) == 0
    assert _wait_gone(pids) == []


def test_a_sigkilled_agent_leaves_no_command_behind(agent: Agent, tmp_path: Any) -> None:
    pids = _start_sleepers(agent, 3)
    # and a command's own child, in its session
    pidfile = tmp_path / "pid"
    agent.send({"op": "run", "id": "tree", "argv": ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]})
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    grandchild = int(pidfile.read_text())
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)
    assert _wait_gone([*pids, grandchild]) == []  # the agent's guardian killed them


def test_without_a_heartbeat_the_agent_ends_and_its_commands_with_it() -> None:
    # Docker keeps an exec's stdin open after its client vanished: silence ends the agent
    proc = subprocess.Popen(
        [*exec_agent_command(sys.executable, heartbeat=1.0)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": os.environ["PATH"]})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(exec_agent_payload())
        proc.stdin.write(b'{"op": "run", "id": 1, "argv": ["sleep", "300"]}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["heartbeat"] == 1.0
        deadline = time.monotonic() + 10
        while not (children := _children_of(proc.pid)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        assert proc.wait(timeout=10) == 0  # stdin still open, but silent
        assert 0.5 < time.monotonic() - started < 5
        assert _wait_gone(children) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
