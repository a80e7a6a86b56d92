"""Exec for runtimes whose sandboxes are host processes (local, fake): run one command
with a stdin, capped output and a timeout that kills its whole process tree, or drive it
interactively as an ``ExecStream``.

The caller supplies how to kill and signal the tree (a bubblewrap sandbox and a plain
process group differ), and what to do once the main process has ended (reap whatever
it left behind, as a container engine would when the exec's namespace goes away).
"""

from __future__ import annotations

import contextlib
import os
import pty
import selectors
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from berthd.runtime._util import CappedBuffer, exit_code_from_returncode, signal_number
from berthd.runtime.base import ExecResult, ExecStream, RuntimeFailure

__all__ = ["ProcessExecStream", "Spawner", "run_to_completion"]

_CHUNK = 65536
# After the main process ended, how long to keep reading what is still in the pipes.
_DRAIN_SECONDS = 1.0
# After a timeout kill, how long to wait for the tree to go.
_KILL_GRACE_SECONDS = 3.0


class Spawner:
    """How to start, kill and signal one exec'd process tree on the host."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: int | None = None,
        group: int | None = None,
        kill_tree: Callable[[int], None],
        signal_tree: Callable[[int, int], None],
        after_exit: Callable[[int], None] | None = None,
        display_name: str | None = None,
        launcher: Callable[[Callable[[], subprocess.Popen[bytes]]], subprocess.Popen[bytes]]
        | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.user = user
        self.group = group
        self.kill_tree = kill_tree
        self.signal_tree = signal_tree
        self.after_exit = after_exit
        self.display_name = display_name or (self.argv[-1] if self.argv else "?")
        self.launcher = launcher
        # Descriptors the process inherits (same numbers); owned here: closed once the
        # process is started, or by ``release`` if it never is.
        self.pass_fds = tuple(pass_fds)

    def release(self) -> None:
        """Close the descriptors meant for the process (idempotent)."""
        fds, self.pass_fds = self.pass_fds, ()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def popen(self, *, stdin: int, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
        """Start in a new session (own process group); drop to ``user`` if given.

        ``launcher``, if set, runs the spawn on a thread of its choosing (the parent
        thread matters for PR_SET_PDEATHSIG)."""

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user,
                group=self.group,
                extra_groups=[] if self.user is not None else None,
                close_fds=True,
                pass_fds=self.pass_fds,
            )

        try:
            return self.launcher(spawn) if self.launcher is not None else spawn()
        except FileNotFoundError as exc:
            if exc.filename == self.cwd:
                raise RuntimeFailure(f"working directory {self.cwd!r} does not exist") from None
            raise _NotStarted(127, f"{self.display_name}: command not found") from None
        except PermissionError as exc:
            raise _NotStarted(126, f"{self.display_name}: {exc.strerror}") from None
        except OSError as exc:
            raise RuntimeFailure(f"cannot start {self.display_name!r}: {exc}") from None
        finally:
            self.release()


def _has_exited(pid: int, *, block: bool = False) -> bool:
    """Whether child ``pid`` ended, WITHOUT reaping it: while it is a zombie its pid (and
    process group id) cannot be recycled, so killing what it left behind stays safe."""
    flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
    try:
        return os.waitid(os.P_PID, pid, flags) is not None
    except ChildProcessError:  # already reaped
        return True
    except InterruptedError:
        return False


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), if available."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class _NotStarted(Exception):
    """The command could not be started: reported like a shell does (126/127 + stderr)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def run_to_completion(
    spawner: Spawner,
    *,
    stdin: bytes | None,
    timeout: float | None,
    output_cap: int,
) -> ExecResult:
    """Run to the end (or the timeout), feeding ``stdin`` and keeping ``output_cap``
    bytes of each stream; the rest is read and dropped so the process never blocks."""
    started = time.monotonic()
    try:
        proc = spawner.popen(
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except _NotStarted as exc:
        return ExecResult(
            exit_code=exc.exit_code,
            stdout=b"",
            stderr=(exc.message + "\n").encode(),
            duration_ms=(time.monotonic() - started) * 1000,
        )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = CappedBuffer(output_cap), CappedBuffer(output_cap)
    buffers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    sel = selectors.DefaultSelector()
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    exit_fd = _pidfd(proc.pid)
    if exit_fd is not None:
        sel.register(exit_fd, selectors.EVENT_READ)
    pending = memoryview(stdin or b"")
    if proc.stdin is not None:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    deadline = started + timeout if timeout is not None else None
    stop_reading_at: float | None = None
    timed_out = False
    exit_handled = False
    try:
        while True:
            now = time.monotonic()
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                spawner.kill_tree(proc.pid)
                stop_reading_at = now + _KILL_GRACE_SECONDS
            if not exit_handled and _has_exited(proc.pid):
                exit_handled = True
                if spawner.after_exit is not None:
                    spawner.after_exit(proc.pid)
                proc.poll()
                if exit_fd is not None:
                    sel.unregister(exit_fd)
                stop_reading_at = min(stop_reading_at or float("inf"), now + _DRAIN_SECONDS)
            readers = [k for k in sel.get_map().values() if k.fd in buffers]
            if exit_handled and not readers:
                break
            if stop_reading_at is not None and now >= stop_reading_at:
                break
            # Without a pidfd, look at the process every 10 ms.
            limits = [0.5 if exit_fd is not None or exit_handled else 0.01]
            if deadline is not None and not timed_out:
                limits.append(max(0.0, deadline - now))
            if stop_reading_at is not None:
                limits.append(max(0.0, stop_reading_at - now))
            if not sel.get_map():
                time.sleep(min(limits))
                continue
            for key, _ in sel.select(timeout=min(limits)):
                fd = int(key.fd)
                if fd == exit_fd:
                    continue  # handled at the top of the loop
                if fd in buffers:
                    try:
                        chunk = os.read(fd, _CHUNK)
                    except BlockingIOError:
                        continue
                    if chunk:
                        buffers[fd].append(chunk)
                    else:
                        sel.unregister(fd)
                    continue
                try:
                    pending = pending[os.write(fd, pending[:_CHUNK]) :]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    pending = memoryview(b"")
                if not pending:
                    sel.unregister(fd)
                    assert proc.stdin is not None
                    proc.stdin.close()
    finally:
        sel.close()
        if exit_fd is not None:
            os.close(exit_fd)
        if not exit_handled and not _has_exited(proc.pid):
            spawner.kill_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_KILL_GRACE_SECONDS)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return ExecResult(
        exit_code=exit_code_from_returncode(proc.returncode)
        if proc.returncode is not None
        else None,
        stdout=out.getvalue(),
        stderr=err.getvalue(),
        duration_ms=(time.monotonic() - started) * 1000,
        truncated=out.truncated or err.truncated,
        timed_out=timed_out,
    )


