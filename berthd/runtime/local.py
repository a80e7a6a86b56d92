"""The local runtime: containers as host processes in a private workspace, sandboxed by
bubblewrap when it is installed.

Layout, one directory per container under ``root_dir`` (mode 0711, root-owned)::

    <berth_id>/spec.json      the ContainerSpec + uid, created_at      (0600)
    <berth_id>/workspace/     /workspace inside, owned by the container's uid (0700)
    <berth_id>/tmp/           /tmp inside, likewise
    <berth_id>/launch.json    what the shim runs                       (0600)
    <berth_id>/state.json     written by the shim once the command runs
    <berth_id>/exit.json      written by the shim when it ends
    <berth_id>/container.log  the main process's stdout + stderr       (0600)
    <berth_id>/detached/<n>/  a detached process (``exec_detached``): launch.json,
                              state.json, exit.json, its log, as above (0700)
    <berth_id>/berth/         the shared directory (``ContainerSpec.berth_dir``), owned by
                              the container's uid (0700); ``/run/berth`` inside bubblewrap,
                              the same host path without it

The main process is started through ``berthd.runtime._shim`` in a session of its own, so
it survives the daemon (even a SIGKILL) and a new ``LocalRuntime`` on the same root
picks it up from the files above: nothing lives only in memory. A detached process
(``exec_detached``, e.g. a kernel agent joining a running container) gets a shim of its
own the same way; that shim also ends it when the main process ends.

What is enforced
----------------
With bubblewrap (``isolation == "bubblewrap"``): a fresh mount namespace whose ``/`` is a
tmpfs holding read-only binds of the host's top-level directories (the "host" image),
``/workspace`` and ``/tmp`` bound read-write to the container's own directories, ``/run``
and the runtime's root replaced by empty tmpfs (no host sockets, no other containers),
``/dev`` and ``/proc`` fresh; every namespace unshared (pid, ipc, uts, cgroup, user, and
net unless ``spec.network``), all capabilities dropped, a new session (no TIOCSTI on a
terminal), uid/gid 65534 inside.

When the daemon runs as root, each container also gets its own unprivileged host uid
(``uid_base + n``): bubblewrap itself is started as that uid, so inside the sandbox
"nobody" is, to the host kernel, a uid that owns nothing but the container's own
directories (bubblewrap run as root with ``--uid`` would still be host root to file
permission checks). The same uid is used without bubblewrap, so even then a container
cannot read root's files or another container's workspace.

Security profile (``berthd.runtime.security``, applied at create and recorded in
``spec.json``): the network is unshared unless the profile has one; capabilities are
dropped and no-new-privileges set (bubblewrap) whatever the profile; the limits are the
profile's, tightened by those asked for. Host mounts are resolved under the mount roots
at create, stored canonical, and resolved again before every launch (the main process
and each exec); a path that has become a symlink elsewhere is refused, and bubblewrap
binds the descriptor that resolution ended on (``--ro-bind-fd``), handed down through
the shim, so nothing swapped in afterwards can redirect it.

Limits: where the host has writable cgroup v1 ``memory``/``pids``/``cpu`` hierarchies
(daemon as root; ``_cgroup``), each container gets its own cgroups, recorded in
``spec.json`` and joined by the main process and every exec before anything else runs:
memory is a total with no swap, pids a total, cpus a CFS quota. Otherwise rlimits:
``memory_mb`` is RLIMIT_AS (address space per process, not a total), ``pids`` is
RLIMIT_NPROC, which the kernel counts per uid: it is a real per-container process limit
only with per-container uids (daemon as root); otherwise it is not applied; ``cpus`` is
not enforced. The size of ``/tmp`` and ``/workspace`` is never bounded
(``enforcement()`` and docs/security.md say so). The rlimits are set with ``prlimit``
(util-linux) in front of the command.

Without bubblewrap (``isolation == "none"``, logged as a WARNING): plain processes in
their own session and process group, cwd the workspace, ``HOME``/``TMPDIR`` pointing into
the container's directories; container paths ``/workspace`` and ``/tmp`` are mapped only
for ``workdir``, ``put_file``/``get_file``, not for paths inside commands. Mounts are
refused (they need a mount namespace).

Signals go to the whole tree: the process group of the main process plus all of its
descendants (bubblewrap: everything below the sandbox's init; its init and the outer
bubblewrap are spared TERM/INT/..., which they would not forward, and get KILL).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import berthd
from berthd.runtime import _files, _proc
from berthd.runtime._cgroup import CgroupV1
from berthd.runtime._hostexec import ProcessExecStream, Spawner, run_to_completion
from berthd.runtime._shim import EXIT_FILE, LAUNCH_FILE, STATE_FILE, write_json_atomic
from berthd.runtime._util import ExitTracker, format_time, signal_number, utc_now
from berthd.runtime.base import (
    BERTH_DIR_ENV,
    LOG_TAIL_WINDOW,
    SANDBOX_BERTH_DIR,
    BerthDir,
    CommandMissing,
    ContainerSpec,
    ExecResult,
    ExecSpec,
    ExecStream,
    ExitNotice,
    ImageInfo,
    ImageMissing,
    Runtime,
    RuntimeFailure,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxStatus,
    WorkdirNotFound,
    last_lines,
)

__all__ = ["LocalRuntime"]

log = logging.getLogger(__name__)

HOST_IMAGE = "host"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_UID = 65534  # what processes see inside bubblewrap
SPEC_FILE = "spec.json"
LOG_FILE = "container.log"
SHIM_LOG_FILE = "shim.log"
DETACHED_DIR = "detached"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Top-level host entries the sandbox never gets from the host.
_NOT_FROM_HOST = frozenset({"proc", "dev", "tmp", "workspace", "run", "sys"})
_START_TIMEOUT = 10.0
_LOG_CHUNK = 1 << 20  # bytes read from a log file at a time
_KILL_WAIT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Paths:
    root: str

    @property
    def spec(self) -> str:
        return os.path.join(self.root, SPEC_FILE)

    @property
    def workspace(self) -> str:
        return os.path.join(self.root, "workspace")

    @property
    def tmp(self) -> str:
        return os.path.join(self.root, "tmp")

    @property
    def launch(self) -> str:
        return os.path.join(self.root, LAUNCH_FILE)

    @property
    def state(self) -> str:
        return os.path.join(self.root, STATE_FILE)

    @property
    def exit(self) -> str:
        return os.path.join(self.root, EXIT_FILE)

    @property
    def log(self) -> str:
        return os.path.join(self.root, LOG_FILE)

    @property
    def shim_log(self) -> str:
        return os.path.join(self.root, SHIM_LOG_FILE)

    @property
    def berth(self) -> str:
        return os.path.join(self.root, "berth")

    @property
    def detached(self) -> str:
        return os.path.join(self.root, DETACHED_DIR)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _signal_sandbox(outer_pid: int, sig: int, settle: float = 2.0) -> None:
    """Signal what runs inside a bubblewrap sandbox whose outer process is ``outer_pid``.

    KILL takes everything, bwrap included. Other signals spare bwrap's two processes
    (they would not forward it, and a TERM would make the outer one tear the sandbox
    down with SIGKILL); if the command has not been forked yet (the sandbox is still
    being set up), retry briefly rather than lose the signal."""
    if sig == _signal.SIGKILL:
        _proc.signal_tree(outer_pid, sig)
        return
    deadline = time.monotonic() + settle
    while _proc.signal_tree(outer_pid, sig, include_root=False, spare_children_of_root=True) == 0:
        if time.monotonic() >= deadline or _proc.read_proc(outer_pid) is None:
            return
        time.sleep(0.005)


class LocalRuntime(Runtime):
    """Containers as sandboxed host processes under ``root_dir`` (see the module doc).

    ``use_bwrap``: None = use bubblewrap when ``bwrap`` is on PATH and works, True = require
    it (``RuntimeUnavailable`` otherwise), False = plain processes. ``uid_base`` and
    ``uid_count`` bound the per-container host uids used when the daemon runs as root.
    """

    name = "local"
    detached_execs = True  # exec_detached: a shim of its own per process

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        node_id: str,
        use_bwrap: bool | None = None,
        *,
        poll_interval: float = 0.5,
        uid_base: int = 2_000_000_000,
        uid_count: int = 100_000,
        use_cgroups: bool = True,
    ) -> None:
        self.node_id = node_id
        self._root = os.path.abspath(os.fspath(root_dir))
        self._poll_interval = poll_interval
        self._uid_base = uid_base
        self._uid_count = uid_count
        self._as_root = os.geteuid() == 0
        self._prlimit = shutil.which("prlimit")
        os.makedirs(self._root, mode=0o711, exist_ok=True)
        os.makedirs(os.path.join(self._root, ".uids"), mode=0o700, exist_ok=True)
        if self._as_root:
            self._check_searchable(self._root)
        self._bwrap = self._find_bwrap(use_bwrap)
        # per-container cgroups where the host allows them (_cgroup); else rlimits only
        self._cgroups = CgroupV1.detect(node_id) if use_cgroups else None
        if self._bwrap is None:
            log.warning(
                "isolation: none - local containers under %s run as plain host processes "
                "(install bubblewrap to sandbox them)",
                self._root,
            )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Execs we started, per container: they end when the container stops (the shim
        # also kills every process of a per-container uid; this covers the rest).
        self._execs: dict[str, set[subprocess.Popen[bytes]]] = {}
        self._watch_thread: threading.Thread | None = None
        self._on_exit: Callable[[ExitNotice], None] | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        # Execs are spawned from this one long-lived thread (see _sandbox_argv).
        self._spawner = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"local-spawner-{node_id}"
        )

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_searchable(root: str) -> None:
        """Sandboxes run as other uids and must reach their directories under ``root``."""
        path = Path(root)
        for directory in [path, *path.parents]:
            if not os.stat(directory).st_mode & 0o001:
                raise RuntimeFailure(
                    f"{directory} is not searchable by other users; local containers run as "
                    f"per-container uids and need o+x on every parent of {root} "
                    "(chmod o+x, or choose another root directory)"
                )

    def _find_bwrap(self, use_bwrap: bool | None) -> str | None:
        if use_bwrap is False:
            return None
        path = shutil.which("bwrap")
        if path is None:
            if use_bwrap:
                raise RuntimeUnavailable("bubblewrap requested but `bwrap` is not on PATH")
            return None
        problem = self._probe_bwrap(path)
        if problem is None:
            return path
        if use_bwrap:
            raise RuntimeUnavailable(f"bubblewrap does not work here: {problem}")
        log.warning("bubblewrap found at %s but unusable (%s); falling back", path, problem)
        return None

    def _probe_bwrap(self, path: str) -> str | None:
        """Run ``true`` in a sandbox built like ours, as a sandbox uid would."""
        user = self._uid_base + self._uid_count if self._as_root else None
        argv = [
            path,
            *self._root_binds(),
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--remount-ro", "/",
            "--unshare-all", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--new-session",
            "--", "true",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                timeout=10,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
                cwd="/",
                env={"PATH": DEFAULT_PATH},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if done.returncode != 0:
            return done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        return None

    @staticmethod
    def _root_binds() -> list[str]:
        """The "host" image: the host's top-level directories, read-only, on a tmpfs /."""
        argv = ["--tmpfs", "/"]
        for entry in sorted(os.listdir("/")):
            if entry in _NOT_FROM_HOST:
                continue
            path = "/" + entry
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path) or os.path.isfile(path):
                argv += ["--ro-bind", path, path]
        argv += ["--ro-bind", "/sys", "/sys", "--tmpfs", "/run"]
        return argv

    # ------------------------------------------------------------------ properties

    @property
    def isolation(self) -> str:
        return "bubblewrap" if self._bwrap is not None else "none"

    def ping(self) -> None:
        if not os.access(self._root, os.R_OK | os.W_OK | os.X_OK):
            raise RuntimeUnavailable(f"runtime directory {self._root} is not accessible")

    # ------------------------------------------------------------------ helpers

    def _lock(self, berth_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(berth_id, threading.Lock())

    def _paths(self, berth_id: str) -> _Paths:
        if not isinstance(berth_id, str) or not _ID_RE.match(berth_id):
            raise SandboxNotFound(f"no container {berth_id!r} (not a valid id)")
        return _Paths(os.path.join(self._root, berth_id))

    def _spec(self, paths: _Paths, berth_id: str) -> dict[str, Any]:
        spec = _read_json(paths.spec)
        if spec is None:
            raise SandboxNotFound(f"no container {berth_id} in the local runtime")
        return spec

    def _owner(self, spec: dict[str, Any]) -> tuple[int, int] | None:
        uid = spec.get("uid")
        return (uid, uid) if isinstance(uid, int) else None

    def _allocate_uid(self, berth_id: str) -> int:
        """Claim a free uid with an O_EXCL file, so concurrent creators never share one."""
        claims = os.path.join(self._root, ".uids")
        start = int.from_bytes(berth_id.encode()[-8:].rjust(8, b"\0"), "big") % self._uid_count
        for step in range(self._uid_count):
            uid = self._uid_base + (start + step) % self._uid_count
            try:
                fd = os.open(
                    os.path.join(claims, str(uid)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(berth_id)
            return uid
        raise RuntimeFailure("no free sandbox uid left; remove some containers")

    def _release_uid(self, uid: int | None) -> None:
        if isinstance(uid, int):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._root, ".uids", str(uid)))

    def _host_path(self, paths: _Paths, container_path: str) -> str:
        """Where a container path lives on the host, for this isolation mode."""
        norm = os.path.normpath(container_path)
        for prefix, host in (("/workspace", paths.workspace), ("/tmp", paths.tmp)):
            if norm == prefix or norm.startswith(prefix + "/"):
                return host + norm[len(prefix) :]
        return norm

    def _env(self, spec: dict[str, Any], paths: _Paths, extra: dict[str, str]) -> dict[str, str]:
        """A clean environment: never the daemon's (it may hold keys)."""
        if self._bwrap is not None:
            env = {"PATH": DEFAULT_PATH, "HOME": "/workspace", "TMPDIR": "/tmp"}
        else:
            env = {"PATH": DEFAULT_PATH, "HOME": paths.workspace, "TMPDIR": paths.tmp}
        env.update(LANG="C.UTF-8", USER="nobody", LOGNAME="nobody")
        env.update(spec.get("env") or {})
        env.update(extra)
        if spec.get("berth_dir"):
            env[BERTH_DIR_ENV] = SANDBOX_BERTH_DIR if self._bwrap is not None else paths.berth
        return env

    def _resolve_command(self, paths: _Paths, command: list[str], env: dict[str, str]) -> bool:
        """Does the command's executable exist (seen from inside the sandbox)?"""
        if not command:
            return False
        exe = command[0]
        if "/" in exe:
            if not exe.startswith("/"):
                return True  # relative to the working directory: let the exec decide
            host = self._host_path(paths, exe)
            return os.path.isfile(host) and os.access(host, os.X_OK)
        for directory in env.get("PATH", DEFAULT_PATH).split(":"):
            if directory.startswith("/"):
                candidate = os.path.join(self._host_path(paths, directory), exe)
                if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                    return True
        return False

    def _limits_prefix(self, spec: dict[str, Any], *, main: bool = False) -> list[str]:
        limits = spec.get("limits") or {}
        procs = (spec.get("cgroup_procs") or []) if self._cgroups is not None else []
        if procs:
            # The cgroups hold memory, pids and cpu. An exec joins them first, as the uid;
            # the main process is started in them by the shim, which joins them itself
            # (no shell between the shim and bubblewrap's --die-with-parent).
            return [] if main else CgroupV1.join_prefix(procs)
        flags: list[str] = []
        if limits.get("memory_mb"):
            flags.append(f"--as={int(limits['memory_mb']) * 1024 * 1024}")
        if limits.get("pids") and self._as_root:
            # bubblewrap's own two processes run as the same uid.
            extra = 2 if self._bwrap is not None else 0
            flags.append(f"--nproc={int(limits['pids']) + extra}")
        if not flags:
            return []
        if self._prlimit is None:
            raise RuntimeFailure("resource limits need `prlimit` (util-linux), not found")
        return [self._prlimit, *flags, "--"]

    def _sandbox_argv(
        self, spec: dict[str, Any], paths: _Paths, workdir: str, fds: list[int]
    ) -> list[str]:
        """The bubblewrap argv; descriptors it needs (mounts) are appended to ``fds``."""
        assert self._bwrap is not None
        argv = [self._bwrap, *self._root_binds()]
        argv += ["--dev", "/dev", "--proc", "/proc"]
        if spec.get("network") and os.path.isdir("/run/systemd/resolve"):
            # resolv.conf may point there (systemd-resolved).
            argv += ["--ro-bind", "/run/systemd/resolve", "/run/systemd/resolve"]
        if not (self._root + "/").startswith("/tmp/"):
            argv += ["--tmpfs", self._root]  # other containers' directories
        argv += ["--bind", paths.workspace, "/workspace", "--bind", paths.tmp, "/tmp"]
        if spec.get("berth_dir"):
            argv += ["--bind", paths.berth, SANDBOX_BERTH_DIR]
        for mount in spec.get("mounts") or ():
            # by descriptor: what was just checked is what gets bound, whatever is swapped
            fd = self.security.open_mount(mount["host_path"])
            fds.append(fd)
            flag = "--bind-fd" if mount.get("mode") == "rw" else "--ro-bind-fd"
            argv += [flag, str(fd), mount["container_path"]]
        argv += ["--remount-ro", "/", "--chdir", workdir, "--unshare-all"]
        if spec.get("network"):
            argv.append("--share-net")
        argv += [
            "--hostname", f"berth-{spec['berth_id']}"[:63],
            "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--new-session",
        ]  # fmt: skip
        # The sandbox dies with its parent: the shim for the main process; for an exec,
        # the runtime's spawner thread (PR_SET_PDEATHSIG fires when the parent *thread*
        # ends, so execs are never spawned from short-lived worker threads). It also
        # makes the outer bwrap's exit take the sandbox's init and every background
        # process down, as a container engine does when an exec's process ends.
        argv += ["--die-with-parent", "--"]
        return argv

    def _workdir_exists(self, spec: dict[str, Any], paths: _Paths, workdir: str, cwd: str) -> bool:
        """Is ``workdir`` a directory, as the sandbox will see it? Its own directories are
        walked without following symlinks (the sandbox plants them)."""
        if self._bwrap is None:
            return os.path.isdir(cwd)
        norm = os.path.normpath(workdir)
        own = [("/workspace", paths.workspace), ("/tmp", paths.tmp)]
        if spec.get("berth_dir"):
            own.append((SANDBOX_BERTH_DIR, paths.berth))
        for prefix, host in own:
            if norm == prefix or norm.startswith(prefix + "/"):
                return _files.is_dir(host, [p for p in norm[len(prefix) :].split("/") if p])
        for mount in spec.get("mounts") or ():
            target = mount["container_path"]
            if norm == target or norm.startswith(target + "/"):
                return _files.is_dir(mount["host_path"], [p for p in norm[len(target) :].split("/") if p])
        top = norm.split("/")[1] if norm != "/" else ""
        if top in ("", "proc", "dev", "run", "sys"):
            return True  # made by bubblewrap: let it decide
        # the host image, read-only: only what "others" may search is there for the
        # sandbox's uid (and nothing is revealed of what is not)
        current = "/"
        for part in [p for p in norm.split("/") if p]:
            try:
                if not os.stat(current).st_mode & 0o001:
                    return False
            except OSError:
                return False
            current = os.path.join(current, part)
        return os.path.isdir(current)

    def _launch(
        self,
        spec: dict[str, Any],
        paths: _Paths,
        command: list[str],
        workdir: str | None,
        *,
        main: bool = False,
    ) -> tuple[list[str], str, list[int]]:
        """The full argv (limits, sandbox, command), the host cwd to start it in and the
        descriptors the process must inherit (the caller closes them once it started)."""
        prefix = self._limits_prefix(spec, main=main)
        if self._bwrap is not None:
            inside = workdir or spec.get("workdir") or "/workspace"
            fds: list[int] = []
            try:
                argv = [*prefix, *self._sandbox_argv(spec, paths, inside, fds), *command]
            except BaseException:
                _close_all(fds)
                raise
            return argv, "/", fds
        wanted = workdir or spec.get("workdir")
        cwd = self._host_path(paths, wanted) if wanted else paths.workspace
        return [*prefix, *command], cwd, []

    # ------------------------------------------------------------------ status

    def _status(self, berth_id: str, paths: _Paths, spec: dict[str, Any]) -> SandboxStatus:
        def status(
            state: str,
            run: dict[str, Any] | None = None,
            done: dict[str, Any] | None = None,
        ) -> SandboxStatus:
            return SandboxStatus(
                berth_id=berth_id,
                state=state,
                exit_code=(done or {}).get("exit_code"),
                started_at=(run or {}).get("started_at"),
                finished_at=(done or {}).get("finished_at"),
                node_id=spec.get("node_id"),
                runtime_ref=paths.root,
            )

        done = _read_json(paths.exit)
        run = _read_json(paths.state)
        if done is not None and "error" not in done:
            return status("exited", run, done)
        if run is None:
            return status("created")
        if self._running(run):
            return status("running", run)
        # The shim is gone: it writes exit.json before exiting, so look once more.
        done = _read_json(paths.exit)
        if done is None:
            # Killed shim or reboot: the exit code is lost; record that once.
            done = {"exit_code": None, "finished_at": utc_now(), "lost": True}
            write_json_atomic(paths.exit, done)
        return status("exited", run, done)

    @staticmethod
    def _running(state: dict[str, Any]) -> bool:
        if state.get("boot_id") != _proc.boot_id():
            return False
        if _proc.alive(state.get("shim_pid"), state.get("shim_start")):
            return True
        # Shim killed: the command may still run (no bubblewrap to take it down).
        return _proc.alive(state.get("pid"), state.get("pid_start"))

    def inspect(self, berth_id: str) -> SandboxStatus:
        paths = self._paths(berth_id)
        return self._status(berth_id, paths, self._spec(paths, berth_id))

    def list_managed(self, node_id: str) -> list[SandboxStatus]:
        found: list[SandboxStatus] = []
        try:
            entries = sorted(os.listdir(self._root))
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot read {self._root}: {exc}") from None
        for entry in entries:
            if entry.startswith(".") or not _ID_RE.match(entry):
                continue
            paths = _Paths(os.path.join(self._root, entry))
            spec = _read_json(paths.spec)
            if spec is None or spec.get("node_id") != node_id:
                continue
            with contextlib.suppress(SandboxNotFound, FileNotFoundError):
                found.append(self._status(entry, paths, spec))
        return found

    # ------------------------------------------------------------------ lifecycle

    def create(self, spec: ContainerSpec) -> SandboxStatus:
        if spec.image not in (HOST_IMAGE, f"{HOST_IMAGE}:latest"):
            raise ImageMissing(
                f"the local runtime only runs the {HOST_IMAGE!r} image (the host's own "
                f"filesystem, read-only), not {spec.image!r}"
            )
        if not _ID_RE.match(spec.berth_id):
            raise RuntimeFailure(f"invalid container id {spec.berth_id!r}")
        paths = self._paths(spec.berth_id)
        spec = self._apply_profile(spec)
        self._validate(spec)
        with self._lock(spec.berth_id):
            try:
                os.mkdir(paths.root, 0o711)
            except FileExistsError:
                existing = _read_json(paths.spec)
                if existing is not None and existing.get("node_id") == spec.node_id:
                    return self._status(spec.berth_id, paths, existing)  # a retried create
                raise RuntimeFailure(f"container {spec.berth_id} already exists") from None
            try:
                return self._create_in(paths, spec)
            except BaseException:
                shutil.rmtree(paths.root, ignore_errors=True)
                raise

    def _apply_profile(self, spec: ContainerSpec) -> ContainerSpec:
        """The spec as it will run: the profile's limits (tightened by the asked ones),
        its network, and every mount resolved to a canonical path under the mount roots."""
        profile = self.security.profile(spec.profile)
        if spec.mounts and self._bwrap is None:
            raise RuntimeFailure("mounts need bubblewrap; this local runtime has isolation none")
        return dataclasses.replace(
            spec,
            limits=profile.limits(spec.limits),
            network=spec.network and profile.network,
            mounts=self.security.resolve_mounts(spec.mounts),
        )

    def _validate(self, spec: ContainerSpec) -> None:
        for port in spec.ports:
            if not spec.network:
                raise RuntimeFailure(
                    f"ports need a network; profile {spec.profile!r} has none (use 'networked')"
                )
            if port.host_port is not None and port.host_port != port.container_port:
                raise RuntimeFailure(
                    "the local runtime cannot remap ports: the process listens on the host's "
                    f"network directly (asked {port.container_port} -> {port.host_port})"
                )
        if spec.limits.cpus:
            log.debug(
                "local runtime: cpu limit %s for %s is not enforced",
                spec.limits.cpus,
                spec.berth_id,
            )
        if spec.limits.pids and not self._as_root:
            log.debug(
                "local runtime: pids limit for %s not enforced (needs per-container uids, "
                "i.e. the daemon running as root)",
                spec.berth_id,
            )
        rlimits = spec.limits.memory_mb or (spec.limits.pids and self._as_root)
        if rlimits and self._cgroups is None and not self._prlimit:
            raise RuntimeFailure("resource limits need `prlimit` (util-linux), not found")

    def enforcement(self) -> dict[str, str]:
        bwrap = self._bwrap is not None
        none = "not enforced (isolation none: install bubblewrap)"
        if self._cgroups is not None:
            pids = "pids cgroup (v1, pids.max)"
            memory = "memory cgroup (v1, limit_in_bytes = memsw.limit_in_bytes: no swap)"
            cpus = "CFS quota (cpu cgroup v1)"
        else:
            pids = ("RLIMIT_NPROC of the container's own host uid" if self._as_root
                    else "not enforced (needs per-container uids: run the daemon as root)")
            memory = "RLIMIT_AS per process (address space, not a total; no cgroup here)"
            cpus = "not enforced (no cgroup here)"
        return {
            "capabilities": "all dropped (bubblewrap --cap-drop ALL)" if bwrap else none,
            "no_new_privileges": "PR_SET_NO_NEW_PRIVS (set by bubblewrap)" if bwrap else none,
            "pids": pids,
            "memory": memory,
            "cpus": cpus,
            "network": "bubblewrap --unshare-net unless the profile has a network" if bwrap else none,
            "read_only_root": "read-only binds of the host (bubblewrap --remount-ro /)" if bwrap else none,
            "tmp": "the container's own directory (on disk, size not bounded)",
            "mounts": "bubblewrap binds of canonical paths under mount_roots, re-resolved "
            "before every launch" if bwrap else "refused (isolation none)",
        }

    def private_dirs(self) -> list[str]:
        return [self._root]

    def _create_in(self, paths: _Paths, spec: ContainerSpec) -> SandboxStatus:
        uid = self._allocate_uid(spec.berth_id) if self._as_root else None
        record = dataclasses.asdict(spec)
        record.update(
            command=list(spec.command),
            mounts=[dataclasses.asdict(m) for m in spec.mounts],
            ports=[dataclasses.asdict(p) for p in spec.ports],
            uid=uid,
            created_at=utc_now(),
        )
        try:
            private = [paths.workspace, paths.tmp] + ([paths.berth] if spec.berth_dir else [])
            for directory in private:
                os.mkdir(directory, 0o700)
                if uid is not None:
                    os.chown(directory, uid, uid)
            workdir = spec.workdir
            if workdir:
                host = self._host_path(paths, workdir)
                if host.startswith(paths.root + "/"):
                    self._makedirs_owned(host, paths, uid)
                elif not os.path.isdir(host):
                    raise WorkdirNotFound(
                        f"working directory {workdir!r} does not exist", field="workdir"
                    )
            if self._cgroups is not None:
                record["cgroup_procs"] = self._cgroups.create(spec.berth_id, record["limits"], uid)
            write_json_atomic(paths.spec, record)
        except BaseException:
            if self._cgroups is not None:
                self._cgroups.remove(spec.berth_id, wait=0)
            self._release_uid(uid)
            raise
        return self._status(spec.berth_id, paths, record)

    @staticmethod
    def _makedirs_owned(host: str, paths: _Paths, uid: int | None) -> None:
        """mkdir -p below the container's own dirs (nothing runs there yet)."""
        missing: list[str] = []
        current = host
        while not os.path.isdir(current) and current.startswith(paths.root + "/"):
            missing.append(current)
            current = os.path.dirname(current)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            if uid is not None:
                os.chown(directory, uid, uid)

    def start(self, berth_id: str) -> SandboxStatus:
        paths = self._paths(berth_id)
        with self._lock(berth_id):
            spec = self._spec(paths, berth_id)
            status = self._status(berth_id, paths, spec)
            if status.state == "running":
                return status
            self._kill_detached(paths)  # a previous run's, ended with it
            spec = self._ensure_cgroups(berth_id, spec)
            command = list(spec.get("command") or ())
            env = self._env(spec, paths, {})
            if not command:
                raise CommandMissing("no command to run (the host image has no default)", field="command")
            if not self._resolve_command(paths, command, env):
                raise CommandMissing(f"executable {command[0]!r} not found in the container", field="command")
            argv, cwd, fds = self._launch(spec, paths, command, None, main=True)
            try:
                for stale in (paths.state, paths.exit):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stale)
                uid = spec.get("uid")
                write_json_atomic(
                    paths.launch,
                    {
                        "argv": argv,
                        "env": env,
                        "cwd": cwd,
                        "user": uid,
                        "group": uid,
                        "log": paths.log,
                        "sandboxed": self._bwrap is not None,
                        "pass_fds": fds,
                        "cgroup_procs": spec.get("cgroup_procs") or [],
                    },
                )
                shim = self._spawn_shim(paths, fds)
            finally:
                _close_all(fds)  # the shim has its own copies (same numbers)
            self._wait_started(berth_id, paths, shim)
            return self._status(berth_id, paths, spec)

    def _spawn_shim(self, paths: _Paths, fds: list[int]) -> subprocess.Popen[bytes]:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(berthd.__file__)))
        with open(paths.shim_log, "ab") as shim_log:
            os.chmod(paths.shim_log, 0o600)
            shim = subprocess.Popen(
                # -P: no script dir on sys.path; -S: no site (fast, nothing needed from it).
                [sys.executable, "-P", "-S", "-m", "berthd.runtime._shim", paths.root],
                stdin=subprocess.DEVNULL,
                stdout=shim_log,
                stderr=shim_log,
                cwd=paths.root,
                env={"PATH": DEFAULT_PATH, "PYTHONPATH": package_parent, "LANG": "C.UTF-8"},
                start_new_session=True,
                close_fds=True,
                pass_fds=fds,
            )

        def reap() -> None:
            shim.wait()  # no zombie shims; and an exit is news for the watcher now
            self._wake.set()

        threading.Thread(target=reap, name=f"shim-reaper-{shim.pid}", daemon=True).start()
        return shim

    def _wait_started(self, berth_id: str, paths: _Paths, shim: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if os.path.exists(paths.state):
                return
            done = _read_json(paths.exit)
            if done is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(paths.exit)  # failed to start: still "created"
                raise RuntimeFailure(done.get("error") or "the container failed to start")
            if shim.poll() is not None and not os.path.exists(paths.state):
                raise RuntimeFailure(f"container shim failed: {self._tail(paths.shim_log)}")
            time.sleep(0.005)
        raise RuntimeFailure(f"container {berth_id} did not start within {_START_TIMEOUT:.0f} s")

    @staticmethod
    def _tail(path: str, size: int = 2000) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace").strip() or "(no output)"
        except OSError:
            return "(no log)"

    def _track_exec(
        self, berth_id: str, process: subprocess.Popen[bytes]
    ) -> subprocess.Popen[bytes]:
        with self._locks_guard:
            live = {p for p in self._execs.get(berth_id, set()) if p.returncode is None}
            live.add(process)
            self._execs[berth_id] = live
        return process

    def _kill_execs(self, berth_id: str) -> None:
        """End the container's execs along with it, as Docker does."""
        with self._locks_guard:
            execs = self._execs.pop(berth_id, set())
        for process in execs:
            if process.returncode is None and _proc.alive(process.pid, None):
                _proc.kill_tree(process.pid)

    def _signal_main(self, paths: _Paths, sig: int) -> bool:
        """Signal the main process tree; False if it is not running."""
        state = _read_json(paths.state)
        if state is None or state.get("boot_id") != _proc.boot_id():
            return False
        pid = state.get("pid")
        if not isinstance(pid, int) or not _proc.alive(pid, state.get("pid_start")):
            return False
        if state.get("sandboxed"):
            _signal_sandbox(pid, sig)
        else:
            _proc.signal_tree(pid, sig)
        return True

    def _wait_exited(
        self, berth_id: str, paths: _Paths, spec: dict[str, Any], timeout: float
    ) -> SandboxStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self._status(berth_id, paths, spec)
            if status.state != "running" or time.monotonic() >= deadline:
                return status
            time.sleep(0.02)

    def stop(self, berth_id: str, timeout: float = 10.0) -> SandboxStatus:
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)
        status = self._status(berth_id, paths, spec)
        if status.state != "running":
            return status
        self._signal_main(paths, _signal.SIGTERM)
        status = self._wait_exited(berth_id, paths, spec, max(0.0, timeout))
        if status.state == "running":
            self._signal_main(paths, _signal.SIGKILL)
            status = self._wait_exited(berth_id, paths, spec, _KILL_WAIT)
        if status.state != "running":
            self._kill_execs(berth_id)
            self._kill_detached(paths)
        return status

    def kill(self, berth_id: str, signal: str = "KILL") -> SandboxStatus:
        number = signal_number(signal)
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)
        status = self._status(berth_id, paths, spec)
        if status.state != "running":
            return status
        self._signal_main(paths, number)
        if number == _signal.SIGKILL:
            status = self._wait_exited(berth_id, paths, spec, _KILL_WAIT)
        else:
            status = self._status(berth_id, paths, spec)
        if status.state != "running":
            self._kill_execs(berth_id)
            self._kill_detached(paths)
        return status

    def remove(self, berth_id: str, force: bool = False) -> None:
        paths = self._paths(berth_id)
        with self._lock(berth_id):
            spec = self._spec(paths, berth_id)
            status = self._status(berth_id, paths, spec)
            if status.state == "running":
                if not force:
                    raise RuntimeFailure(
                        f"container {berth_id} is running; stop it first or remove with force"
                    )
                self._signal_main(paths, _signal.SIGKILL)
                if self._wait_exited(berth_id, paths, spec, _KILL_WAIT).state == "running":
                    raise RuntimeFailure(f"container {berth_id} did not die; not removed")
            self._kill_execs(berth_id)
            self._kill_detached(paths)
            # Make it vanish atomically for readers, then delete at leisure.
            grave = os.path.join(
                self._root, f".removed-{berth_id}-{os.getpid()}-{time.monotonic_ns()}"
            )
            try:
                os.rename(paths.root, grave)
            except FileNotFoundError:
                raise SandboxNotFound(f"no container {berth_id} in the local runtime") from None
            shutil.rmtree(grave, ignore_errors=True)
            if spec.get("cgroup_procs") and self._cgroups is not None:
                # no waiting: if dying processes still hold it, the watcher collects it
                self._cgroups.remove(berth_id, wait=0)
            self._release_uid(spec.get("uid"))
        with self._locks_guard:
            self._locks.pop(berth_id, None)

    # ------------------------------------------------------------------ exec

    def _exec_spawner(self, berth_id: str, spec_: ExecSpec) -> tuple[Spawner, bool]:
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)
        if self._status(berth_id, paths, spec).state != "running":
            raise RuntimeFailure(f"container {berth_id} is not running")
        command = list(spec_.command)
        if not command:
            raise RuntimeFailure("exec needs a command")
        env = self._env(spec, paths, dict(spec_.env))
        argv, cwd, fds = self._launch(spec, paths, command, spec_.workdir)
        if spec_.workdir and not self._workdir_exists(spec, paths, spec_.workdir, cwd):
            _close_all(fds)
            raise WorkdirNotFound(
                f"working directory {spec_.workdir!r} does not exist in the container",
                field="workdir",
            )
        sandboxed = self._bwrap is not None
        uid = spec.get("uid")

        def signal_tree(pid: int, sig: int) -> None:
            if sandboxed:
                _signal_sandbox(pid, sig)
            else:
                _proc.signal_tree(pid, sig)

        def after_exit(pid: int) -> None:
            # The pid is an unreaped zombie here, so its group id is still ours.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, _signal.SIGKILL)

        spawner = Spawner(
            argv,
            env=env,
            cwd=cwd,
            user=uid,
            group=uid,
            kill_tree=_proc.kill_tree,
            signal_tree=signal_tree,
            after_exit=after_exit,
            display_name=command[0],
            launcher=lambda spawn: self._track_exec(berth_id, self._spawner.submit(spawn).result()),
            pass_fds=fds,
        )
        try:
            found = self._resolve_command(paths, command, env)
        except BaseException:
            spawner.release()
            raise
        if not found:
            spawner.release()
        return spawner, found

    def exec_detached(self, berth_id: str, spec: ExecSpec) -> None:
        """Like the main process: a shim of its own (in ``detached/<n>/``, root-only)
        starts the command in a sandbox built as for an exec (same uid, binds, network
        rules, cgroups or rlimits), in a session of its own so it survives the daemon; the
        shim ends it when the container's main process ends, and stop, kill and remove
        end it too. Its output goes to a root-only log there, not into the sandbox."""
        paths = self._paths(berth_id)
        with self._lock(berth_id):
            container = self._spec(paths, berth_id)
            state = _read_json(paths.state)
            if state is None or self._status(berth_id, paths, container).state != "running":
                raise RuntimeFailure(f"container {berth_id} is not running")
            command = list(spec.command)
            if not command:
                raise RuntimeFailure("exec needs a command")
            env = self._env(container, paths, dict(spec.env))
            if not self._resolve_command(paths, command, env):
                raise RuntimeFailure(f"executable {command[0]!r} not found in the container")
            # main=True: the shim joins the cgroups itself, as the main process's does
            argv, cwd, fds = self._launch(container, paths, command, spec.workdir, main=True)
            try:
                if spec.workdir and not self._workdir_exists(container, paths, spec.workdir, cwd):
                    raise WorkdirNotFound(
                        f"working directory {spec.workdir!r} does not exist in the container",
                        field="workdir",
                    )
                os.makedirs(paths.detached, mode=0o700, exist_ok=True)
                self._prune_detached(paths)
                own = _Paths(tempfile.mkdtemp(prefix="d-", dir=paths.detached))
                uid = container.get("uid")
                write_json_atomic(
                    own.launch,
                    {
                        "argv": argv,
                        "env": env,
                        "cwd": cwd,
                        "user": uid,
                        "group": uid,
                        "log": own.log,
                        "sandboxed": state.get("sandboxed", False),
                        "pass_fds": fds,
                        "cgroup_procs": container.get("cgroup_procs") or [],
                        "container": {"pid": state.get("pid"), "pid_start": state.get("pid_start")},
                    },
                )
                shim = self._spawn_shim(own, fds)
            finally:
                _close_all(fds)
            try:
                self._wait_started(berth_id, own, shim)
            except BaseException:
                _proc.kill_tree(shim.pid)
                shutil.rmtree(own.root, ignore_errors=True)
                raise

    @staticmethod
    def _prune_detached(paths: _Paths) -> None:
        """Forget the detached processes that ended (their shim wrote exit.json)."""
        for entry in os.listdir(paths.detached):
            own = _Paths(os.path.join(paths.detached, entry))
            if os.path.exists(own.exit):
                shutil.rmtree(own.root, ignore_errors=True)

    def _kill_detached(self, paths: _Paths) -> None:
        """End the container's detached processes (from their files: they may have been
        started by a daemon that died since) and forget them."""
        try:
            entries = os.listdir(paths.detached)
        except OSError:
            return
        for entry in entries:
            own = _Paths(os.path.join(paths.detached, entry))
            state = _read_json(own.state)
            if state is not None and state.get("boot_id") == _proc.boot_id():
                # the shim first: a live shim would otherwise outlive its killed command
                for pid, start in (("shim_pid", "shim_start"), ("pid", "pid_start")):
                    if _proc.alive(state.get(pid), state.get(start)):
                        _proc.kill_tree(state[pid])
            shutil.rmtree(own.root, ignore_errors=True)

    def exec(self, berth_id: str, spec: ExecSpec) -> ExecResult:
        spawner, found = self._exec_spawner(berth_id, spec)
        if not found:
            return ExecResult(
                exit_code=127,
                stdout=b"",
                stderr=f"{spec.command[0]}: command not found\n".encode(),
                duration_ms=0.0,
            )
        return run_to_completion(
            spawner, stdin=spec.stdin, timeout=spec.timeout, output_cap=spec.output_cap
        )

    def exec_stream(self, berth_id: str, spec: ExecSpec, tty: bool = False) -> ExecStream:
        spawner, found = self._exec_spawner(berth_id, spec)
        if not found:
            raise RuntimeFailure(f"executable {spec.command[0]!r} not found in the container")
        stream = ProcessExecStream(spawner, tty=tty, timeout=spec.timeout)
        if spec.stdin:
            stream.write_stdin(spec.stdin)
        return stream

    # ------------------------------------------------------------------ logs and files

    def logs(self, berth_id: str, tail: int | None = None) -> bytes:
        paths = self._paths(berth_id)
        self._spec(paths, berth_id)
        try:
            with open(paths.log, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return b""
        if tail is None:
            return data
        if tail <= 0:
            return b""
        lines = data.splitlines(keepends=True)
        return b"".join(lines[-tail:])

    def logs_capped(self, berth_id: str, tail: int | None, max_bytes: int) -> bytes:
        """Only the last ``max_bytes`` of the log file are read (a seek from its end): the
        last ``tail`` lines of that window are the last ``max_bytes`` of the last ``tail``
        lines of the whole log."""
        paths = self._paths(berth_id)
        self._spec(paths, berth_id)
        if max_bytes <= 0 or (tail is not None and tail <= 0):
            return b""
        try:
            with open(paths.log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - max_bytes))
                data = f.read(max_bytes)
        except FileNotFoundError:
            return b""
        if tail is not None:
            data = b"".join(data.splitlines(keepends=True)[-tail:])
        return data

    def follow_logs(self, berth_id: str, tail: int | None = None) -> Iterator[bytes]:
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)

        def follow() -> Iterator[bytes]:
            position = 0
            if tail is not None:  # the last lines up to the size now, then from there on
                try:
                    with open(paths.log, "rb") as f:
                        position = os.fstat(f.fileno()).st_size
                        f.seek(max(0, position - LOG_TAIL_WINDOW))
                        window = f.read(min(position, LOG_TAIL_WINDOW))
                except FileNotFoundError:
                    window = b""
                if lines := last_lines(window, tail):
                    yield lines
            while True:
                # Decide "finished" before reading, so the last output is never skipped.
                finished = self._status(berth_id, paths, spec).state != "running"
                try:
                    with open(paths.log, "rb") as f:
                        f.seek(position)
                        chunk = f.read(_LOG_CHUNK)  # bounded: the log may be huge
                except FileNotFoundError:
                    chunk = b""
                if chunk:
                    position += len(chunk)
                    yield chunk
                    continue
                if finished or not os.path.isdir(paths.root):
                    return
                time.sleep(0.1)

        return follow()

    def _file_roots(self, berth_id: str) -> tuple[dict[str, str], tuple[int, int] | None]:
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)
        return {"workspace": paths.workspace, "tmp": paths.tmp}, self._owner(spec)

    def berth_dir(self, berth_id: str) -> BerthDir:
        paths = self._paths(berth_id)
        spec = self._spec(paths, berth_id)
        if not spec.get("berth_dir"):
            raise RuntimeFailure(
                f"container {berth_id} has no shared directory (create it with berth_dir=True)"
            )
        # As the container was started (bubblewrap or not), else as it would be now.
        state = _read_json(paths.state)
        sandboxed = bool(state.get("sandboxed")) if state else self._bwrap is not None
        return BerthDir(paths.berth, SANDBOX_BERTH_DIR if sandboxed else paths.berth)

    def put_file(self, berth_id: str, path: str, data: bytes) -> None:
        roots, owner = self._file_roots(berth_id)
        base, parts = _files.split_container_path(path, roots)
        _files.write_file(base, parts, data, path, owner)

    def get_file(self, berth_id: str, path: str) -> bytes:
        roots, _ = self._file_roots(berth_id)
        base, parts = _files.split_container_path(path, roots)
        return _files.read_file(base, parts, path)

    def get_file_capped(self, berth_id: str, path: str, max_bytes: int) -> bytes:
        roots, _ = self._file_roots(berth_id)
        base, parts = _files.split_container_path(path, roots)
        return _files.read_file(base, parts, path, max_bytes)

    # ------------------------------------------------------------------ images

    def _host_image(self) -> ImageInfo:
        booted = datetime.fromtimestamp(time.time() - time.monotonic(), UTC)
        with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    booted = datetime.fromtimestamp(int(line.split()[1]), UTC)
        return ImageInfo(
            id=HOST_IMAGE, tags=(HOST_IMAGE,), size=0, created=format_time(booted), runtime="local"
        )

    def images(self) -> list[ImageInfo]:
        return [self._host_image()]

    def pull(
        self, ref: str, progress: Callable[[dict[str, object]], None] | None = None
    ) -> ImageInfo:
        if ref not in (HOST_IMAGE, f"{HOST_IMAGE}:latest"):
            raise ImageMissing(
                f"the local runtime cannot pull {ref!r}: it only runs the {HOST_IMAGE!r} image"
            )
        if progress is not None:
            progress({"status": "host image is always present", "id": HOST_IMAGE})
        return self._host_image()

    def remove_image(self, ref: str, force: bool = False) -> None:
        if ref in (HOST_IMAGE, f"{HOST_IMAGE}:latest"):
            raise RuntimeFailure("the host image cannot be removed")
        raise ImageMissing(f"no image {ref!r} in the local runtime (it only has {HOST_IMAGE!r})")

    # ------------------------------------------------------------------ watch

    def watch(self, on_exit: Callable[[ExitNotice], None]) -> None:
        self._on_exit = on_exit
        if self._watch_thread is not None:
            return
        tracker = ExitTracker()
        self._watch_thread = threading.Thread(
            target=self._watch_loop,
            args=(tracker,),
            name=f"local-watch-{self.node_id}",
            daemon=True,
        )
        self._watch_thread.start()

    def _watch_loop(self, tracker: ExitTracker) -> None:
        while not self._closed.is_set():
            try:
                statuses = self.list_managed(self.node_id)
            except Exception:  # keep watching whatever happens; next round may work
                log.exception("local runtime: watch poll failed")
                statuses = None
            if statuses is not None:
                present = {s.berth_id for s in statuses}
                if self._cgroups is not None:
                    self._collect_cgroups()
                notices = [tracker.observe(s) for s in statuses]
                notices += [tracker.vanished(b) for b in tracker.running_ids() - present]
                tracker.prune(present)
                for notice in notices:
                    if notice is not None:
                        self._deliver(notice)
            self._wake.wait(self._poll_interval)
            self._wake.clear()

    def _ensure_cgroups(self, berth_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Cgroups do not survive a reboot (the container's files do): make them again
        before a start; without cgroup support now, fall back to the rlimits."""
        if not spec.get("cgroup_procs"):
            return spec
        if self._cgroups is None:
            return {**spec, "cgroup_procs": []}
        try:
            procs = self._cgroups.create(berth_id, spec.get("limits") or {}, spec.get("uid"))
        except OSError as exc:
            raise RuntimeFailure(f"cannot set up the cgroups of {berth_id}: {exc}") from None
        return {**spec, "cgroup_procs": procs}

    def _collect_cgroups(self) -> None:
        """Drop the cgroups of this node's containers that no longer exist."""
        assert self._cgroups is not None

        def live() -> set[str] | None:
            try:
                return {e for e in os.listdir(self._root) if _ID_RE.match(e)}
            except OSError:
                return None

        self._cgroups.collect(live)

    def _deliver(self, notice: ExitNotice) -> None:
        callback = self._on_exit
        if callback is None:
            return
        try:
            callback(notice)
        except Exception:  # a broken callback must not stop the watcher
            log.exception("local runtime: on_exit callback failed for %s", notice.berth_id)

    def close(self) -> None:
        """Stop watching and spawning. Containers keep running: they belong to their shims."""
        self._closed.set()
        self._wake.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
            self._watch_thread = None
        # Ends the spawner thread: sandboxed execs still running die with it.
        self._spawner.shutdown(wait=False)
        if self._cgroups is not None:
            self._collect_cgroups()
            self._cgroups.close()
