"""Putting a kernel agent into a sandbox, and finding it again after a daemon restart.

Each kernel has a directory of its own inside its container's shared directory
(``ContainerSpec.berth_dir``): ``kernels/<kernel_id>/`` holding a copy of ``agent.py``
(copied per kernel, so an upgraded daemon never swaps the file under a running agent),
its socket ``agent.sock`` and, for agents started by exec, ``agent.log``. Everything a
new daemon needs to reach a running kernel is the container id and the kernel id.

Two ways to start an agent; both survive the daemon (even SIGKILL):

* **As the container's main command** (every runtime): build the spec with
  ``kernel_spec``, ``runtime.create`` it, ``install_agent``, ``runtime.start``, then
  ``AgentClient.connect(paths.socket_path)``. The container lives as long as the agent:
  ``shutdown`` or a dead agent ends it, and the runtime's exit watch reports it.
* **In a running container** (``start_agent_by_exec``), where ``runtime.detached_execs``
  (Docker, local, fake): ``runtime.exec_detached`` starts the agent as a process of the
  container that outlives the call and the daemon and ends with the container; its
  stdio goes to ``agent.log`` and the call returns once the agent listens.

Any image whose ``python3`` is 3.8 or newer works; a bash kernel also needs ``bash``.

Exec agents (``agent.py serve-exec``, see ``berthd.kernel.exec_agent``) are started
differently: ``exec_agent_command`` as a runtime exec with stdin held open, and
``exec_agent_payload`` (the agent's source) written to that stdin; nothing is installed
in the sandbox and no shared directory is needed.

The sandbox can write its shared directory, so the daemon (often root) must not be led
out of it: ``install_agent`` creates and opens every component with ``O_NOFOLLOW``
relative to the directory's descriptor, and the client refuses a socket path whose last
component is not a socket. A symlinked ``kernels`` directory can at worst make the
client send ``{"op": "hello"}`` to some other socket named ``agent.sock`` and fail its
handshake.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import posixpath
import re
import socket
import stat
import time
import uuid

from berthd.runtime.base import (
    BERTH_DIR_ENV,
    ContainerSpec,
    ExecSpec,
    Runtime,
    RuntimeFailure,
)

__all__ = [
    "LANGUAGES",
    "AgentPaths",
    "agent_command",
    "agent_source",
    "exec_agent_command",
    "exec_agent_payload",
    "install_agent",
    "kernel_spec",
    "locate_agent",
    "start_agent_by_exec",
]

LANGUAGES = ("python", "bash")
KERNELS_DIR = "kernels"
AGENT_FILE = "agent.py"
SOCKET_FILE = "agent.sock"
LOG_FILE = "agent.log"
_KERNEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True, slots=True)
class AgentPaths:
    """Where one kernel's agent lives, seen from the host and from the sandbox."""

    kernel_id: str
    host_dir: str
    sandbox_dir: str

    @property
    def socket_path(self) -> str:
        """The socket to give ``AgentClient.connect`` (a host path)."""
        return os.path.join(self.host_dir, SOCKET_FILE)

    @property
    def log_path(self) -> str:
        """The agent's log on the host (agents started by exec; else the container log)."""
        return os.path.join(self.host_dir, LOG_FILE)


def _check(kernel_id: str, language: str | None = None) -> None:
    if not _KERNEL_ID_RE.match(kernel_id):
        raise ValueError(f"invalid kernel id {kernel_id!r}: use letters, digits, '_' and '-'")
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"unknown kernel language {language!r}; use one of {LANGUAGES}")


def agent_source() -> bytes:
    """The agent script, as shipped in this package (copied, never run from here)."""
    return importlib.resources.files("berthd.kernel").joinpath(AGENT_FILE).read_bytes()


