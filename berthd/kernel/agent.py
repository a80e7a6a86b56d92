"""berthd kernel agent: one code kernel (Python or bash) inside a sandbox, served on a unix
socket, independent of the daemon that started it.

This file is copied into the sandbox and run there by the sandbox's own ``python3`` (3.8 or
newer) as a plain script; it imports nothing but the standard library, so any image with
``python3`` can host a kernel without installing anything. The daemon never imports it and
never runs it from inside the package: it copies it (``berthd.kernel.launch``).

    python3 agent.py serve --language python|bash [--dir DIR] [--output-cap CHARS]
                           [--history N] [--kill-grace SECONDS] [--shell PATH] [--daemon]
    python3 agent.py serve-exec

``serve-exec`` is the other job of this file: no kernel, but commands run for the daemon
over the stdin/stdout of one held runtime exec, so that an exec costs a round trip
instead of a runtime exec (``ExecServer`` documents its protocol; the daemon ships this
file to it through that same stdin, see ``berthd.kernel.exec_agent``).

Why it survives the daemon
--------------------------
The agent owns everything that matters: the interpreter, the executions and their output.
It listens on ``DIR/agent.sock`` (DIR defaults to the directory of this file, a directory
shared between host and sandbox), and a client is only a reader: a client (or the whole
daemon) may vanish at any moment, even by SIGKILL, and the execution goes on; a new
client connects, finds the namespace intact and re-attaches to an execution by id. With
``--daemon`` the agent detaches (new session, stdio to ``DIR/agent.log``) and the command
returns once the socket listens: that is how it is started by an exec in a running
container.

Processes
---------
::

    agent (serve)     socket, executions, timeouts; a child subreaper (PR_SET_CHILD_SUBREAPER)
    └── worker        its own session; holds the state:
                        python: ``python3 agent.py python-worker`` (this file again)
                        bash:   ``bash -i`` with an rc file written by the agent

The worker's stdout and stderr (file descriptors 1 and 2) are pipes read by the agent, so
what the code prints is captured, and so is the output of any subprocess it starts that
inherits them. Output that arrives while no execution runs (a background process writing
later) is dropped. Control messages travel on separate pipes, so user output can never
forge them. stdin of the code is ``/dev/null``.

Timeouts and interrupts kill the process tree
--------------------------------------------
An interrupt (asked for, or a timeout) sends SIGINT to the worker and to every process
spawned since the execution began (like Ctrl-C to a terminal's foreground group): Python
raises ``KeyboardInterrupt`` in the running code, bash abandons the command line. Then,
every 0.2 s until the execution ends, and once more as it ends, those processes get
SIGKILL - found as the agent's descendants (orphans are re-parented to the agent, the
subreaper) plus members of the worker's session, minus processes that existed before the
execution began (a server started by an earlier execution survives) - and the worker gets
SIGINT again (bash: every round; Python: every second). The namespace survives. If the worker has not finished
``--kill-grace`` seconds (default 3) after the first SIGINT (code that swallows
``KeyboardInterrupt``, a C loop that never checks signals, a shell trap), the worker and
its whole tree are killed and the kernel is dead. Known limits: a bash command that
ignores SIGINT is killed, and bash may run the next (short) command of the same line
before the next SIGINT aborts it; bash's INT handling cannot be changed by the code
(``PROMPT_COMMAND`` and the agent's helpers are read-only).

A worker that exits (``os._exit``, a segfault, ``exit`` in bash, the OOM killer) makes the
kernel **dead**: the running execution ends with a ``dead`` frame, later executions are
refused with ``error`` code ``dead``, until ``restart``.

Protocol (version 1)
--------------------
UTF-8 JSON objects, one per line, both ways. A client sends one request and reads frames
until the request's last frame (many clients may be connected; one execution runs at a
time). Requests (``op``):

``hello`` / ``info``
    -> ``{"type": "hello"|"info", "agent": "berthd-kernel-agent", "protocol": 1,
    "language", "state": "starting"|"idle"|"busy"|"restarting"|"dead", "execution_count",
    "current_execution", "agent_pid", "worker_pid", "interpreter", "dead_reason",
    "started_at", "output_cap", "kill_grace"}``
``ping`` -> ``{"type": "pong"}``
``execute`` ``{"code", "timeout"?: seconds|null, "output_cap"?: chars, "stream"?: bool,
"execution_id"?: str}``
    -> ``{"type": "started", "execution_id", "execution_count"}``, then (if ``stream``,
    the default) ``{"type": "output", "execution_id", "stream": "stdout"|"stderr",
    "offset", "text"}`` frames, then the last frame: ``{"type": "result",
    "execution_id", "status": "ok"|"error"|"timeout", "stdout", "stderr",
    "return_value": str|null, "execution_count", "duration_ms", "truncated", "error":
    null|{"ename", "evalue", "traceback"}, "exit_code": int|null, "output_length"}`` or
    ``{"type": "dead", "execution_id", "reason", "stdout", "stderr", "execution_count",
    "duration_ms", "truncated", "output_length"}``. A client-chosen ``execution_id`` makes
    a retry idempotent: the same id with the same code attaches to the existing execution
    instead of running it again (while it is kept, see ``--history``).
``attach`` ``{"execution_id", "offset"?: int, "stream"?: bool}``
    -> the execution's output from ``offset`` (frames as above), then its last frame, as
    soon as it has one. ``offset`` counts characters of the execution's combined output
    (both streams, in arrival order); a client that read up to offset N re-attaches with N
    and misses nothing and gets nothing twice.
``interrupt`` -> ``{"type": "interrupting", "execution_id": id|null}`` at once.
``restart`` -> ``{"type": "restarted", ...info}`` once a fresh worker is ready: state
    cleared, ``execution_count`` back to 0; a running execution ends as an error
    ``KernelRestarted``.
``shutdown`` -> ``{"type": "bye"}``; the agent kills its worker tree and exits.

Errors: ``{"type": "error", "code": "bad_request"|"busy"|"dead"|"unknown_execution"|
"duplicate_execution"|"internal", "message", "execution_id"?}``.

Results: Python: ``return_value`` is the ``repr`` of the last statement if it is an
expression (None gives null); an exception gives status ``error`` with ``ename``,
``evalue``, ``traceback``. Bash: status ``ok`` when the exit status is 0, else ``error``,
with ``exit_code``. A timeout gives status ``timeout`` (``error.ename`` ``TimeoutError``); an
interrupt gives status ``error`` with ``ename`` ``KeyboardInterrupt``. Each stream keeps at most
``output_cap`` characters (the rest is dropped and ``truncated`` is true; also for a longer
``return_value``). The agent keeps the last ``--history`` executions (default 16) for
``attach``.

The Python namespace is the module ``__main__`` (so pickle finds classes the code
defines); ``input()`` meets end-of-file; top-level ``await`` is not supported; ``_`` is not
set. The bash kernel is an interactive shell without a terminal: aliases expand, ``exit``
ends the kernel, ``set -e`` ends it at the next failing command.
"""

from __future__ import annotations

import ast
import builtins
import codecs
import fcntl
import io
import json
import linecache
import os
import platform
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

