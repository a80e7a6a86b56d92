"""The kernel contract: what a kernel agent does wherever it is hosted (STYLE.md §7).

A concrete class subclasses ``KernelContract`` and implements ``start_agent(language)``
(start an agent, return its socket path on the host) and ``stop_agents()``. The same
tests then run on the host (a plain subprocess), in Docker and in the local runtime,
where process trees, pid namespaces and the shared directory really differ.

Agents run with a kill grace of 1 s (how long an interpreter has to stop after an
interrupt before it is killed) to keep the suite fast.
"""

from __future__ import annotations

import re
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from berthd.kernel import (
    AgentClient,
    ExecutionResult,
    KernelBusy,
    KernelDead,
    UnknownExecution,
)

KILL_GRACE = 1.0

# Defined in a kernel: is this pid a live (not zombie) process, seen from inside?
ALIVE = textwrap.dedent(
    """
    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")
    """
)


class Collector:
    """An ``on_output`` callback that keeps what it got."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, str]] = []
        self.event = threading.Event()
        self.wanted: str | None = None

    def __call__(self, stream: str, text: str) -> None:
        self.chunks.append((stream, text))
        if self.wanted is not None and self.wanted in self.text():
            self.event.set()

    def text(self, stream: str | None = None) -> str:
        return "".join(t for s, t in self.chunks if stream is None or s == stream)


class Background:
    """Run ``execute`` on a thread; ``result()`` re-raises what it raised."""

    def __init__(self, client: AgentClient, code: str, **options: object) -> None:
        self.output = Collector()
        self._outcome: list[object] = []
        self._thread = threading.Thread(target=self._run, args=(client, code, options), daemon=True)
        self._thread.start()

    def _run(self, client: AgentClient, code: str, options: dict[str, object]) -> None:
        try:
            self._outcome.append(client.execute(code, on_output=self.output, **options))  # type: ignore[arg-type]
        except BaseException as exc:
            self._outcome.append(exc)

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        self.output.wanted = text
        if text in self.output.text():
            return
        assert self.output.event.wait(timeout), f"no {text!r} in {self.output.text()!r}"

    def result(self, timeout: float = 30.0) -> ExecutionResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the execution did not end"
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, ExecutionResult)
        return outcome


class KernelContract:
    """Not collected itself (no ``Test`` prefix)."""

    # ---------------------------------------------------------------- hooks

    def start_agent(self, language: str) -> str:
        """Start an agent with ``--kill-grace KILL_GRACE``; return its socket path."""
        raise NotImplementedError

    def stop_agents(self) -> None:
        """Remove every agent (and its sandbox) this test started."""
        raise NotImplementedError

    # ---------------------------------------------------------------- fixtures

    @pytest.fixture(autouse=True)
    def _kernels(self) -> Iterator[None]:
        self.clients: list[AgentClient] = []
        try:
            yield
        finally:
            for client in self.clients:
                client.close()
            self.stop_agents()

    def connect(self, path: str) -> AgentClient:
        client = AgentClient.connect(path, timeout=30)
        self.clients.append(client)
        return client

    @pytest.fixture
    def python(self) -> AgentClient:
        self.python_path = self.start_agent("python")
        return self.connect(self.python_path)

    @pytest.fixture
    def bash(self) -> AgentClient:
        self.bash_path = self.start_agent("bash")
        return self.connect(self.bash_path)

    # ---------------------------------------------------------------- python

    def test_info(self, python: AgentClient) -> None:
        info = python.info()
        assert info.language == "python"
        assert info.state == "idle"
        assert info.interpreter is not None and info.interpreter.startswith("Python 3.")
        assert info.execution_count == 0 and info.current_execution is None
        assert info.kill_grace == KILL_GRACE
        assert python.ping() < 1.0

    def test_state_and_return_values(self, python: AgentClient) -> None:
        first = python.execute("x = 41")
        assert (first.status, first.return_value, first.execution_count) == ("ok", None, 1)
        second = python.execute("x + 1")
        assert (second.status, second.return_value, second.execution_count) == ("ok", "42", 2)
        assert python.execute("'a' + 'b'").return_value == "'ab'"
        assert python.execute("None").return_value is None
        assert python.execute("import os\nclass C:\n    pass\nC()").return_value.startswith(
            "<__main__.C object"
        )
        last = python.execute("def f():\n    return x\nf() * 2")
        assert last.return_value == "82"
        assert last.execution_count == 6
        assert last.duration_ms > 0 and last.error is None and last.exit_code is None
        # Classes defined by the code pickle: __main__ is the kernel's namespace.
        assert python.execute("import pickle\npickle.loads(pickle.dumps(C())).__class__.__name__")
        assert python.info().execution_count == 7

    def test_stdout_stderr_and_subprocess_output(self, python: AgentClient) -> None:
        output = Collector()
        code = textwrap.dedent(
            """
            import subprocess, sys
            print("out 1")
            print("err 1", file=sys.stderr)
            subprocess.run(["sh", "-c", "echo child out; echo child err >&2"])
            sys.stdout.write("héllo ✓\\n")
            sys.stdout.buffer.write(b"raw bytes\\n")
            """
        )
        result = python.execute(code, on_output=output)
        assert result.status == "ok", result
        assert result.stdout == "out 1\nchild out\nhéllo ✓\nraw bytes\n"
        assert result.stderr == "err 1\nchild err\n"
        assert output.text("stdout") == result.stdout
        assert output.text("stderr") == result.stderr
        assert result.output_length == len(result.stdout) + len(result.stderr)
        assert not result.truncated

    def test_exceptions(self, python: AgentClient) -> None:
        python.execute("x = 1")
        error = python.execute("print('before')\n1/0")
        assert error.status == "error" and error.stdout == "before\n"
        assert error.error is not None
        assert (error.error.ename, error.error.evalue) == ("ZeroDivisionError", "division by zero")
        assert "<cell-2>" in error.error.traceback and "1/0" in error.error.traceback
        assert "agent.py" not in error.error.traceback
        syntax = python.execute("def f(:")
        assert syntax.status == "error" and syntax.error is not None
        assert syntax.error.ename == "SyntaxError" and "agent.py" not in syntax.error.traceback
        leaving = python.execute("import sys\nsys.exit(3)")
        assert leaving.status == "error" and leaving.error is not None
        assert leaving.error.ename == "SystemExit"
        assert python.execute("x").return_value == "1"  # still alive, state intact
        assert python.execute("x").execution_count == 6

    def test_output_cap(self, python: AgentClient) -> None:
        result = python.execute(
            "import sys\nprint('x' * 5000)\nprint('e' * 10, file=sys.stderr)", output_cap=1000
        )
        assert result.truncated
        assert result.stdout == "x" * 1000
        assert result.stderr == "e" * 10 + "\n"
        value = python.execute("'y' * 5000", output_cap=100)
        assert value.truncated and value.return_value == ("'" + "y" * 5000)[:100]
        assert not python.execute("print('short')").truncated

    def test_timeout_kills_the_process_tree_and_keeps_state(self, python: AgentClient) -> None:
        python.execute(ALIVE + "\nx = 41")
        keeper = python.execute("import subprocess\nkeeper = subprocess.Popen(['sleep', '60'])")
        assert keeper.status == "ok"
        # A grandchild in a session of its own, that ignores SIGINT and whose parent has
        # exited (so it is an orphan): only the tree walk + subreaper can find it.
        code = textwrap.dedent(
            """
            import subprocess, time
            subprocess.run(
                ["sh", "-c", "(trap '' INT; exec sleep 60) & echo $!"], start_new_session=True
            )
            print("started", flush=True)
            time.sleep(60)
            print("not reached")
            """
        )
        began = time.monotonic()
        result = python.execute(code, timeout=1.0)
        assert time.monotonic() - began < 1.0 + KILL_GRACE + 2
        assert result.status == "timeout", result
        assert result.error is not None and result.error.ename == "TimeoutError"
        assert "time.sleep(60)" in result.error.traceback
        grandchild, started = result.stdout.split()
        assert started == "started"
        assert python.execute(f"alive({int(grandchild)})").return_value == "False"
        # Processes started by earlier executions are not the timed-out code's.
        assert python.execute("alive(keeper.pid)").return_value == "True"
        assert python.execute("x + 1").return_value == "42"
        python.execute("keeper.kill(); keeper.wait()")

    def test_interrupt(self, python: AgentClient) -> None:
        assert python.interrupt() is None  # nothing running
        python.execute("x = 41")
        running = Background(python, "import time\nprint('go', flush=True)\ntime.sleep(60)")
        running.wait_for_output("go")
        began = time.monotonic()
        interrupted = python.interrupt()
        result = running.result()
        assert time.monotonic() - began < 5
        assert interrupted == result.execution_id
        assert result.status == "error" and result.error is not None
        assert result.error.ename == "KeyboardInterrupt"
        assert python.execute("x + 1").return_value == "42"

    def test_busy(self, python: AgentClient) -> None:
        running = Background(python, "import time\nprint('go', flush=True)\ntime.sleep(60)")
        running.wait_for_output("go")
        other = self.connect(self.python_path)
        with pytest.raises(KernelBusy) as busy:
            other.execute("1")
        assert busy.value.execution_id == other.info().current_execution
        assert other.info().state == "busy"
        other.interrupt()
        assert running.result().status == "error"
        assert other.execute("1").status == "ok"

    def test_reconnect_keeps_state(self, python: AgentClient) -> None:
        python.execute("x = 41")
        python.close()
        again = self.connect(self.python_path)
        assert again.hello.execution_count == 1
        assert again.execute("x + 1").return_value == "42"

    def test_reattach_from_an_offset_misses_nothing(self, python: AgentClient) -> None:
        code = textwrap.dedent(
            """
            import sys, time
            for i in range(60):
                print(f"line {i}", flush=True)
                if i % 10 == 0:
                    print(f"tick {i}", file=sys.stderr, flush=True)
                time.sleep(0.01)
            "done"
            """
        )
        expected = "".join(f"line {i}\n" for i in range(60))
        seen: list[str] = []

        class Gone(Exception):
            pass

        def drop_after_a_while(stream: str, text: str) -> None:
            seen.append(text)
            if len("".join(seen)) > 40:
                raise Gone  # the client goes away in the middle of the execution

        with pytest.raises(Gone):
            python.execute(code, on_output=drop_after_a_while, execution_id="reattach-1")
        offset = len("".join(seen))
        rest = Collector()
        other = self.connect(self.python_path)
        result = other.attach("reattach-1", offset, rest)
        assert result.status == "ok" and result.return_value == "'done'"
        combined = "".join(seen) + rest.text()
        assert len(combined) == result.output_length
        assert "".join(t for t in combined.splitlines(True) if t.startswith("line")) == expected
        assert result.stdout == expected
        assert result.stderr == "".join(f"tick {i}\n" for i in range(0, 60, 10))
        # After the end, any offset replays exactly the rest; the client that lost its
        # connection reconnects by itself.
        tail = Collector()
        assert python.attach("reattach-1", 25, tail).execution_id == "reattach-1"
        assert tail.text() == combined[25:]
        # A retry with the same id and code does not run it twice.
        again = python.execute(code, execution_id="reattach-1")
        assert again.execution_count == result.execution_count == 1
        with pytest.raises(UnknownExecution):
            python.attach("no-such-execution")

    def test_killed_interpreter_is_dead_until_restart(self, python: AgentClient) -> None:
        python.execute("x = 1")
        with pytest.raises(KernelDead) as dead:
            python.execute(
                "import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
            )
        assert "SIGKILL" in dead.value.reason
        assert dead.value.stdout == "bye\n"
        assert python.info().state == "dead"
        with pytest.raises(KernelDead):
            python.execute("1 + 1")
        info = python.restart()
        assert info.state == "idle" and info.execution_count == 0
        fresh = python.execute("x")
        assert fresh.status == "error" and fresh.error is not None
        assert fresh.error.ename == "NameError" and fresh.execution_count == 1

    def test_an_interpreter_that_will_not_stop_is_killed(self, python: AgentClient) -> None:
        code = textwrap.dedent(
            """
            import time
            while True:
                try:
                    time.sleep(10)
                except KeyboardInterrupt:
                    pass
            """
        )
        began = time.monotonic()
        with pytest.raises(KernelDead) as dead:
            python.execute(code, timeout=0.3)
        assert time.monotonic() - began < 0.3 + KILL_GRACE + 2
        assert "did not stop" in dead.value.reason
        python.restart()
        assert python.execute("1 + 1").return_value == "2"

    def test_restart_clears_state(self, python: AgentClient) -> None:
        python.execute("x = 1")
        pid = python.info().worker_pid
        info = python.restart()
        assert info.execution_count == 0 and info.worker_pid != pid
        assert python.execute("'x' in globals()").return_value == "False"

    # ---------------------------------------------------------------- bash

    def test_bash_state_and_exit_status(self, bash: AgentClient) -> None:
        info = bash.info()
        assert info.language == "bash" and info.interpreter is not None
        assert info.interpreter.startswith("bash ")
        setup = bash.execute('cd /tmp && export FOO=bar && greet() { echo "hi $1"; }')
        assert (setup.status, setup.exit_code, setup.return_value) == ("ok", 0, None)
        result = bash.execute('echo "$PWD $FOO"; greet you; echo oops >&2')
        assert result.stdout == "/tmp bar\nhi you\n" and result.stderr == "oops\n"
        assert result.execution_count == 2
        child = bash.execute("sh -c 'echo \"child sees $FOO\"'")
        assert child.stdout == "child sees bar\n"
        failed = bash.execute("false")
        assert (failed.status, failed.exit_code) == ("error", 1)
        assert bash.execute("(exit 3)").exit_code == 3
        assert bash.execute('read line; echo "[$line]"').stdout == "[]\n"  # stdin: /dev/null
        assert bash.execute("true").status == "ok"

    def test_bash_timeout_kills_the_tree_and_keeps_the_shell(self, bash: AgentClient) -> None:
        bash.execute("cd /tmp && export KEEP=yes")
        code = "sh -c \"trap '' INT; exec sleep 60\" &\necho $!\nsleep 60\necho not reached"
        began = time.monotonic()
        result = bash.execute(code, timeout=1.0)
        assert time.monotonic() - began < 1.0 + KILL_GRACE + 2
        assert result.status == "timeout" and "not reached" not in result.stdout
        pid = int(result.stdout.split()[0])
        gone = bash.execute(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone")
        assert gone.stdout == "gone\n"
        assert bash.execute('echo "$PWD $KEEP"').stdout == "/tmp yes\n"

    def test_bash_interrupt_and_exit(self, bash: AgentClient) -> None:
        bash.execute("export KEEP=yes")
        running = Background(bash, "echo go; while true; do :; done")
        running.wait_for_output("go")
        bash.interrupt()
        result = running.result()
        assert result.status == "error" and result.error is not None
        assert result.error.ename == "KeyboardInterrupt"
        assert bash.execute('echo "$KEEP"').stdout == "yes\n"
        with pytest.raises(KernelDead) as dead:
            bash.execute("exit 3")
        assert re.search(r"status 3\b", dead.value.reason)
        bash.restart()
        assert bash.execute('echo "[${KEEP:-}]"').stdout == "[]\n"
