"""The host side of the kernel agent protocol (``berthd.kernel.agent``'s docstring).

``AgentClient.connect(path)`` talks to one agent over its unix socket. It holds no kernel
state of its own: everything lives in the agent, so a client can be dropped at any moment
(or the whole daemon killed) and a new one connected later finds the namespace and the
executions as they were. To follow an execution again after a lost connection, catch
``ConnectionLost`` (it carries ``execution_id`` and ``offset``), connect and
``attach(execution_id, offset)``: output is re-sent from that offset, nothing is lost or
repeated, and the result comes when the execution ends.

Threads: ``execute`` and ``attach`` hold the client's connection for their whole wait and
run one at a time. ``interrupt``, ``info``, ``ping``, ``restart`` and ``shutdown`` may be called
from any thread at any time: while the main connection is busy they use a short-lived
connection of their own (the agent serves many clients).

Errors (all ``KernelError``, with a stable ``code``)::

    KernelError                 base
    ├── AgentUnavailable        no agent answers on the socket (not started, exited, gone)
    │   └── ConnectionLost      the connection broke during a request; see above
    ├── KernelDead              the interpreter died (or was killed past its interrupt
    │                           grace); ``restart()`` gives a fresh one
    ├── KernelBusy              another execution is running (``execution_id``)
    ├── UnknownExecution        the agent has no such execution (never ran, or not kept)
    └── ProtocolError           the peer is not a kernel agent, or broke the protocol
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AGENT_NAME",
    "PROTOCOL",
    "AgentClient",
    "AgentInfo",
    "AgentUnavailable",
    "ConnectionLost",
    "ExecutionError",
    "ExecutionResult",
    "KernelBusy",
    "KernelDead",
    "KernelError",
    "OutputCallback",
    "ProtocolError",
    "UnknownExecution",
]

PROTOCOL = 1
AGENT_NAME = "berthd-kernel-agent"

OutputCallback = Callable[[str, str], None]
"""``on_output(stream, text)``: ``stream`` is "stdout" or "stderr"; chunks come in order,
and the offset of a chunk is the ``offset`` asked for plus the lengths of the earlier ones."""

_IO_TIMEOUT = 10.0  # seconds for a request that answers at once
_RESTART_TIMEOUT = 60.0
_RESULT_MARGIN = 15.0  # beyond timeout + the agent's kill grace, before giving up on it
_RECV = 262144


class KernelError(Exception):
    """Base of every error the kernel client raises."""

    code = "kernel_error"


class AgentUnavailable(KernelError):
    """No kernel agent answers on the socket."""

    code = "agent_unavailable"


class ConnectionLost(AgentUnavailable):
    """The connection broke (or went silent) during a request. ``execution_id`` and
    ``offset`` say where to ``attach`` again, if an execution was being followed."""

    code = "connection_lost"

    def __init__(self, message: str, execution_id: str | None = None, offset: int = 0) -> None:
        super().__init__(message)
        self.execution_id = execution_id
        self.offset = offset


class KernelDead(KernelError):
    """The interpreter is gone and its state with it. ``stdout``/``stderr``: what the
    execution that was running printed before (empty if none was)."""

    code = "kernel_dead"

    def __init__(
        self,
        reason: str,
        execution_id: str | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        super().__init__(f"kernel dead: {reason} (restart the kernel to get a fresh one)")
        self.reason = reason
        self.execution_id = execution_id
        self.stdout = stdout
        self.stderr = stderr


class KernelBusy(KernelError):
    """Another execution (``execution_id``) is running; wait for it or interrupt it."""

    code = "kernel_busy"

    def __init__(self, message: str, execution_id: str | None = None) -> None:
        super().__init__(message)
        self.execution_id = execution_id


class UnknownExecution(KernelError):
    """The agent has no execution with that id (it never ran, or is no longer kept)."""

    code = "unknown_execution"


class ProtocolError(KernelError):
    """The peer is not a kernel agent of this protocol, or sent something unexpected."""

    code = "protocol_error"


@dataclass(frozen=True, slots=True)
class ExecutionError:
    ename: str
    evalue: str
    traceback: str


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """The outcome of one execution, with its whole (capped) output."""

    execution_id: str
    status: str  # "ok" | "error" | "timeout"
    stdout: str
    stderr: str
    return_value: str | None  # Python: repr of the last expression; bash: None
    execution_count: int
    duration_ms: float
    truncated: bool
    error: ExecutionError | None
    exit_code: int | None  # bash: the exit status; Python: None
    output_length: int  # characters of combined output: the offset after the last chunk


@dataclass(frozen=True, slots=True)
class AgentInfo:
    language: str
    state: str  # "starting" | "idle" | "busy" | "restarting" | "dead"
    execution_count: int
    current_execution: str | None
    agent_pid: int
    worker_pid: int | None
    interpreter: str | None  # "Python 3.11.2", "bash 5.2.15(1)-release"
    dead_reason: str | None
    started_at: float  # epoch seconds
    output_cap: int
    kill_grace: float  # seconds the interpreter has to stop after an interrupt
    protocol: int


def _info(frame: dict[str, Any]) -> AgentInfo:
    try:
        return AgentInfo(
            language=str(frame["language"]),
            state=str(frame["state"]),
            execution_count=int(frame["execution_count"]),
            current_execution=frame.get("current_execution"),
            agent_pid=int(frame["agent_pid"]),
            worker_pid=frame.get("worker_pid"),
            interpreter=frame.get("interpreter"),
            dead_reason=frame.get("dead_reason"),
            started_at=float(frame["started_at"]),
            output_cap=int(frame["output_cap"]),
            kill_grace=float(frame["kill_grace"]),
            protocol=int(frame["protocol"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed agent info: {exc!r}") from None


def _result(frame: dict[str, Any]) -> ExecutionResult:
    try:
        error = frame.get("error")
        return ExecutionResult(
            execution_id=str(frame["execution_id"]),
            status=str(frame["status"]),
            stdout=str(frame["stdout"]),
            stderr=str(frame["stderr"]),
            return_value=frame.get("return_value"),
            execution_count=int(frame["execution_count"]),
            duration_ms=float(frame["duration_ms"]),
            truncated=bool(frame["truncated"]),
            error=ExecutionError(
                ename=str(error["ename"]),
                evalue=str(error["evalue"]),
                traceback=str(error.get("traceback") or ""),
            )
            if error
            else None,
            exit_code=frame.get("exit_code"),
            output_length=int(frame.get("output_length") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed result: {exc!r}") from None


def _raise_for(frame: dict[str, Any]) -> None:
    """Turn an ``error`` or ``dead`` frame into its exception."""
    kind = frame.get("type")
    if kind == "dead":
        raise KernelDead(
            str(frame.get("reason") or "the interpreter died"),
            execution_id=frame.get("execution_id"),
            stdout=str(frame.get("stdout") or ""),
            stderr=str(frame.get("stderr") or ""),
        )
    if kind != "error":
        return
    code = frame.get("code")
    message = str(frame.get("message") or code)
    if code == "dead":
        raise KernelDead(message)
    if code == "busy":
        raise KernelBusy(message, execution_id=frame.get("execution_id"))
    if code == "unknown_execution":
        raise UnknownExecution(message)
    error = ProtocolError(f"the agent refused the request ({code}): {message}")
    if code == "duplicate_execution":
        error.code = "duplicate_execution"
    raise error


def _open_socket(path: str, timeout: float) -> socket.socket:
    """Connect to the agent's socket; the last path component must be a socket, never a
    symlink (the directory is writable from inside the sandbox)."""
    mode = os.lstat(path).st_mode  # FileNotFoundError: not there (yet)
    if not stat.S_ISSOCK(mode):
        raise ProtocolError(f"{path} is not a unix socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(0.001, timeout))
    try:
        if len(os.fsencode(path)) < 100:
            sock.connect(path)
        else:  # longer than sun_path allows: go through the directory's descriptor
            directory, name = os.path.split(path)
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{fd}/{name}")
            finally:
                os.close(fd)
    except BaseException:
        sock.close()
        raise
    return sock


class _Connection:
    """One socket speaking JSON lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def send(self, request: dict[str, Any]) -> None:
        try:
            self.sock.settimeout(_IO_TIMEOUT)
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise ConnectionLost(f"cannot send to the kernel agent: {exc}") from None

    def read(self, timeout: float | None) -> dict[str, Any]:
        """The next frame; ``timeout``: seconds of silence allowed (None: forever)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                try:
                    frame = json.loads(line)
                except ValueError:
                    raise ProtocolError(f"not a JSON line from the agent: {line[:200]!r}") from None
                if not isinstance(frame, dict):
                    raise ProtocolError(f"not a frame: {frame!r}")
                return frame
            try:
                self.sock.settimeout(timeout)
                chunk = self.sock.recv(_RECV)
            except TimeoutError:
                raise ConnectionLost(f"the kernel agent said nothing for {timeout:g} s") from None
            except OSError as exc:
                raise ConnectionLost(f"connection to the kernel agent broken: {exc}") from None
            if not chunk:
                raise ConnectionLost("the kernel agent closed the connection")
            self.buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _handshake(path: str, timeout: float) -> tuple[_Connection, AgentInfo]:
    conn = _Connection(_open_socket(path, timeout))
    try:
        conn.send({"op": "hello"})
        frame = conn.read(timeout)  # ConnectionLost (an AgentUnavailable): it went away
        if frame.get("type") != "hello" or frame.get("agent") != AGENT_NAME:
            raise ProtocolError(f"{path} is not a berthd kernel agent (got {frame!r:.200})")
        if frame.get("protocol") != PROTOCOL:
            raise ProtocolError(
                f"the agent at {path} speaks protocol {frame.get('protocol')}, not {PROTOCOL}"
            )
        return conn, _info(frame)
    except BaseException:
        conn.close()
        raise


class AgentClient:
    """A client of one kernel agent; see the module docstring. Use ``connect``."""

    def __init__(self, socket_path: str, conn: _Connection, info: AgentInfo) -> None:
        self.socket_path = socket_path
        self.hello = info  # what the agent said when this client connected
        self._conn: _Connection | None = conn
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(cls, socket_path: str, timeout: float = 10.0) -> AgentClient:
        """Connect and check it is an agent of our protocol, retrying while the socket
        does not exist or nobody listens yet (an agent still starting) for ``timeout``
        seconds, then ``AgentUnavailable``. Returns once the interpreter is up (state no
        longer "starting", within the same ``timeout``); a kernel that could not start
        says "dead" in ``hello`` and raises ``KernelDead`` at its first execution."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                conn, info = _handshake(socket_path, max(0.05, left))
                client = cls(socket_path, conn, info)
                while client.hello.state == "starting" and time.monotonic() < deadline:
                    time.sleep(0.005)
                    client.hello = client.info()
                return client
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if left <= 0:
                    raise AgentUnavailable(
                        f"no kernel agent answers on {socket_path} after {timeout:g} s ({exc}); "
                        "is its sandbox running? its log says why it is not"
                    ) from None
            except OSError as exc:
                raise AgentUnavailable(
                    f"cannot reach the kernel agent at {socket_path}: {exc}"
                ) from None
            time.sleep(min(0.02, max(0.0, left)))

    def close(self) -> None:
        """Drop the connection; the kernel and any running execution carry on. From
        another thread, it abandons a wait in progress (which raises ``ConnectionLost``)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader in another thread
            conn.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _main(self) -> Iterator[_Connection]:
        """The client's own connection, held exclusively."""
        with self._lock, self._held() as conn:
            yield conn

    @contextlib.contextmanager
    def _held(self) -> Iterator[_Connection]:
        """The main connection (caller holds the lock), reconnected if it was lost."""
        if self._closed:
            raise KernelError("this client is closed")
        if self._conn is None:
            try:
                self._conn, _ = _handshake(self.socket_path, _IO_TIMEOUT)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnavailable(
                    f"the kernel agent at {self.socket_path} is gone: {exc}"
                ) from None
        conn = self._conn
        try:
            yield conn
        except (KernelDead, KernelBusy, UnknownExecution):
            raise  # answered by a request's last frame: the connection is still in step
        except BaseException:
            # Anything else may leave frames in flight: never reuse that connection.
            conn.close()
            self._conn = None
            raise

    @contextlib.contextmanager
    def _any(self) -> Iterator[_Connection]:
        """The main connection if it is free, else a short-lived one of its own."""
        if self._lock.acquire(blocking=False):
            try:
                with self._held() as conn:
                    yield conn
            finally:
                self._lock.release()
        else:
            with self._side() as conn:
                yield conn

    def _call(self, request: dict[str, Any], timeout: float = _IO_TIMEOUT) -> dict[str, Any]:
        with self._any() as conn:
            conn.send(request)
            frame = conn.read(timeout)
            _raise_for(frame)
            return frame

    # ------------------------------------------------------------------ requests

    def info(self) -> AgentInfo:
        return _info(self._call({"op": "info"}))

    def ping(self) -> float:
        """Round trip to the agent, in seconds."""
        began = time.perf_counter()
        frame = self._call({"op": "ping"})
        if frame.get("type") != "pong":
            raise ProtocolError(f"expected pong, got {frame!r:.200}")
        return time.perf_counter() - began

    def execute(
        self,
        code: str,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        *,
        execution_id: str | None = None,
        output_cap: int | None = None,
    ) -> ExecutionResult:
        """Run ``code`` and wait for its result (status "ok", "error" or "timeout").

        ``timeout``: seconds before the agent interrupts it (its whole process tree).
        ``on_output(stream, text)`` gets output as it comes; if it raises, the wait is
        abandoned and the exception propagates - the execution goes on in the agent.
        ``execution_id``: choose the id (e.g. recorded beforehand), so that a retry
        after a lost connection attaches instead of running the code twice.
        ``output_cap``: characters kept per stream (default: the agent's).
        Raises ``KernelDead`` (never a result) if the interpreter died, ``KernelBusy``,
        ``ConnectionLost`` (attach again with its ``execution_id`` and ``offset``)."""
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        request: dict[str, Any] = {
            "op": "execute",
            "code": code,
            "timeout": timeout,
            "stream": on_output is not None,
        }
        if execution_id is not None:
            request["execution_id"] = execution_id
        if output_cap is not None:
            if output_cap < 0:
                raise ValueError("output_cap must be >= 0")
            request["output_cap"] = output_cap
        with self._main() as conn:
            conn.send(request)
            try:
                frame = conn.read(_IO_TIMEOUT)
            except ConnectionLost as exc:
                exc.execution_id = execution_id  # it may or may not have started
                raise
            _raise_for(frame)
            if frame.get("type") != "started":
                raise ProtocolError(f"expected started, got {frame!r:.200}")
            return self._follow(conn, str(frame["execution_id"]), 0, on_output, timeout)

    def attach(
        self,
        execution_id: str,
        offset: int = 0,
        on_output: OutputCallback | None = None,
        *,
        timeout: float | None = None,
    ) -> ExecutionResult:
        """Follow an execution (running or finished): its output from ``offset`` (in
        characters of the combined output), then its result. ``timeout``: give up (with
        ``ConnectionLost``) after that many seconds without a frame."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        request = {
            "op": "attach",
            "execution_id": execution_id,
            "offset": offset,
            "stream": on_output is not None,
        }
        with self._main() as conn:
            conn.send(request)
            return self._follow(conn, execution_id, offset, on_output, None, silence=timeout)

    def _follow(
        self,
        conn: _Connection,
        execution_id: str,
        offset: int,
        on_output: OutputCallback | None,
        timeout: float | None,
        *,
        silence: float | None = None,
    ) -> ExecutionResult:
        # The agent itself ends a timed-out execution within its kill grace; a silence
        # much longer than that means the agent is stuck.
        if silence is not None:
            wait: float | None = silence
        elif timeout is not None:
            wait = timeout + self.hello.kill_grace + _RESULT_MARGIN
        else:
            wait = None
        while True:
            try:
                frame = conn.read(wait)
            except ConnectionLost as exc:
                exc.execution_id, exc.offset = execution_id, offset
                raise
            kind = frame.get("type")
            if frame.get("execution_id") not in (execution_id, None) and kind != "error":
                continue
            if kind == "output":
                start, text = int(frame["offset"]), str(frame["text"])
                if start > offset:
                    raise ProtocolError(f"output gap: expected offset {offset}, got {start}")
                text = text[offset - start :]
                if not text:
                    continue
                offset += len(text)
                if on_output is not None:
                    on_output(str(frame["stream"]), text)
            elif kind == "result":
                return _result(frame)
            elif kind in ("dead", "error"):
                _raise_for(frame)

    def interrupt(self) -> str | None:
        """Interrupt the running execution (as its timeout would); returns its id, or
        None if nothing was running. Does not wait for it to stop."""
        with self._side() as conn:
            conn.send({"op": "interrupt"})
            frame = conn.read(_IO_TIMEOUT)
        _raise_for(frame)
        value = frame.get("execution_id")
        return str(value) if value is not None else None

    @contextlib.contextmanager
    def _side(self) -> Iterator[_Connection]:
        try:
            conn, _ = _handshake(self.socket_path, _IO_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(
                f"the kernel agent at {self.socket_path} is gone: {exc}"
            ) from None
        try:
            yield conn
        finally:
            conn.close()

    def restart(self, timeout: float = _RESTART_TIMEOUT) -> AgentInfo:
        """Kill the interpreter and its processes and start a fresh one (state cleared,
        execution count back to 0; revives a dead kernel). Returns once it is ready."""
        frame = self._call({"op": "restart"}, timeout=timeout)
        if frame.get("type") != "restarted":
            raise ProtocolError(f"expected restarted, got {frame!r:.200}")
        return _info(frame)

    def shutdown(self) -> None:
        """Stop the agent (and its interpreter). The sandbox's main command ends with it."""
        with contextlib.suppress(ConnectionLost):
            self._call({"op": "shutdown"})
        self.close()