PROTOCOL = 1
AGENT_NAME = "berthd-kernel-agent"
SOCKET_NAME = "agent.sock"
LOG_NAME = "agent.log"
LANGUAGES = ("python", "bash")
DEFAULT_OUTPUT_CAP = 1_000_000  # characters per stream and execution
DEFAULT_HISTORY = 16
DEFAULT_KILL_GRACE = 3.0
READY_TIMEOUT = 30.0  # seconds a fresh worker has to come up
KILL_ROUND = 0.2  # seconds between kill rounds during an interrupt
MAX_REQUEST = 64 << 20  # bytes of one request line
MAX_BACKLOG = 32 << 20  # bytes queued to one slow client before it is dropped
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STREAMS = ("stdout", "stderr")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    try:
        sys.stderr.write(f"berthd-agent[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, session id, state, start time in clock ticks) of ``pid``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[3]), fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pids() -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit()}


def _ticks() -> int:
    """Now, in the unit of /proc start times (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def _tree(root: int, session: int | None) -> dict[int, tuple[int, int, str, int]]:
    """Every live process below ``root`` (descendants) or in ``session``, but not ``root``."""
    table: dict[int, tuple[int, int, str, int]] = {}
    for pid in _pids():
        info = _proc_stat(pid)
        if info is not None:
            table[pid] = info
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info[0], []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    if session is not None:
        found |= {pid for pid, info in table.items() if info[1] == session}
    found.discard(root)
    return {pid: table[pid] for pid in found if table[pid][2] not in ("Z", "X")}


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        function: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return function
    except Exception:  # no ctypes in this image: best effort
        return None


_PRCTL = _prctl()


def _become_subreaper() -> bool:
    """Orphans of the code's processes are re-parented to us, so they stay in our tree
    (found and killed on interrupt) and get reaped."""
    return _PRCTL is not None and _PRCTL(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def _die_with_parent() -> None:
    """In a worker, before exec: without its agent nobody can reach the kernel."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# --------------------------------------------------------------------------- executions


class _Conn:
    """One client connection: bytes in, frames out (buffered, never blocking the agent)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False


class _Execution:
    """One execution: its output log (kept for attach), subscribers and interrupt state."""

    def __init__(
        self, execution_id: str, code: str, count: int, cap: int, timeout: float | None
    ) -> None:
        self.id = execution_id
        self.code = code
        self.count = count
        self.cap = cap
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout if timeout else None
        self.chunks: list[tuple[str, str]] = []  # (stream, text) in arrival order
        self.ends: list[int] = []  # combined offset at the end of each chunk
        self.length = 0
        self.kept = {"stdout": 0, "stderr": 0}
        self.truncated = False
        self.subscribers: list[tuple[_Conn, bool]] = []  # (connection, wants output)
        self.begun = False  # the worker has taken it (signals may be sent now)
        self.interrupt_reason: str | None = None  # "timeout" | "interrupt"
        self.interrupt_at: float | None = None  # first SIGINT sent
        self.last_sigint = 0.0
        self.next_round: float | None = None
        self.before_pids: set[int] = set()
        self.before_tick = 0
        self.worker_pid = 0  # also its session id
        self.cell_file: str | None = None
        self.final: dict[str, Any] | None = None

    def add(self, stream: str, text: str) -> tuple[int, str] | None:
        """Keep ``text`` within the cap; returns (offset, kept text) or None."""
        room = self.cap - self.kept[stream]
        if len(text) > room:
            self.truncated = True
            text = text[: max(0, room)]
        if not text:
            return None
        offset = self.length
        self.chunks.append((stream, text))
        self.length += len(text)
        self.ends.append(self.length)
        self.kept[stream] += len(text)
        return offset, text

    def text(self, stream: str) -> str:
        return "".join(t for s, t in self.chunks if s == stream)

    def since(self, offset: int) -> list[tuple[int, str, str]]:
        """(offset, stream, text) of the output from ``offset`` on."""
        out: list[tuple[int, str, str]] = []
        start = 0
        for index, (stream, text) in enumerate(self.chunks):
            end = self.ends[index]
            if end > offset:
                skip = max(0, offset - start)
                out.append((start + skip, stream, text[skip:]))
            start = end
        return out

    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)


# --------------------------------------------------------------------------- workers


class _Worker:
    """A running interpreter: its process, output pipes and control channel."""

    language = ""
    sigint_repeat = 1.0  # seconds between repeated SIGINTs during an interrupt

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.ready = False
        self.ready_deadline = time.monotonic() + READY_TIMEOUT
        self.interpreter: str | None = None
        self.control_fd = -1
        self.control_buf = bytearray()
        self.output_fds: dict[int, str] = {}
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in _STREAMS}
        self.idle_tail = ""  # what it printed outside executions (startup errors)
        self.cell = 0
        self.expected_exit = False
        self.kill_reason: str | None = None

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, execution: _Execution) -> None:
        raise NotImplementedError

    def events(self, data: bytes) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def _adopt(self, proc: subprocess.Popen[bytes], control_fd: int) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.pid = proc.pid
        self.control_fd = control_fd
        self.output_fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        for fd in [control_fd, *self.output_fds]:
            os.set_blocking(fd, False)

    def note_idle(self, text: str) -> None:
        self.idle_tail = (self.idle_tail + text)[-2000:]

    def close(self) -> None:
        for fd in [self.control_fd, *self.output_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        self.control_fd = -1
        self.output_fds = {}


class _PythonWorker(_Worker):
    """``python3 agent.py python-worker``: requests and results as JSON lines on pipes."""

    language = "python"
    sigint_repeat = 1.0

    def start(self) -> None:
        request_r, request_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, _agent_file(), "python-worker", str(request_r), str(result_w)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(request_r, result_w),
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with_parent,  # the agent has a single thread
            )
        except BaseException:
            for fd in (request_r, request_w, result_r, result_w):
                os.close(fd)
            raise
        os.close(request_r)
        os.close(result_w)
        self.request_fd = request_w
        self._adopt(proc, result_r)

    def submit(self, execution: _Execution) -> None:
        self.cell += 1
        line = json.dumps({"cell": self.cell, "code": execution.code, "cap": execution.cap})
        _write_all(self.request_fd, (line + "\n").encode())

    def events(self, data: bytes) -> list[tuple[str, Any]]:
        self.control_buf += data
        found: list[tuple[str, Any]] = []
        while True:
            end = self.control_buf.find(b"\n")
            if end < 0:
                return found
            line = bytes(self.control_buf[:end])
            del self.control_buf[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("type")
            if kind == "ready":
                self.interpreter = message.get("interpreter")
                found.append(("ready", None))
            elif kind in ("begin", "done"):
                found.append((kind, message))

    def close(self) -> None:
        try:
            os.close(self.request_fd)
        except (OSError, AttributeError):
            pass
        super().close()


class _BashWorker(_Worker):
    """An interactive ``bash`` reading one command line per execution on its stdin.

    Interactive, because only an interactive shell abandons the running command line on
    SIGINT and goes on reading (a non-interactive one dies or carries on). Each execution
    is one line: ``__berth_begin; builtin source CELL </dev/null``. ``PROMPT_COMMAND``
    reports ``done STATUS`` whenever the shell is back at its prompt - after the line ends
    or is aborted - on a pipe (fd >= 60) that the code's own commands do not inherit.
    """

    language = "bash"
    sigint_repeat = KILL_ROUND

    def start(self) -> None:
        shell = self.agent.shell
        path = shutil.which(shell)
        if path is None:
            raise OSError(f"the shell {shell!r} is not on PATH")
        marker_r, marker_w0 = os.pipe()
        marker_w = fcntl.fcntl(marker_w0, fcntl.F_DUPFD, 60)
        os.close(marker_w0)
        self.fd = marker_w
        rc = os.path.join(self.agent.directory, "bashrc")
        with open(rc, "w") as f:
            f.write(_BASHRC.replace("FD", str(marker_w)))
        os.makedirs(self.cells_dir, exist_ok=True)
        try:
            proc = subprocess.Popen(
                [path, "--noprofile", "--rcfile", rc, "--noediting", "-i"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(marker_w,),
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            os.close(marker_r)
            raise
        finally:
            os.close(marker_w)
        self._adopt(proc, marker_r)

    @property
    def cells_dir(self) -> str:
        return os.path.join(self.agent.directory, "cells")

    def submit(self, execution: _Execution) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.cell += 1
        path = os.path.join(self.cells_dir, f"{self.cell}.sh")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(execution.code)
            if not execution.code.endswith("\n"):
                f.write("\n")
        execution.cell_file = path
        line = f"__berth_begin {self.cell}; builtin source {_shell_quote(path)} </dev/null {self.fd}>&-\n"
        _write_all(self.proc.stdin.fileno(), line.encode())

    def events(self, data: bytes) -> list[tuple[str, Any]]:
        self.control_buf += data
        found: list[tuple[str, Any]] = []
        while True:
            end = self.control_buf.find(b"\n")
            if end < 0:
                return found
            words = bytes(self.control_buf[:end]).decode("utf-8", "replace").split(" ", 1)
            del self.control_buf[: end + 1]
            if words[0] == "ready":
                self.interpreter = "bash " + (words[1] if len(words) > 1 else "?")
                found.append(("ready", None))
            elif words[0] == "begin":
                found.append(("begin", None))
            elif words[0] == "done" and len(words) > 1 and words[1].strip().isdigit():
                found.append(("done", {"exit_code": int(words[1])}))


_BASHRC = """\
# Written by the berthd kernel agent for its bash worker.
set +o history
unset HISTFILE MAILCHECK PROMPT_COMMAND
PS1='' PS2='' PS0='' PS4='+ '
export -n PS1 PS2 PS0 PS4 2>/dev/null
__berth_begin() { printf 'begin %s\\n' "$1" >&FD; }
__berth_done() { printf 'done %s\\n' "$1" >&FD; }
readonly -f __berth_begin __berth_done
readonly PROMPT_COMMAND='__berth_done $?'
printf 'ready %s\\n' "$BASH_VERSION" >&FD
"""


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _write_all(fd: int, data: bytes) -> None:
    """Write everything to a (possibly non-blocking) pipe; the worker reads it promptly."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def _signals_to_pipe(on_stop: Callable[[int, types.FrameType | None], None]) -> int:
    """Signals wake the selector: returns the pipe's read end (readable after any signal,
    SIGCHLD included); SIGTERM, SIGINT and SIGHUP also call ``on_stop``."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_stop)
    return wake_r


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _agent_file() -> str:
    return os.path.abspath(__file__)


# --------------------------------------------------------------------------- the agent


class Agent:
    """The serving loop: one thread, one selector, no blocking call but tiny pipe writes."""

    def __init__(
        self,
        directory: str,
        language: str,
        *,
        output_cap: int = DEFAULT_OUTPUT_CAP,
        history: int = DEFAULT_HISTORY,
        kill_grace: float = DEFAULT_KILL_GRACE,
        shell: str = "bash",
    ) -> None:
        self.directory = directory
        self.language = language
        self.output_cap = output_cap
        self.history = history
        self.kill_grace = kill_grace
        self.shell = shell
        self.socket_path = os.path.join(directory, SOCKET_NAME)
        self.selector = selectors.DefaultSelector()
        self.executions: OrderedDict[str, _Execution] = OrderedDict()
        self.current: _Execution | None = None
        self.count = 0
        self.worker: _Worker | None = None
        self.dead_reason: str | None = None
        self.restart_waiters: list[_Conn] = []
        self.started_at = time.time()
        self.running = True
        self.exit_status = 0
        self.listener: socket.socket | None = None
        self._by_sock: dict[socket.socket, _Conn] = {}
        self._wake_r = -1

    # ------------------------------------------------------------------ setup

    def bind(self) -> None:
        """Listen on the socket; a stale socket file is replaced, a live agent is not."""
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise OSError(f"{self.socket_path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _connect_unix(probe, self.socket_path)
            except OSError:
                os.unlink(self.socket_path)  # nobody listens: left by a dead agent
            else:
                raise OSError(f"another agent already listens on {self.socket_path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind_unix(listener, self.socket_path)
        # Access is controlled by the directory (private to the host and this sandbox);
        # the daemon may run as another uid than the sandbox (Docker: root inside).
        os.chmod(self.socket_path, 0o666)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener

    def run(self) -> int:
        assert self.listener is not None
        if not _become_subreaper():
            _log("cannot become a subreaper (no ctypes?): orphans may escape interrupts")
        self._wake_r = _signals_to_pipe(self._on_stop_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self._spawn_worker()
        try:
            while self.running:
                for key, mask in self.selector.select(self._next_timeout()):
                    key.data(key.fileobj, mask)
                self._on_timers()
        finally:
            self._shutdown()
        return self.exit_status

    def _on_stop_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.running = False
        self.exit_status = 128 + signum

    def _on_wake(self, fileobj: Any, mask: int) -> None:
        _drain(self._wake_r)
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.worker
            if worker is not None and pid == worker.pid:
                self._worker_exited(worker, status)

    def _shutdown(self) -> None:
        worker = self.worker
        if worker is not None:
            self._kill_worker(worker, "the agent shut down", expected=True)
        if self.current is not None and self.current.final is None:
            self._finish_dead(self.current, "the agent shut down")
        for conn in list(self._by_sock.values()):
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                if conn.outbuf:
                    conn.sock.sendall(bytes(conn.outbuf))
            except OSError:
                pass
            self._close(conn)
        if self.listener is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            self.listener.close()

    # ------------------------------------------------------------------ worker lifecycle

    def _spawn_worker(self) -> None:
        worker: _Worker = _PythonWorker(self) if self.language == "python" else _BashWorker(self)
        try:
            worker.start()
        except OSError as exc:
            self.worker = None
            self._declare_dead(f"cannot start the {self.language} worker: {exc}")
            return
        self.worker = worker
        self.selector.register(worker.control_fd, selectors.EVENT_READ, self._on_control)
        for fd in worker.output_fds:
            self.selector.register(fd, selectors.EVENT_READ, self._on_output)

    def _declare_dead(self, reason: str) -> None:
        self.dead_reason = reason
        _log("kernel dead: " + reason)
        if self.current is not None and self.current.final is None:
            self._finish_dead(self.current, reason)
        for conn in self.restart_waiters:
            self._send(conn, {"type": "error", "code": "dead", "message": reason})
        self.restart_waiters = []

    def _unregister_worker(self, worker: _Worker) -> None:
        for fd in [worker.control_fd, *worker.output_fds]:
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _worker_exited(self, worker: _Worker, status: int) -> None:
        if worker.proc is not None:
            worker.proc.returncode = (
                -os.WTERMSIG(status) if os.WIFSIGNALED(status) else (os.WEXITSTATUS(status))
            )
        # What it said and printed last comes before its death.
        self._drain_control(worker)
        self._drain_output(worker)
        self._unregister_worker(worker)
        worker.close()
        if self.worker is worker:
            self.worker = None
        if worker.expected_exit:
            return
        reason = worker.kill_reason or f"the {self.language} worker {_describe_exit(status)}"
        if not worker.ready and worker.idle_tail.strip():
            reason += ": " + worker.idle_tail.strip()[-500:]
        self._declare_dead(reason)

    def _kill_worker(self, worker: _Worker, reason: str, *, expected: bool = False) -> None:
        """SIGKILL the worker and everything below the agent; handle its exit now."""
        worker.kill_reason = reason
        worker.expected_exit = expected
        me = os.getpid()
        for _ in range(200):  # until only zombies are left (a process may fork meanwhile)
            victims = _tree(me, worker.pid)
            if not victims:
                break
            for pid in victims:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        status = int(signal.SIGKILL)  # as a wait status: "killed by SIGKILL"
        deadline = time.monotonic() + 2.0
        while True:  # bounded: a process stuck in the kernel (D state) must not hang us
            try:
                pid, found = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                break  # already reaped
            if pid:
                status = found
                break
            if time.monotonic() >= deadline:
                _log(f"worker {worker.pid} does not die; going on without it")
                break
            time.sleep(0.005)
        self._reap()
        if self.worker is worker:
            self._worker_exited(worker, status)

    # ------------------------------------------------------------------ worker I/O

    def _on_control(self, fileobj: Any, mask: int) -> None:
        worker = self.worker
        if worker is not None and fileobj == worker.control_fd:
            self._drain_control(worker)

    def _drain_control(self, worker: _Worker) -> None:
        while worker.control_fd >= 0:
            try:
                data = os.read(worker.control_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                try:
                    self.selector.unregister(worker.control_fd)
                except (KeyError, ValueError):
                    pass
                return
            for kind, payload in worker.events(data):
                self._on_event(worker, kind, payload)

    def _on_output(self, fileobj: Any, mask: int) -> None:
        worker = self.worker
        if worker is None or fileobj not in worker.output_fds:
            return
        self._read_output(worker, int(fileobj))

    def _read_output(self, worker: _Worker, fd: int) -> bool:
        """One read; False once nothing more is there."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass
            return False
        stream = worker.output_fds[fd]
        self._output(worker, stream, worker.decoders[stream].decode(data))
        return True

    def _drain_output(self, worker: _Worker) -> None:
        for fd in list(worker.output_fds):
            while self._read_output(worker, fd):
                pass

    def _output(self, worker: _Worker, stream: str, text: str) -> None:
        execution = self.current
        if execution is None or execution.final is not None:
            worker.note_idle(text)
            return
        added = execution.add(stream, text)
        if added is None:
            return
        offset, kept = added
        frame = {
            "type": "output",
            "execution_id": execution.id,
            "stream": stream,
            "offset": offset,
            "text": kept,
        }
        for conn, wants in execution.subscribers:
            if wants:
                self._send(conn, frame)

    def _on_event(self, worker: _Worker, kind: str, payload: Any) -> None:
        if kind == "ready":
            worker.ready = True
            waiters, self.restart_waiters = self.restart_waiters, []
            if waiters:
                frame = self._info("restarted")
                for conn in waiters:
                    self._send(conn, frame)
            return
        execution = self.current
        if execution is None or execution.final is not None:
            return
        if kind == "begin" and not execution.begun:
            execution.begun = True
            if execution.interrupt_reason is not None:
                self._first_sigint(execution)
        elif kind == "done" and execution.begun:
            self._drain_output(worker)
            for stream in _STREAMS:
                self._output(worker, stream, worker.decoders[stream].decode(b"", True))
                worker.decoders[stream].reset()
            self._finish(execution, payload)

    # ------------------------------------------------------------------ executions

    def _start(self, conn: _Conn, execution: _Execution, stream: bool) -> None:
        worker = self.worker
        assert worker is not None
        self.count += 1
        execution.count = self.count
        execution.before_pids = _pids()
        execution.before_tick = _ticks()
        execution.worker_pid = worker.pid
        self.executions[execution.id] = execution
        self.current = execution
        execution.subscribers.append((conn, stream))
        self._send(
            conn,
            {"type": "started", "execution_id": execution.id, "execution_count": execution.count},
        )
        try:
            worker.submit(execution)
        except OSError as exc:
            self._reap()  # it may just have died: then that is the reason we give
            if self.worker is worker:
                self._kill_worker(worker, f"the {self.language} worker stopped reading ({exc})")

    def _finish(self, execution: _Execution, outcome: dict[str, Any]) -> None:
        error = outcome.get("error")
        exit_code = outcome.get("exit_code")
        if self.language == "bash":
            status = "ok" if exit_code == 0 else "error"
        else:
            status = "ok" if outcome.get("ok") else "error"
        return_value = outcome.get("return_value")
        if outcome.get("truncated"):
            execution.truncated = True
        if execution.interrupt_reason == "timeout":
            status = "timeout"
            error = {
                "ename": "TimeoutError",
                "evalue": "the execution exceeded its timeout of %gs and was interrupted"
                % (execution.timeout or 0),
                "traceback": (error or {}).get("traceback", ""),
            }
        elif execution.interrupt_reason == "interrupt":
            status = "error"
            if not error or self.language == "bash":
                error = {"ename": "KeyboardInterrupt", "evalue": "interrupted", "traceback": ""}
        frame = {
            "type": "result",
            "execution_id": execution.id,
            "status": status,
            "stdout": execution.text("stdout"),
            "stderr": execution.text("stderr"),
            "return_value": return_value,
            "execution_count": execution.count,
            "duration_ms": execution.elapsed_ms(),
            "truncated": execution.truncated,
            "error": error,
            "exit_code": exit_code,
            "output_length": execution.length,
        }
        self._close_execution(execution, frame)

    def _finish_dead(self, execution: _Execution, reason: str) -> None:
        frame = {
            "type": "dead",
            "execution_id": execution.id,
            "reason": reason,
            "stdout": execution.text("stdout"),
            "stderr": execution.text("stderr"),
            "execution_count": execution.count,
            "duration_ms": execution.elapsed_ms(),
            "truncated": execution.truncated,
            "output_length": execution.length,
        }
        self._close_execution(execution, frame)

    def _close_execution(self, execution: _Execution, frame: dict[str, Any]) -> None:
        if execution.interrupt_at is not None:
            # The interpreter may have stopped at the first SIGINT, before any kill round:
            # whatever the code started is killed all the same before anyone is told.
            self._kill_spawned(execution)
        execution.final = frame
        execution.next_round = None
        for conn, _ in execution.subscribers:
            self._send(conn, frame)
        execution.subscribers = []
        if self.current is execution:
            self.current = None
        if execution.cell_file:
            try:
                os.unlink(execution.cell_file)
            except OSError:
                pass
        finished = [e for e in self.executions.values() if e.final is not None]
        for old in finished[: max(0, len(finished) - self.history)]:
            del self.executions[old.id]

    # ------------------------------------------------------------------ interrupts

    def _interrupt(self, execution: _Execution, reason: str) -> None:
        if execution.interrupt_reason is None:
            execution.interrupt_reason = reason
        if execution.begun and execution.interrupt_at is None:
            self._first_sigint(execution)

    def _spawned(self, execution: _Execution) -> dict[int, tuple[int, int, str, int]]:
        """Processes the execution's code started (see the module docstring)."""
        victims = _tree(os.getpid(), execution.worker_pid)
        victims.pop(execution.worker_pid, None)
        return {
            pid: info
            for pid, info in victims.items()
            if pid not in execution.before_pids or info[3] > execution.before_tick
        }

    def _kill_spawned(self, execution: _Execution) -> None:
        for _ in range(50):  # again while they fork between our look and our kill
            victims = self._spawned(execution)
            if not victims:
                return
            for pid in victims:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def _first_sigint(self, execution: _Execution) -> None:
        now = time.monotonic()
        execution.interrupt_at = now
        execution.last_sigint = now
        execution.next_round = now + KILL_ROUND
        # The worker first: bash must have its SIGINT pending before it sees a child die
        # of one, or it takes the child's death as handled and runs the next command.
        if self.worker is not None:
            _kill(self.worker.pid, signal.SIGINT)
        for pid in self._spawned(execution):
            _kill(pid, signal.SIGINT)

    def _interrupt_round(self, execution: _Execution) -> None:
        worker = self.worker
        now = time.monotonic()
        if worker is None:
            execution.next_round = None
            return
        assert execution.interrupt_at is not None
        if now - execution.interrupt_at >= self.kill_grace:
            execution.next_round = None
            self._kill_worker(
                worker,
                f"the {self.language} worker did not stop within {self.kill_grace:g}s of the "
                f"{execution.interrupt_reason or 'interrupt'} and was killed; its state is lost",
            )
            return
        for pid in self._spawned(execution):
            _kill(pid, signal.SIGKILL)
        if now - execution.last_sigint >= worker.sigint_repeat - 1e-3:
            _kill(worker.pid, signal.SIGINT)
            execution.last_sigint = now
        execution.next_round = now + KILL_ROUND

    # ------------------------------------------------------------------ timers

    def _next_timeout(self) -> float | None:
        moments: list[float] = []
        execution = self.current
        if execution is not None and execution.final is None:
            if execution.deadline is not None and execution.interrupt_reason is None:
                moments.append(execution.deadline)
            if execution.next_round is not None:
                moments.append(execution.next_round)
        if self.worker is not None and not self.worker.ready:
            moments.append(self.worker.ready_deadline)
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        execution = self.current
        if execution is not None and execution.final is None:
            if (
                execution.deadline is not None
                and execution.interrupt_reason is None
                and now >= execution.deadline
            ):
                self._interrupt(execution, "timeout")
            if execution.next_round is not None and now >= execution.next_round:
                self._interrupt_round(execution)
        worker = self.worker
        if worker is not None and not worker.ready and now >= worker.ready_deadline:
            self._kill_worker(
                worker, f"the {self.language} worker did not start within {READY_TIMEOUT:g}s"
            )

    # ------------------------------------------------------------------ clients

    def _on_accept(self, fileobj: Any, mask: int) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.selector.register(sock, selectors.EVENT_READ, self._on_conn)
            self._by_sock[sock] = conn

    def _on_conn(self, fileobj: Any, mask: int) -> None:
        conn = self._by_sock.get(fileobj)
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            try:
                data = conn.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            conn.inbuf += data
            while not conn.closed:
                end = conn.inbuf.find(b"\n")
                if end < 0:
                    if len(conn.inbuf) > MAX_REQUEST:
                        self._error(conn, "bad_request", f"request larger than {MAX_REQUEST} bytes")
                        self._close(conn)
                    break
                line = bytes(conn.inbuf[:end])
                del conn.inbuf[: end + 1]
                if line.strip():
                    try:
                        self._handle(conn, line)
                    except Exception:  # a bad request must never take the kernel down
                        _log("request failed: " + traceback.format_exc())
                        self._error(conn, "internal", "the agent failed on this request")

    def _send(self, conn: _Conn, frame: dict[str, Any]) -> None:
        if conn.closed:
            return
        data = (json.dumps(frame, separators=(",", ":")) + "\n").encode()
        if not conn.outbuf:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            data = data[sent:]
            if not data:
                return
        conn.outbuf += data
        if len(conn.outbuf) > MAX_BACKLOG:
            _log("dropping a client that does not read (it can attach again)")
            self._close(conn)
            return
        self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self.selector.modify(conn.sock, selectors.EVENT_READ, self._on_conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self._by_sock.pop(conn.sock, None)
        conn.sock.close()
        for execution in self.executions.values():
            execution.subscribers = [s for s in execution.subscribers if s[0] is not conn]
        self.restart_waiters = [c for c in self.restart_waiters if c is not conn]

    def _error(self, conn: _Conn, code: str, message: str, **extra: Any) -> None:
        frame = {"type": "error", "code": code, "message": message}
        frame.update(extra)
        self._send(conn, frame)

    # ------------------------------------------------------------------ requests

    def _state(self) -> str:
        if self.dead_reason is not None:
            return "dead"
        if self.restart_waiters:
            return "restarting"
        if self.worker is None or not self.worker.ready:
            return "starting"
        return "busy" if self.current is not None else "idle"

    def _info(self, kind: str) -> dict[str, Any]:
        worker = self.worker
        return {
            "type": kind,
            "agent": AGENT_NAME,
            "protocol": PROTOCOL,
            "language": self.language,
            "state": self._state(),
            "execution_count": self.count,
            "current_execution": self.current.id if self.current is not None else None,
            "agent_pid": os.getpid(),
            "worker_pid": worker.pid if worker is not None else None,
            "interpreter": worker.interpreter if worker is not None else None,
            "dead_reason": self.dead_reason,
            "started_at": self.started_at,
            "output_cap": self.output_cap,
            "kill_grace": self.kill_grace,
        }

    def _handle(self, conn: _Conn, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            self._error(conn, "bad_request", "not a JSON line")
            return
        if not isinstance(request, dict):
            self._error(conn, "bad_request", "a request is a JSON object")
            return
        op = request.get("op")
        handler: Callable[[_Conn, dict[str, Any]], None] | None = {
            "hello": self._op_hello,
            "info": self._op_info,
            "ping": self._op_ping,
            "execute": self._op_execute,
            "attach": self._op_attach,
            "interrupt": self._op_interrupt,
            "restart": self._op_restart,
            "shutdown": self._op_shutdown,
        }.get(op if isinstance(op, str) else "")
        if handler is None:
            self._error(conn, "bad_request", f"unknown op {op!r}")
            return
        handler(conn, request)

    def _op_hello(self, conn: _Conn, request: dict[str, Any]) -> None:
        self._send(conn, self._info("hello"))

    def _op_info(self, conn: _Conn, request: dict[str, Any]) -> None:
        self._send(conn, self._info("info"))

    def _op_ping(self, conn: _Conn, request: dict[str, Any]) -> None:
        self._send(conn, {"type": "pong"})

    def _op_execute(self, conn: _Conn, request: dict[str, Any]) -> None:
        code = request.get("code")
        timeout = request.get("timeout")
        cap = request.get("output_cap", self.output_cap)
        execution_id = request.get("execution_id")
        stream = request.get("stream", True) is not False
        if not isinstance(code, str):
            return self._error(conn, "bad_request", "code must be a string")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            return self._error(conn, "bad_request", "timeout must be a positive number or null")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            return self._error(conn, "bad_request", "output_cap must be a non-negative integer")
        if execution_id is None:
            execution_id = os.urandom(6).hex()
        elif not isinstance(execution_id, str) or not _ID_RE.match(execution_id):
            return self._error(conn, "bad_request", f"execution_id must match {_ID_RE.pattern}")
        existing = self.executions.get(execution_id)
        if existing is not None:
            if existing.code != code:
                return self._error(
                    conn,
                    "duplicate_execution",
                    f"execution {execution_id} exists with other code",
                    execution_id=execution_id,
                )
            self._send(
                conn,
                {"type": "started", "execution_id": existing.id, "execution_count": existing.count},
            )
            return self._attach(conn, existing, 0, stream)
        if self.dead_reason is not None:
            return self._error(conn, "dead", self.dead_reason)
        if self.current is not None or self.restart_waiters or self.worker is None:
            current = self.current.id if self.current is not None else None
            return self._error(
                conn,
                "busy",
                f"execution {current} is running" if current else "the kernel is restarting",
                execution_id=current,
            )
        self._start(conn, _Execution(execution_id, code, 0, cap, timeout), stream)
        return None

    def _attach(self, conn: _Conn, execution: _Execution, offset: int, stream: bool) -> None:
        if stream:
            for start, name, text in execution.since(offset):
                self._send(
                    conn,
                    {
                        "type": "output",
                        "execution_id": execution.id,
                        "stream": name,
                        "offset": start,
                        "text": text,
                    },
                )
        if execution.final is not None:
            self._send(conn, execution.final)
        else:
            execution.subscribers.append((conn, stream))

    def _op_attach(self, conn: _Conn, request: dict[str, Any]) -> None:
        execution_id = request.get("execution_id")
        offset = request.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            return self._error(conn, "bad_request", "offset must be a non-negative integer")
        execution = self.executions.get(execution_id) if isinstance(execution_id, str) else None
        if execution is None:
            return self._error(
                conn,
                "unknown_execution",
                f"no execution {execution_id!r} here (never started, or no longer kept)",
                execution_id=execution_id,
            )
        self._attach(conn, execution, offset, request.get("stream", True) is not False)
        return None

    def _op_interrupt(self, conn: _Conn, request: dict[str, Any]) -> None:
        execution = self.current
        if execution is None or execution.final is not None:
            self._send(conn, {"type": "interrupting", "execution_id": None})
            return
        self._interrupt(execution, "interrupt")
        self._send(conn, {"type": "interrupting", "execution_id": execution.id})

    def _op_restart(self, conn: _Conn, request: dict[str, Any]) -> None:
        self.restart_waiters.append(conn)
        if len(self.restart_waiters) > 1:
            return  # a restart is under way; this one gets its answer too
        worker = self.worker
        if worker is not None:
            self._kill_worker(worker, "restarted", expected=True)
        execution = self.current
        if execution is not None and execution.final is None:
            self._finish(
                execution,
                {
                    "ok": False,
                    "error": {
                        "ename": "KernelRestarted",
                        "evalue": "the kernel was restarted during this execution",
                        "traceback": "",
                    },
                    "exit_code": None,
                },
            )
        self.dead_reason = None
        self.count = 0
        self._spawn_worker()

    def _op_shutdown(self, conn: _Conn, request: dict[str, Any]) -> None:
        self._send(conn, {"type": "bye"})
        self.running = False


# --------------------------------------------------------------------------- sockets


def _bind_unix(sock: socket.socket, path: str) -> None:
    """Bind even when ``path`` is longer than sun_path allows (108 bytes)."""
    if len(os.fsencode(path)) < 100:
        sock.bind(path)
        return
    directory, name = os.path.split(path)
    previous = os.open(".", os.O_RDONLY)
    try:
        os.chdir(directory)
        sock.bind(name)
    finally:
        os.fchdir(previous)
        os.close(previous)


def _connect_unix(sock: socket.socket, path: str) -> None:
    if len(os.fsencode(path)) < 100:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- python worker


class _Armed:
    """Whether a SIGINT should raise KeyboardInterrupt (only while user code runs)."""

    on = False


def _on_sigint(signum: int, frame: types.FrameType | None) -> None:
    if _Armed.on:
        raise KeyboardInterrupt


class _RawFd(io.RawIOBase):
    """Unbuffered binary writer on a file descriptor that writes everything it is given."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        return total


class _TextFd(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the worker: unbuffered, so output streams at once."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._raw = _RawFd(fd)
        self._name = name

    @property
    def buffer(self) -> _RawFd:
        return self._raw

    @property
    def encoding(self) -> str:  # type: ignore[override]  # read-only in io.TextIOBase
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    @property
    def name(self) -> str:
        return self._name

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self._raw.write(text.encode("utf-8", "backslashreplace"))
        return len(text)


def _read_lines(fd: int) -> Iterator[bytes]:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            yield line
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            return
        buffer += data


def _format_error(exc: BaseException) -> dict[str, str]:
    """Jupyter-like error, without the worker's own frames."""
    here = _agent_file()

    def ours(frame_tb: types.TracebackType) -> bool:
        return os.path.abspath(frame_tb.tb_frame.f_code.co_filename) == here

    tb = exc.__traceback__
    while tb is not None and ours(tb):  # the harness that called the code
        tb = tb.tb_next
    last_theirs = None
    walk = tb
    while walk is not None:
        if not ours(walk):
            last_theirs = walk
        walk = walk.tb_next
    if last_theirs is not None:
        last_theirs.tb_next = None  # the SIGINT handler that raised KeyboardInterrupt
    try:
        if isinstance(exc, SyntaxError):  # where in the cell, not where we compiled it
            lines = traceback.format_exception_only(type(exc), exc)
        else:
            lines = traceback.format_exception(type(exc), exc, tb)
    except Exception:
        lines = [f"{type(exc).__name__}\n"]
    try:
        evalue = str(exc)
    except Exception:
        evalue = f"<unprintable {type(exc).__name__}>"
    return {"ename": type(exc).__name__, "evalue": evalue, "traceback": "".join(lines)}


def _run_code(code: str, filename: str, namespace: dict[str, Any]) -> Any:
    """Exec the cell; the value of a last expression statement is returned (as IPython)."""
    tree = ast.parse(code, filename, "exec")
    last: ast.Expression | None = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = ast.Expression(final.value)
    body = compile(ast.Module(body=tree.body, type_ignores=[]), filename, "exec", dont_inherit=True)
    exec(body, namespace)
    if last is None:
        return None
    return eval(compile(last, filename, "eval", dont_inherit=True), namespace)


def _run_cell(
    request: dict[str, Any], namespace: dict[str, Any], begin: Callable[[int], None]
) -> dict[str, Any]:
    cell = int(request["cell"])
    code = str(request["code"])
    cap = int(request["cap"])
    filename = f"<cell-{cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    result: dict[str, Any] = {
        "type": "done",
        "cell": cell,
        "ok": True,
        "return_value": None,
        "error": None,
        "truncated": False,
    }
    signal.signal(signal.SIGINT, _on_sigint)  # the code may have replaced it
    try:
        try:
            _Armed.on = True  # the agent signals only after "begin": nothing is lost
            begin(cell)
            value = _run_code(code, filename, namespace)
            if value is not None:
                text = repr(value)
                if len(text) > cap:
                    text = text[:cap]
                    result["truncated"] = True
                result["return_value"] = text
            _Armed.on = False
        except BaseException as exc:  # the code's exception is its result, whatever it is
            _Armed.on = False
            result["ok"] = False
            result["error"] = _format_error(exc)
    except KeyboardInterrupt:  # landed in our own lines, around the code
        _Armed.on = False
        result["ok"] = False
        result["error"] = {"ename": "KeyboardInterrupt", "evalue": "", "traceback": ""}
    return result


def python_worker(request_fd: int, result_fd: int) -> int:
    """Hold the namespace; run one cell per request line; answer on ``result_fd``."""
    for fd in (request_fd, result_fd):
        os.set_inheritable(fd, False)  # the code's subprocesses must not get them
    sys.stdout = _TextFd(1, "<stdout>")
    sys.stderr = _TextFd(2, "<stderr>")
    sys.argv = [""]
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(_agent_file()):
        sys.path[0] = ""  # like the interactive interpreter: the working directory
    signal.signal(signal.SIGINT, _on_sigint)
    own_main = sys.modules["__main__"]  # keeps our globals alive
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main  # so pickle & co. find classes the code defines
    namespace = main.__dict__

    def send(message: dict[str, Any]) -> None:
        _write_all(result_fd, (json.dumps(message) + "\n").encode())

    def begin(cell: int) -> None:
        send({"type": "begin", "cell": cell})

    send({"type": "ready", "interpreter": "Python " + platform.python_version()})
    try:
        for line in _read_lines(request_fd):
            result = _run_cell(json.loads(line), namespace, begin)
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                try:
                    if stream is not None:
                        stream.flush()  # whatever the code wrote through buffered ones
                except Exception:
                    pass
            send(result)
    except KeyboardInterrupt:  # between cells: nothing to interrupt
        pass
    del own_main
    return 0


# --------------------------------------------------------------------------- exec mode


EXEC_DRAIN = 1.0  # seconds to read what a finished command's leftovers still print
EXEC_HEARTBEAT = 60.0  # seconds without a byte from the daemon before the agent gives up
EXEC_KILL_GRACE = 3.0  # seconds to collect output after a timeout kill


def _initial_environ() -> dict[str, str]:
    """The environment this process was started with, as the runtime gave it: read from
    ``/proc/self/environ``, before Python's own changes (C locale coercion sets
    ``LC_CTYPE``), so commands see exactly what a runtime exec would give them."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def _session_members(sid: int) -> list[int]:
    found = []
    for pid in _pids():
        info = _proc_stat(pid)
        if info is not None and info[1] == sid and info[2] not in ("Z", "X"):
            found.append(pid)
    return found


def _start_guardian() -> int:
    """Fork the guardian of the exec mode's commands; returns the pipe to tell it about
    them ("+SID" when a command starts in session SID, "-SID" when it is over).

    When the agent dies, even by SIGKILL, the pipe ends and the guardian kills every
    process still in those sessions (the commands and whatever they started there),
    then exits. Cheaper than PR_SET_PDEATHSIG on each command (which needs a Python
    ``preexec_fn``, so a full fork instead of vfork: milliseconds per command), and it
    reaches the commands' own children too."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_fd)
        return write_fd
    status = 0
    try:
        os.close(write_fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # never hold the agent's stream open
            os.dup2(null, fd)
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, 65536)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a stop of the agent is not ours
        sessions: set[int] = set()
        for line in _read_lines(read_fd):
            word = line.decode("ascii", "replace").strip()
            if word[:1] == "+" and word[1:].isdigit():
                sessions.add(int(word[1:]))
            elif word[:1] == "-" and word[1:].isdigit():
                sessions.discard(int(word[1:]))
        for _ in range(20):  # again while they fork between our look and our kill
            victims = [p for sid in sessions for p in _session_members(sid)]
            if not victims:
                break
            for victim in victims:
                _kill(victim, signal.SIGKILL)
            time.sleep(0.005)
    except BaseException:
        status = 1
    os._exit(status)


class _Run:
    """One command of the exec mode: its process, pipes and capped output."""

    def __init__(
        self,
        run_id: Any,
        proc: subprocess.Popen[bytes],
        cap: int,
        timeout: float | None,
        stdin: bytes | None,
        kill_on_exit: bool,
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.id = run_id
        self.proc = proc
        self.pid = proc.pid  # also its session id
        self.cap = cap
        self.started = time.monotonic()
        self.deadline = self.started + timeout if timeout else None
        self.sent = {"stdout": 0, "stderr": 0}  # bytes kept (and sent) per stream
        self.truncated = False
        self.fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        self.stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
        self.pending = memoryview(stdin or b"")
        self.kill_on_exit = kill_on_exit
        self.status: int | None = None  # wait status, once reaped
        self.timed_out = False
        self.stop_reading_at: float | None = None

    def add(self, stream: str, data: bytes) -> bytes:
        """Keep ``data`` within the cap; returns what was kept (to be sent on)."""
        room = self.cap - self.sent[stream]
        if len(data) > room:
            self.truncated = True
            data = data[: max(0, room)]
        self.sent[stream] += len(data)
        return data

    def exit_code(self) -> int | None:
        if self.status is None:
            return None
        if os.WIFSIGNALED(self.status):
            return 128 + os.WTERMSIG(self.status)  # as a container engine reports it
        return os.WEXITSTATUS(self.status)

    def kill_tree(self) -> None:
        """The command and everything in its session (orphans that stayed there too)."""
        if self.status is None:
            _kill(self.pid, signal.SIGKILL)
        for _ in range(20):  # again while they fork between our look and our kill
            victims = _session_members(self.pid)
            if not victims:
                return
            for pid in victims:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.001)


class ExecServer:
    """``serve-exec``: runs commands for the daemon, one JSON line per request on stdin,
    one per answer on stdout (the held stream of one runtime exec). No kernel, no
    socket: it lives as long as that stream; end-of-file on stdin (the daemon closed it
    or died) kills every command still running and ends the agent.

    Requests (``id`` is echoed in the answer; many commands may run at once):

    ``{"op": "run", "id", "argv": [str], "env"?: {str: str}, "workdir"?: str|null,
    "stdin"?: base64|null, "timeout"?: seconds|null, "output_cap"?: bytes,
    "kill_on_exit"?: bool}``
        -> ``{"type": "output", "id", "stream": "stdout"|"stderr", "data": base64}``
        as the command writes (within ``output_cap``), then ``{"type": "result", "id",
        "exit_code", "truncated", "timed_out", "duration_ms"}``, or ``{"type": "error", "id", "code":
        "spawn_failed"|"bad_request", "message"}`` when nothing was started. The command
        runs in a session of its own with the agent's environment (as the runtime gave
        it) updated by ``env``; stdin is ``/dev/null`` unless given. Each stream keeps
        ``output_cap`` bytes (``truncated`` when more came). Past ``timeout`` its session
        is killed (``timed_out``, exit code 137). After its exit, output is read until
        both pipes close or for ``EXEC_DRAIN`` seconds; with ``kill_on_exit`` its session
        is killed at its exit (the local runtime's exec semantics).
    ``{"op": "cancel", "id"}`` -> kills that command; its result follows as usual.
    ``{"op": "ping", "id"?}`` -> ``{"type": "pong", "id"}``; also the daemon's heartbeat:
    a runtime may keep an exec running after its client vanished (Docker keeps its stdin
    open), so when nothing came for ``heartbeat`` seconds (``--heartbeat``, default
    ``EXEC_HEARTBEAT``; in the hello) the agent ends as on end-of-file.

    Commands die with the agent: a guardian process (``_start_guardian``) kills their
    sessions when the agent ends, even by SIGKILL."""

    def __init__(self, rfd: int = 0, wfd: int = 1, heartbeat: float = EXEC_HEARTBEAT) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.heartbeat = heartbeat
        self.last_input = time.monotonic()
        self.base_env = _initial_environ()
        self.selector = selectors.DefaultSelector()
        self.runs: dict[int, _Run] = {}  # by pid
        self.by_id: dict[str, _Run] = {}
        self.inbuf = bytearray()
        self.running = True
        self.exit_status = 0
        self._wake_r = -1

    def serve(self) -> int:
        import base64

        self._b64 = base64
        self._guard_fd = _start_guardian()
        _become_subreaper()
        self._wake_r = _signals_to_pipe(self._on_stop_signal)
        os.set_blocking(self.rfd, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.rfd, selectors.EVENT_READ, self._on_request)
        self._prime()
        self._send(
            {
                "type": "hello",
                "agent": AGENT_NAME,
                "protocol": PROTOCOL,
                "mode": "exec",
                "agent_pid": os.getpid(),
                "uid": os.getuid(),
                "interpreter": "Python " + platform.python_version(),
                "heartbeat": self.heartbeat,
            }
        )
        try:
            while self.running:
                for key, mask in self.selector.select(self._next_timeout()):
                    key.data(key.fileobj, mask)
                self._on_timers()
        finally:
            for run in list(self.runs.values()):
                run.kill_tree()
        return self.exit_status

    def _on_stop_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.running = False
        self.exit_status = 128 + signum

    @staticmethod
    def _prime() -> None:
        """Spawn once before saying hello (this interpreter, doing nothing): the first
        spawn of a fresh agent costs milliseconds more than the next ones (code paths and
        pages touched for the first time), and the first command should not pay that."""
        try:
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", ""],
                stdin=subprocess.DEVNULL, capture_output=True, start_new_session=True,
                close_fds=True, timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            pass

    def _guard(self, message: str) -> None:
        try:
            _write_all(self._guard_fd, (message + "\n").encode())
        except OSError:
            _log("the guardian of the commands is gone")

    def _send(self, frame: dict[str, Any]) -> None:
        data = (json.dumps(frame, separators=(",", ":")) + "\n").encode()
        try:
            _write_all(self.wfd, data)
        except OSError:  # the daemon is gone
            self.running = False

    # ------------------------------------------------------------------ requests

    def _on_request(self, fileobj: Any, mask: int) -> None:
        try:
            data = os.read(self.rfd, 262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.running = False  # the daemon closed the stream (or died)
            return
        self.last_input = time.monotonic()
        self.inbuf += data
        while True:
            end = self.inbuf.find(b"\n")
            if end < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self._send({"type": "error", "id": None, "code": "bad_request",
                                "message": "request too large"})
                    self.running = False
                return
            line = bytes(self.inbuf[:end])
            del self.inbuf[: end + 1]
            if line.strip():
                try:
                    self._handle(line)
                except Exception:  # a bad request must never take the agent down
                    _log("request failed: " + traceback.format_exc())

    def _handle(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            return self._send({"type": "error", "id": None, "code": "bad_request",
                               "message": "not a JSON line"})
        if not isinstance(request, dict):
            return self._send({"type": "error", "id": None, "code": "bad_request",
                               "message": "a request is a JSON object"})
        op = request.get("op")
        run_id = request.get("id")
        if op == "ping":
            return self._send({"type": "pong", "id": run_id})
        if op == "cancel":
            run = self.by_id.get(str(run_id))
            if run is not None:
                run.kill_tree()
            return None
        if op != "run":
            return self._send({"type": "error", "id": run_id, "code": "bad_request",
                               "message": f"unknown op {op!r}"})
        return self._run(run_id, request)

    def _bad(self, run_id: Any, message: str) -> None:
        self._send({"type": "error", "id": run_id, "code": "bad_request", "message": message})

    def _run(self, run_id: Any, request: dict[str, Any]) -> None:
        argv = request.get("argv")
        env = request.get("env") or {}
        workdir = request.get("workdir")
        stdin = request.get("stdin")
        timeout = request.get("timeout")
        cap = request.get("output_cap", DEFAULT_OUTPUT_CAP)
        if str(run_id) in self.by_id:
            return self._bad(run_id, "a command with this id is running")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return self._bad(run_id, "argv must be a non-empty list of strings")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            return self._bad(run_id, "env must map strings to strings")
        if workdir is not None and not isinstance(workdir, str):
            return self._bad(run_id, "workdir must be a string or null")
        if stdin is not None and not isinstance(stdin, str):
            return self._bad(run_id, "stdin must be base64 or null")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            return self._bad(run_id, "timeout must be a positive number or null")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            return self._bad(run_id, "output_cap must be a non-negative integer")
        data = self._b64.b64decode(stdin) if stdin is not None else None
        full_env = dict(self.base_env)
        full_env.update(env)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=workdir or None,
                start_new_session=True,  # its session: what the guardian kills
                close_fds=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return self._send({"type": "error", "id": run_id, "code": "spawn_failed",
                               "message": str(exc)})
        self._guard(f"+{proc.pid}")
        run = _Run(run_id, proc, cap, timeout, data, request.get("kill_on_exit") is True)
        self.runs[run.pid] = run
        self.by_id[str(run_id)] = run
        for fd in run.fds:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, self._on_output)
        if run.stdin_fd >= 0:
            if run.pending:
                os.set_blocking(run.stdin_fd, False)
                self.selector.register(run.stdin_fd, selectors.EVENT_WRITE, self._on_stdin)
            else:
                self._close_stdin(run)
        return None

    # ------------------------------------------------------------------ commands

    def _run_of_fd(self, fd: int) -> _Run | None:
        for run in self.runs.values():
            if fd in run.fds or fd == run.stdin_fd:
                return run
        return None

    def _on_output(self, fileobj: Any, mask: int) -> None:
        fd = int(fileobj)
        run = self._run_of_fd(fd)
        if run is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._output(run, run.fds[fd], data)
            return
        self._close_fd(run, fd)
        self._maybe_finish(run)

    def _output(self, run: _Run, stream: str, data: bytes) -> None:
        """Output is sent as it comes, not with the result: when the agent dies (its
        container was killed, say) the daemon still has what the command wrote."""
        kept = run.add(stream, data)
        if kept:
            self._send({"type": "output", "id": run.id, "stream": stream,
                        "data": self._b64.b64encode(kept).decode()})

    def _on_stdin(self, fileobj: Any, mask: int) -> None:
        run = self._run_of_fd(int(fileobj))
        if run is None:
            return
        try:
            run.pending = run.pending[os.write(run.stdin_fd, run.pending[:65536]) :]
        except BlockingIOError:
            return
        except OSError:
            run.pending = memoryview(b"")
        if not run.pending:
            self._close_stdin(run)

    def _close_stdin(self, run: _Run) -> None:
        if run.stdin_fd < 0:
            return
        try:
            self.selector.unregister(run.stdin_fd)
        except (KeyError, ValueError):
            pass
        assert run.proc.stdin is not None
        try:
            run.proc.stdin.close()
        except OSError:
            pass
        run.stdin_fd = -1

    def _close_fd(self, run: _Run, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        run.fds.pop(fd, None)
        for pipe in (run.proc.stdout, run.proc.stderr):
            if pipe is not None and not pipe.closed and pipe.fileno() == fd:
                pipe.close()

    def _on_wake(self, fileobj: Any, mask: int) -> None:
        _drain(self._wake_r)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.runs.get(pid)
            if run is None:
                continue  # an orphan we adopted as the subreaper
            run.status = status
            run.proc.returncode = run.exit_code()  # reaped here: Popen must not wait again
            if run.kill_on_exit:
                run.kill_tree()
            limit = time.monotonic() + EXEC_DRAIN
            run.stop_reading_at = min(run.stop_reading_at or limit, limit)
            self._maybe_finish(run)

    def _maybe_finish(self, run: _Run) -> None:
        if run.status is None:
            return
        if run.fds and (run.stop_reading_at is None or time.monotonic() < run.stop_reading_at):
            return
        for fd in list(run.fds):
            while True:  # what is already in the pipe
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self._output(run, run.fds[fd], data)
            self._close_fd(run, fd)
        self._close_stdin(run)
        self.runs.pop(run.pid, None)
        self.by_id.pop(str(run.id), None)
        if not _session_members(run.pid):  # else the guardian keeps watching what is left
            self._guard(f"-{run.pid}")
        self._send(
            {
                "type": "result",
                "id": run.id,
                "exit_code": run.exit_code(),
                "truncated": run.truncated,
                "timed_out": run.timed_out,
                "duration_ms": round((time.monotonic() - run.started) * 1000, 3),
            }
        )

    # ------------------------------------------------------------------ timers

    def _next_timeout(self) -> float | None:
        moments = [self.last_input + self.heartbeat]
        for run in self.runs.values():
            if run.deadline is not None and not run.timed_out and run.status is None:
                moments.append(run.deadline)
            if run.stop_reading_at is not None:
                moments.append(run.stop_reading_at)
        return max(0.0, min(moments) - time.monotonic())

    def _on_timers(self) -> None:
        now = time.monotonic()
        if now - self.last_input >= self.heartbeat:
            _log(f"nothing from the daemon for {self.heartbeat:g}s: ending")
            self.running = False
        for run in list(self.runs.values()):
            if (
                run.deadline is not None
                and not run.timed_out
                and run.status is None
                and now >= run.deadline
            ):
                run.timed_out = True
                run.kill_tree()
                run.stop_reading_at = now + EXEC_KILL_GRACE
            if run.stop_reading_at is not None and now >= run.stop_reading_at:
                if run.status is None:  # unkillable (D state): give up on it
                    run.status = int(signal.SIGKILL)
                self._maybe_finish(run)


# --------------------------------------------------------------------------- entry point


def _parse(argv: list[str]) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog="agent.py", description="berthd kernel agent")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--language", choices=LANGUAGES, required=True)
    serve.add_argument("--dir", default=None)
    serve.add_argument("--output-cap", type=int, default=DEFAULT_OUTPUT_CAP)
    serve.add_argument("--history", type=int, default=DEFAULT_HISTORY)
    serve.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE)
    serve.add_argument("--shell", default="bash")
    serve.add_argument("--daemon", action="store_true")
    serve_exec = sub.add_parser("serve-exec")
    serve_exec.add_argument("--heartbeat", type=float, default=EXEC_HEARTBEAT)
    worker = sub.add_parser("python-worker")
    worker.add_argument("request_fd", type=int)
    worker.add_argument("result_fd", type=int)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: serve, serve-exec or python-worker")
    return vars(args)


def _daemonize(log_path: str) -> int | None:
    """Fork; the parent waits until the child listens (or fails) and returns its exit
    status; the child (None) carries on in a session of its own, stdio to the log."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        message = b""
        while True:
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            message += chunk
        os.close(ready_r)
        os.waitpid(pid, os.WNOHANG)
        if message.startswith(b"ok"):
            return 0
        sys.stderr.write(message.decode("utf-8", "replace") or "the agent failed to start\n")
        return 1
    os.close(ready_r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    _DAEMON_READY.append(ready_w)
    return None


_DAEMON_READY: list[int] = []


def _tell_parent(message: str) -> None:
    for fd in _DAEMON_READY:
        try:
            os.write(fd, message.encode())
            os.close(fd)
        except OSError:
            pass
    del _DAEMON_READY[:]


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 8):  # noqa: UP036 - any python3 may run this file
        sys.stderr.write("berthd kernel agent: needs Python 3.8 or newer\n")
        return 2
    args = _parse(argv)
    if args["command"] == "python-worker":
        return python_worker(args["request_fd"], args["result_fd"])
    if args["command"] == "serve-exec":
        return ExecServer(heartbeat=max(0.1, args["heartbeat"])).serve()
    directory = os.path.abspath(args["dir"] or os.path.dirname(_agent_file()))
    if args["daemon"]:
        status = _daemonize(os.path.join(directory, LOG_NAME))
        if status is not None:
            return status
    agent = Agent(
        directory,
        args["language"],
        output_cap=max(0, args["output_cap"]),
        history=max(1, args["history"]),
        kill_grace=max(0.5, args["kill_grace"]),
        shell=args["shell"],
    )
    try:
        agent.bind()
    except OSError as exc:
        _tell_parent(f"cannot listen: {exc}\n")
        _log(f"cannot listen: {exc}")
        return 1
    _tell_parent("ok\n")
    return agent.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
