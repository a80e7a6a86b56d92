"""The local runtime's container shim: the parent of a container's main process.

Run as ``python -m berthd.runtime._shim CONTAINER_DIR`` in a session of its own, so the
daemon can die (even by SIGKILL) and restart while containers keep running. It:

1. reads ``launch.json`` (argv, env, cwd, uid/gid, log file) written by the runtime;
2. spawns the command in a process group of its own, stdout+stderr to the log file;
3. writes ``state.json`` atomically: its own and the child's pid, process-group id and
   start time (so a recycled pid is never mistaken for ours), ``started_at``, boot id;
4. waits; when the command ends it SIGKILLs whatever the command left in its process
   group (the process is still a zombie then, so the group id cannot have been
   recycled) and, when the container has a uid of its own, every process of that uid
   (execs included: a container's processes end with its main process, as in Docker);
   then writes ``exit.json`` (exit code, 128+N for a signal, ``finished_at``) atomically
   and exits.

A *detached* process (``LocalRuntime.exec_detached``) has a shim of its own, in a
directory of its own: its ``launch.json`` names the container's main process
(``container``: pid and start time). That shim also ends its command (the whole tree)
when the main process ends, and never kills by uid: the container's other processes are
not its to end.

A spawn failure is written to ``exit.json`` with an ``error`` and exit code 127/126.
TERM, INT, HUP, QUIT, USR1 and USR2 sent to the shim are forwarded to the container's
processes, so an administrator's ``kill <shim>`` stops the container and its exit is
still recorded. Stdlib only (plus ``berthd.runtime._proc``, itself stdlib only): it must
start fast and must not drag the daemon's dependencies into every container.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from typing import Any

from berthd.runtime import _proc

LAUNCH_FILE = "launch.json"
STATE_FILE = "state.json"
EXIT_FILE = "exit.json"

_FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Write, fsync, rename: readers see the old file or the whole new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _start_time(pid: int) -> int | None:
    info = _proc.read_proc(pid)
    return info.start_time if info is not None else None


def _die_with_shim(shim_pid: int) -> Any:
    """For the sandboxed command: SIGKILL when the shim dies, from its first instruction
    on (bubblewrap's own --die-with-parent only starts once it runs, and a shim killed
    right after the start would leave the sandbox behind). The shim is single-threaded,
    so a ``preexec_fn`` is safe here; it runs after the uid change, which would clear it."""
    import ctypes

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != shim_pid:
            os._exit(1)  # the shim is already gone

    return arm


def _wait_exit(pid: int) -> None:
    """Notice the exit without reaping, so the process-group id is still ours to kill."""
    while True:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _wait_either(child: int, main_pid: Any, main_start: Any) -> bool:
    """Wait until ``child`` ends (False) or the container's main process does (True),
    without reaping ``child``."""
    if not isinstance(main_pid, int) or main_pid <= 0:
        return True
    try:
        child_fd = os.pidfd_open(child)  # unreaped: always there
    except OSError:  # no pidfd here: poll
        child_fd = -1
    if child_fd >= 0:
        try:
            main_fd = os.pidfd_open(main_pid)
        except OSError:
            os.close(child_fd)
            return True  # the main process is already gone
    else:
        while _proc.alive(main_pid, main_start):
            if os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return False
            time.sleep(0.2)
        return True
    try:
        # Checked after the descriptor is open: a recycled pid is not the container's.
        if not _proc.alive(main_pid, main_start):
            return True
        while True:
            try:
                ready, _, _ = select.select([child_fd, main_fd], [], [])
            except InterruptedError:
                continue
            if main_fd in ready:
                return True
            if child_fd in ready:
                return False
    finally:
        os.close(child_fd)
        os.close(main_fd)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m berthd.runtime._shim CONTAINER_DIR", file=sys.stderr)
        return 2
    container_dir = argv[1]
    with open(os.path.join(container_dir, LAUNCH_FILE)) as f:
        launch: dict[str, Any] = json.load(f)
    sandboxed = bool(launch.get("sandboxed"))
    log_fd = os.open(launch["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    user = launch.get("user")
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: types.FrameType | None) -> None:
        # The handler is Python-level, not SIG_IGN, so the command starts with default
        # dispositions (exec resets handled signals; ignored ones would be inherited).
        if child is not None and child.returncode is None:
            _proc.signal_tree(
                child.pid,
                signum,
                include_root=not sandboxed,
                spare_children_of_root=sandboxed,
            )

    for signum in _FORWARDED:
        signal.signal(signum, forward)

    try:
        # The container's cgroups (local runtime): the shim joins them, so the command
        # starts in them (the shim itself counts there too).
        for procs in launch.get("cgroup_procs") or ():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        child = subprocess.Popen(
            launch["argv"],
            env=launch["env"],
            cwd=launch["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            process_group=0,
            preexec_fn=_die_with_shim(os.getpid()) if sandboxed else None,
            user=user,
            group=launch.get("group"),
            extra_groups=[] if user is not None else None,
            close_fds=True,
            pass_fds=tuple(launch.get("pass_fds") or ()),  # bound mounts, by descriptor
        )
    except OSError as exc:
        code = 126 if isinstance(exc, PermissionError) else 127
        message = f"cannot start {launch['argv'][-1]!r}: {exc}"
        os.write(log_fd, (message + "\n").encode())
        write_json_atomic(
            os.path.join(container_dir, EXIT_FILE),
            {"exit_code": code, "finished_at": _now(), "error": message},
        )
        return 1
    finally:
        os.close(log_fd)

    write_json_atomic(
        os.path.join(container_dir, STATE_FILE),
        {
            "shim_pid": os.getpid(),
            "shim_start": _start_time(os.getpid()),
            "pid": child.pid,
            "pid_start": _start_time(child.pid),
            "sandboxed": sandboxed,
            "started_at": _now(),
            "boot_id": _proc.boot_id(),
        },
    )

    container = launch.get("container")
    if isinstance(container, dict):
        # A detached process: it ends with the container's main process too.
        if _wait_either(child.pid, container.get("pid"), container.get("pid_start")):
            _proc.kill_tree(child.pid)
    else:
        _wait_exit(child.pid)
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if isinstance(user, int) and user != 0 and not isinstance(container, dict):
        # The uid is this container's alone: its execs and escaped daemons end with it.
        _proc.kill_uid(user)
    returncode = child.wait()
    exit_code = 128 - returncode if returncode < 0 else returncode
    write_json_atomic(
        os.path.join(container_dir, EXIT_FILE),
        {"exit_code": exit_code, "finished_at": _now()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