def agent_command(
    kernel_id: str,
    language: str,
    *,
    python: str = "python3",
    output_cap: int | None = None,
    kill_grace: float | None = None,
    daemon: bool = False,
) -> tuple[str, ...]:
    """The argv that runs this kernel's agent from the container's shared directory.

    The path is found through ``$BERTH_DIR`` at run time (it differs between runtimes and
    isolation modes), with Python itself rather than a shell, so images without ``sh``
    work too. ``-I``: the agent ignores the image's PYTHONPATH and user site; the code's
    interpreter (the worker) does not."""
    _check(kernel_id, language)
    bootstrap = (
        "import os,runpy;runpy.run_path(os.path.join(os.environ["
        f"{BERTH_DIR_ENV!r}],{KERNELS_DIR!r},{kernel_id!r},{AGENT_FILE!r}),run_name='__main__')"
    )
    argv = [python, "-I", "-c", bootstrap, "serve", "--language", language]
    if output_cap is not None:
        argv += ["--output-cap", str(int(output_cap))]
    if kill_grace is not None:
        argv += ["--kill-grace", repr(float(kill_grace))]
    if daemon:
        argv.append("--daemon")
    return tuple(argv)


# Reads the agent's source from stdin (10 decimal digits of length, then the bytes) and
# runs it; the same stdin then carries the requests. os.read, not sys.stdin: a buffered
# reader would swallow the first request with the source.
_EXEC_BOOTSTRAP = """\
import os,sys
def r(n):
    b=b''
    while len(b)<n:
        c=os.read(0,n-len(b))
        if not c:
            sys.exit(3)
        b+=c
    return b
g={'__name__':'berthd_exec_agent'}
exec(compile(r(int(r(10))),'berthd-exec-agent','exec'),g)
sys.exit(g['main'](['serve-exec']+sys.argv[1:]))
"""


def exec_agent_command(python: str = "python3", *, heartbeat: float | None = None) -> tuple[str, ...]:
    """The argv of an exec agent (``agent.py serve-exec``): nothing is written into the
    sandbox; its first stdin bytes must be ``exec_agent_payload()``. ``heartbeat``:
    seconds of silence from the daemon after which the agent ends (default 60)."""
    extra = ("--heartbeat", repr(float(heartbeat))) if heartbeat is not None else ()
    return (python, "-I", "-c", _EXEC_BOOTSTRAP, *extra)


def exec_agent_payload() -> bytes:
    """What to write first on an exec agent's stdin: the agent's source, sized."""
    source = agent_source()
    return b"%010d" % len(source) + source


def kernel_spec(
    spec: ContainerSpec,
    kernel_id: str,
    language: str,
    *,
    python: str = "python3",
    output_cap: int | None = None,
    kill_grace: float | None = None,
) -> ContainerSpec:
    """``spec`` for a container whose main command is this kernel's agent (with a
    shared directory). After ``runtime.create``, call ``install_agent`` before starting."""
    command = agent_command(
        kernel_id, language, python=python, output_cap=output_cap, kill_grace=kill_grace
    )
    return dataclasses.replace(spec, command=command, berth_dir=True)


def locate_agent(runtime: Runtime, berth_id: str, kernel_id: str) -> AgentPaths:
    """Where the kernel's agent is (no I/O besides asking the runtime): what a restarted
    daemon calls before ``AgentClient.connect``."""
    _check(kernel_id)
    shared = runtime.berth_dir(berth_id)
    return AgentPaths(
        kernel_id=kernel_id,
        host_dir=os.path.join(shared.host, KERNELS_DIR, kernel_id),
        sandbox_dir=posixpath.join(shared.sandbox, KERNELS_DIR, kernel_id),
    )


def install_agent(runtime: Runtime, berth_id: str, kernel_id: str) -> AgentPaths:
    """Copy the agent into the container's shared directory (``kernels/<kernel_id>/``).

    New directories and the file take the owner and mode of the shared directory, so the
    sandbox's user (the local runtime's per-container uid, an image's non-root user) can
    create its socket there."""
    paths = locate_agent(runtime, berth_id, kernel_id)
    shared = os.path.dirname(os.path.dirname(paths.host_dir))
    try:
        _write_below(shared, [KERNELS_DIR, kernel_id], AGENT_FILE, agent_source())
    except OSError as exc:
        raise RuntimeFailure(f"cannot install the kernel agent in {berth_id}: {exc}") from None
    return paths