class ProcessExecStream(ExecStream):
    """An interactive exec over pipes (or a pty when ``tty``): stdin in, chunks out.

    Without a tty, stdout and stderr come apart; with one, everything is "stdout" and
    closing stdin sends end-of-file (^D) as a terminal would. One reaper thread notices
    the exit, cleans up what the process left behind, then reaps it, so no pid is ever
    signalled after it could have been recycled. ``timed_out`` becomes True when
    ``timeout`` killed the tree."""

    def __init__(self, spawner: Spawner, *, tty: bool, timeout: float | None) -> None:
        self._spawner = spawner
        self._lock = threading.Lock()  # signals and kills versus reaping
        self._stdin_lock = threading.Lock()  # a blocked write must not block a kill
        self._stdin_closed = False
        self._closed = False
        self._exited = threading.Event()
        self._exit_code: int | None = None
        self.timed_out = False
        self._master: int | None = None
        if tty:
            master, slave = pty.openpty()
            try:
                self._proc = spawner.popen(stdin=slave, stdout=slave, stderr=slave)
            except _NotStarted as exc:
                os.close(master)
                raise RuntimeFailure(exc.message) from None
            finally:
                os.close(slave)
            self._master = master
        else:
            try:
                self._proc = spawner.popen(
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            except _NotStarted as exc:
                raise RuntimeFailure(exc.message) from None
        self._reaper = threading.Thread(
            target=self._reap, name=f"exec-reaper-{self._proc.pid}", daemon=True
        )
        self._reaper.start()
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _reap(self) -> None:
        while not _has_exited(self._proc.pid, block=True):
            pass
        with self._lock:
            if self._spawner.after_exit is not None:
                self._spawner.after_exit(self._proc.pid)
            code = self._proc.wait()
            self._exit_code = exit_code_from_returncode(code)
            self._exited.set()

    def _on_timeout(self) -> None:
        with self._lock:
            if not self._exited.is_set():
                self.timed_out = True
                self._spawner.kill_tree(self._proc.pid)

    def write_stdin(self, data: bytes) -> None:
        with self._stdin_lock:
            if self._stdin_closed or self._closed:
                raise RuntimeFailure("stdin of this exec is closed")
            try:
                if self._master is not None:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._master, view) :]
                else:
                    assert self._proc.stdin is not None
                    self._proc.stdin.write(data)
                    self._proc.stdin.flush()
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise RuntimeFailure(f"the process no longer reads stdin ({exc})") from None

    def close_stdin(self) -> None:
        with self._stdin_lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            if self._master is not None:
                with contextlib.suppress(OSError):
                    os.write(self._master, b"\x04")
            elif self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()

    def signal(self, signame: str) -> None:
        number = signal_number(signame)
        with self._lock:
            if not self._exited.is_set():
                self._spawner.signal_tree(self._proc.pid, number)

    def output(self) -> Iterator[tuple[str, bytes]]:
        names: dict[int, str] = {}
        if self._master is not None:
            names[self._master] = "stdout"
        else:
            assert self._proc.stdout is not None and self._proc.stderr is not None
            names[self._proc.stdout.fileno()] = "stdout"
            names[self._proc.stderr.fileno()] = "stderr"
        sel = selectors.DefaultSelector()
        for fd in names:
            sel.register(fd, selectors.EVENT_READ)
        stop_at: float | None = None
        try:
            while sel.get_map():
                if stop_at is None and self._exited.is_set():
                    stop_at = time.monotonic() + _DRAIN_SECONDS
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                for key, _ in sel.select(timeout=0.1):
                    fd = int(key.fd)
                    try:
                        chunk = os.read(fd, _CHUNK)
                    except OSError:  # EIO on a pty whose other side is gone
                        chunk = b""
                    if chunk:
                        yield names[fd], chunk
                    else:
                        sel.unregister(fd)
        finally:
            sel.close()

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self._exit_code

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if not self._exited.is_set():
                self._spawner.kill_tree(self._proc.pid)
        self._exited.wait(_KILL_GRACE_SECONDS)
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