def start_agent_by_exec(
    runtime: Runtime,
    berth_id: str,
    kernel_id: str,
    language: str,
    *,
    python: str = "python3",
    output_cap: int | None = None,
    kill_grace: float | None = None,
    timeout: float = 30.0,
) -> AgentPaths:
    """Start a kernel agent in a running container created with a shared directory; it
    keeps running after this returns and after the daemon dies (see the module doc).
    Returns once the agent listens."""
    _check(kernel_id, language)
    if not runtime.detached_execs:
        raise RuntimeFailure(
            f"the {runtime.name} runtime cannot start a long-lived process in a running "
            "container: run the kernel agent as the container's main command (kernel_spec)"
        )
    paths = locate_agent(runtime, berth_id, kernel_id)
    if _accepts(paths.socket_path):
        raise RuntimeFailure(f"another agent already listens for kernel {kernel_id} in {berth_id}")
    paths = install_agent(runtime, berth_id, kernel_id)
    command = agent_command(
        kernel_id, language, python=python, output_cap=output_cap, kill_grace=kill_grace
    )
    # stdio to agent.log, as ``--daemon`` would; a last line once the agent ends
    command = (*command[:3], _logged(kernel_id, command[3]), *command[4:])
    runtime.exec_detached(berth_id, ExecSpec(command=command))
    deadline = time.monotonic() + timeout
    while not _accepts(paths.socket_path):
        log = _tail(paths.log_path)
        if _ENDED in log or time.monotonic() >= deadline:
            output = log.replace(_ENDED, "").strip()
            raise RuntimeFailure(
                f"the kernel agent did not start in {berth_id}: {output or 'no output'}"
            )
        time.sleep(0.02)
    return paths


_ENDED = "berthd: the kernel agent ended"


def _logged(kernel_id: str, bootstrap: str) -> str:
    """``bootstrap`` with stdin from /dev/null and stdout+stderr appended to agent.log."""
    return (
        "import os\n"
        f"d=os.path.join(os.environ[{BERTH_DIR_ENV!r}],{KERNELS_DIR!r},{kernel_id!r})\n"
        f"f=os.open(os.path.join(d,{LOG_FILE!r}),os.O_WRONLY|os.O_CREAT|os.O_APPEND,0o644)\n"
        "n=os.open(os.devnull,os.O_RDONLY)\n"
        "os.dup2(n,0);os.dup2(f,1);os.dup2(f,2);os.close(f);os.close(n)\n"
        "try:\n"
        f" {bootstrap}\n"
        "finally:\n"
        f" os.write(2,b'\\n{_ENDED}\\n')\n"
    )


def _accepts(socket_path: str) -> bool:
    """Does a socket there accept a connection (an agent listens)? Nothing is sent."""
    try:
        if not stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(socket_path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _tail(path: str, size: int = 4000) -> str:
    """The end of the agent's log (written by the sandbox: never followed, never a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        os.lseek(fd, max(0, info.st_size - size), os.SEEK_SET)
        return os.read(fd, size).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _write_below(base: str, directories: list[str], name: str, data: bytes) -> None:
    """Write ``base/dir/.../name`` without following any symlink below ``base``."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        info = os.fstat(fd)
        owner = (info.st_uid, info.st_gid) if os.geteuid() == 0 else None
        mode = info.st_mode & 0o777
        for part in directories:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)  # ELOOP on a planted symlink
            os.close(fd)
            fd = child
            if created:
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)
        temporary = f".{name}.{uuid.uuid4().hex}"
        out = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=fd,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]
            if owner is not None:
                os.fchown(out, *owner)
            os.fchmod(out, 0o644)
        finally:
            os.close(out)
        os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
