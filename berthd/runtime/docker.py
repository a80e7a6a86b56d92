"""The Docker runtime: containers on a Docker engine through the Docker SDK.

The engine is reached as the SDK does (``DOCKER_HOST``, else the default socket), lazily
and again after failures, so a daemon can start before its engine. Every ordinary call
has a client timeout (10 s by default): an engine that is gone or hangs becomes
``RuntimeUnavailable`` instead of a stuck worker. Streams (events, followed logs, pulls,
execs) have no read timeout, as they legitimately stay quiet.

Containers are named ``berth-<berth_id>`` and labelled ``berth.id``, ``berth.node``,
``berth.profile`` (and ``berth.name``), run with ``init=True`` (a real PID 1 forwards
signals and reaps, so stop does not wait its full timeout), ports published on
127.0.0.1 only and the ``json-file`` log driver bounded to ``max-size`` 10m, ``max-file``
2 (the engine keeps at most ~20 MB of a container's output; older output is dropped).

Downloads and logs are read as streams and never held whole: a file download
(``get_file_capped``) is refused from the engine's path-stat header when it names a
directory or a file over the cap, and the archive is read only up to its first member's
cap + 1 bytes; ``logs_capped`` keeps only the last bytes asked for while streaming.

Security profile (``berthd.runtime.security``), on every container: ``cap_drop ALL``,
``no-new-privileges``; from the profile: ``pids_limit``, ``mem_limit`` equal to
``memswap_limit`` (no swap), ``nano_cpus``, ``network_mode none`` unless it has a network,
and a read-only root with ``/tmp`` a tmpfs-backed anonymous volume (a plain tmpfs mount
is invisible to ``docker cp``, hence to ``put_file``; so a file put into ``/tmp`` of a
container that is not running is refused: the tmpfs exists only while it runs). Host
mounts are resolved under the mount roots at create (canonical path, no symlink left)
and again right before every start; the engine then binds by path, so a swap between
that last check and runc's mount is not caught (docs/security.md).

Exec timeouts and signals: the Docker API has no "kill this exec". After ``exec_start``
the engine reports the exec'd process's host pid (``exec_inspect``'s ``Pid``); runc
makes that process a session and process-group leader. Since the daemon runs as root on
the engine's host, we signal from the host: the process group plus every descendant
(``_proc.signal_tree``/``kill_tree``), after checking through ``/proc/<pid>/cgroup``
that the pid belongs to this container (a recycled pid is never hit). With a remote
engine the pid is not ours to see: a timed-out exec is then reported ``timed_out`` but
the process is left to the engine (logged), and ``ExecStream.signal`` raises.

Shared directories (``ContainerSpec.berth_dir``): ``<berth_root>/<berth_id>`` on the host
(``berth_root`` from the constructor, mode 0700), bind-mounted read-write at ``/run/berth``;
the directory itself is 0777 so that an image's non-root user can use it too. It is
deleted when the container is removed. Like the exec kill above, it needs the engine on
this host (a remote engine would bind a path of its own machine).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import posixpath
import re
import select
import shutil
import signal as _signal
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors
import docker.types
import docker.utils
import requests
import urllib3.exceptions
from docker.models.containers import Container

from berthd.runtime import _proc
from berthd.runtime._util import (
    CappedBuffer,
    ExitTracker,
    format_time,
    normalize_time,
    signal_number,
)
from berthd.runtime.base import (
    BERTH_DIR_ENV,
    SANDBOX_BERTH_DIR,
    BerthDir,
    CommandMissing,
    ContainerSpec,
    ExecResult,
    ExecSpec,
    ExecStream,
    ExitNotice,
    FileNotFound,
    FileTooLarge,
    ImageInfo,
    ImageMissing,
    InvalidPath,
    LimitRefused,
    Runtime,
    RuntimeError_,
    RuntimeFailure,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxStatus,
    WorkdirNotFound,
)

__all__ = ["DockerRuntime"]

log = logging.getLogger(__name__)

_STATES = {
    "created": "created",
    "running": "running",
    "paused": "running",
    "restarting": "running",
    "removing": "exited",
    "exited": "exited",
    "dead": "exited",
}
_UNREACHABLE = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)
_KILL_GRACE = 3.0
_CHUNK = 65536
# Bits of Go's os.FileMode in the engine's X-Docker-Container-Path-Stat header.
_MODE_DIR = 1 << 31
_MODE_SYMLINK = 1 << 27
# The log driver of every container we create: output beyond this is rotated away, so
# the engine's disk and a logs read stay bounded.
_LOG_DRIVER = "json-file"
_LOG_OPTIONS = {"max-size": "10m", "max-file": "2"}
_BERTH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def default_berth_root() -> str:
    """Where shared directories go unless the daemon says otherwise."""
    if os.geteuid() == 0:
        return "/var/lib/berthd/docker-berth"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "berthd", "docker-berth")


def _reserved(container_path: str) -> bool:
    path = posixpath.normpath(container_path)
    return path == SANDBOX_BERTH_DIR or path.startswith(SANDBOX_BERTH_DIR + "/")


def _container_name(berth_id: str) -> str:
    return f"berth-{berth_id}"


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc).strip()


def _too_large(path: str, size: int, limit: int) -> FileTooLarge:
    return FileTooLarge(
        f"{path!r} is {size} bytes; downloads are limited to {limit} bytes", size=size, limit=limit
    )


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (for ``tarfile``'s stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = memoryview(chunk)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _status_of(attrs: dict[str, Any]) -> SandboxStatus:
    state = attrs.get("State") or {}
    mapped = _STATES.get(str(state.get("Status")), "exited")
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return SandboxStatus(
        berth_id=labels.get("berth.id", ""),
        state=mapped,
        exit_code=state.get("ExitCode") if mapped == "exited" else None,
        started_at=normalize_time(state.get("StartedAt")),
        finished_at=normalize_time(state.get("FinishedAt")) if mapped == "exited" else None,
        node_id=labels.get("berth.node"),
        runtime_ref=str(attrs.get("Id", ""))[:12],
    )


class DockerRuntime(Runtime):
    """Sandboxes as Docker containers. ``client``: an SDK client to use (not closed by
    us); else one from the environment with ``timeout`` seconds per call. ``berth_root``:
    the host directory for shared directories (default ``default_berth_root()``)."""

    name = "docker"
    detached_execs = True  # exec_detached: the engine keeps the exec'd process

    def __init__(
        self,
        node_id: str,
        client: docker.DockerClient | None = None,
        *,
        timeout: float = 10.0,
        poll_interval: float = 2.0,
        berth_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.node_id = node_id
        self._berth_root = os.path.abspath(os.fspath(berth_root or default_berth_root()))
        self._client = client
        self._owns_client = client is None
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._client_lock = threading.Lock()
        self._closed = threading.Event()
        self._on_exit: Callable[[ExitNotice], None] | None = None
        self._tracker: ExitTracker | None = None
        self._threads: list[threading.Thread] = []
        self._events_stream: Any = None
        # berth id -> Docker id of containers seen running, so an exec need not inspect the
        # container first (an engine round trip); the engine refuses an exec in a container
        # that is gone (404) or not running (409) by itself.
        self._exec_targets: dict[str, str] = {}

    # ------------------------------------------------------------------ plumbing

    def _docker(self) -> docker.DockerClient:
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is None:
                try:
                    # Negotiates the API version with the engine: fails fast if it is gone.
                    self._client = docker.from_env(timeout=self._timeout)
                except docker.errors.DockerException as exc:
                    raise RuntimeUnavailable(
                        f"Docker engine unreachable: {_explain(exc)}"
                    ) from None
            return self._client

    @contextlib.contextmanager
    def _errors(self, what: str, berth_id: str | None = None) -> Iterator[None]:
        """The one place Docker and transport errors become the runtime's exceptions."""
        try:
            yield
        except RuntimeError_:
            raise
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"{what}: {_explain(exc)} (pull the image first)") from None
        except docker.errors.NotFound as exc:
            if berth_id is not None:
                raise SandboxNotFound(f"no container {berth_id} in Docker") from None
            raise RuntimeFailure(f"{what}: {_explain(exc)}") from None
        except docker.errors.APIError as exc:
            text = _explain(exc)
            if "No command specified" in text or "executable file not found" in text:
                raise CommandMissing(f"{what}: {text}", field="command") from None
            if "Range of CPUs" in text:  # more than the host has
                raise LimitRefused(f"{what}: {text}", field="limits.cpus") from None
            if "Minimum memory limit" in text:
                raise LimitRefused(f"{what}: {text}", field="limits.memory_mb") from None
            raise RuntimeFailure(f"{what}: {text}") from None
        except _UNREACHABLE as exc:
            raise RuntimeUnavailable(f"Docker engine unreachable during {what}: {exc}") from None
        except docker.errors.DockerException as exc:
            raise RuntimeFailure(f"{what}: {_explain(exc)}") from None

    def _container(self, berth_id: str) -> Container:
        with self._errors("inspect", berth_id):
            container = self._docker().containers.get(_container_name(berth_id))
        if container.labels.get("berth.id") != berth_id:
            # Someone else's container that happens to carry our name.
            raise SandboxNotFound(f"no container {berth_id} in Docker")
        return container

    def _status(self, container: Container) -> SandboxStatus:
        return _status_of(container.attrs)

    def _refresh(self, container: Container, berth_id: str) -> SandboxStatus:
        with self._errors("inspect", berth_id):
            container.reload()
        return self._status(container)

    # ------------------------------------------------------------------ basics

    @property
    def isolation(self) -> str:
        return "container"

    def ping(self) -> None:
        try:
            with self._errors("ping"):
                self._docker().ping()
        except RuntimeFailure as exc:
            raise RuntimeUnavailable(str(exc)) from None

    # ------------------------------------------------------------------ lifecycle

    def create(self, spec: ContainerSpec) -> SandboxStatus:
        profile = self.security.profile(spec.profile)
        labels = {
            **spec.labels, "berth.id": spec.berth_id, "berth.node": spec.node_id,
            "berth.profile": profile.name,
        }
        if spec.name:
            labels["berth.name"] = spec.name
        mounts = []
        for mount in self.security.resolve_mounts(spec.mounts):
            mounts.append(
                docker.types.Mount(
                    target=mount.container_path,
                    source=mount.host_path,
                    type="bind",
                    read_only=mount.mode != "rw",
                )
            )
        if profile.read_only_root:
            # A tmpfs-backed anonymous volume rather than a plain tmpfs mount: `docker cp`
            # (put_file/get_file) sees volumes, not tmpfs mounts. Removed with the container.
            options_ = f"size={profile.tmp_size_mb}m,mode=1777,nosuid,nodev"
            mounts.append(
                docker.types.Mount(
                    target="/tmp",
                    source=None,
                    type="volume",
                    driver_config=docker.types.DriverConfig(
                        "local", {"type": "tmpfs", "device": "tmpfs", "o": options_}
                    ),
                )
            )
        env = dict(spec.env)
        berth_host: str | None = None
        created_dir = False
        if spec.berth_dir:
            berth_host, created_dir = self._make_berth_dir(spec.berth_id)
            mounts.append(
                docker.types.Mount(
                    target=SANDBOX_BERTH_DIR, source=berth_host, type="bind", read_only=False
                )
            )
            env[BERTH_DIR_ENV] = SANDBOX_BERTH_DIR
        options: dict[str, Any] = {
            "command": list(spec.command) or None,
            "name": _container_name(spec.berth_id),
            "labels": labels,
            "environment": env or None,
            "working_dir": spec.workdir,
            "init": True,
            "detach": True,
            "mounts": mounts,
            # every profile: no capabilities, no privilege gain through setuid/file caps
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "read_only": profile.read_only_root,
            "log_config": docker.types.LogConfig(type=_LOG_DRIVER, config=dict(_LOG_OPTIONS)),
        }
        network = spec.network and profile.network
        if not network:
            if spec.ports:
                raise RuntimeFailure(
                    f"ports need a network; profile {profile.name!r} has none (use 'networked')"
                )
            options["network_mode"] = "none"
        if spec.ports:
            options["ports"] = {
                f"{p.container_port}/tcp": ("127.0.0.1", p.host_port)
                if p.host_port
                else ("127.0.0.1",)
                for p in spec.ports
            }
        limits = profile.limits(spec.limits)
        if limits.memory_mb:
            options["mem_limit"] = f"{limits.memory_mb}m"
            options["memswap_limit"] = f"{limits.memory_mb}m"  # no swap on top
        if limits.cpus:
            options["nano_cpus"] = int(limits.cpus * 1e9)
        if limits.pids:
            options["pids_limit"] = limits.pids
        client = self._docker()
        try:
            with self._errors("create"):
                container = client.containers.create(spec.image, **options)
        except RuntimeFailure as exc:
            if "Conflict" not in str(exc) and "already in use" not in str(exc):
                if created_dir and berth_host is not None:
                    shutil.rmtree(berth_host, ignore_errors=True)
                raise
            # A retried create (crash between intent and outcome): same id, same node.
            existing = self._container(spec.berth_id)
            if existing.labels.get("berth.node") != spec.node_id:
                raise
            return self._status(existing)
        return self._status(container)

    def start(self, berth_id: str) -> SandboxStatus:
        container = self._container(berth_id)
        self._recheck_mounts(container)
        with self._errors("start", berth_id):
            container.start()
        return self._refresh(container, berth_id)

    def _recheck_mounts(self, container: Container) -> None:
        """The engine binds a mount's source by path at every start: resolve each again
        right before, so a symlink swapped in since create is refused, not followed."""
        for mount in (container.attrs.get("HostConfig") or {}).get("Mounts") or []:
            if mount.get("Type") != "bind" or _reserved(str(mount.get("Target") or "")):
                continue
            self.security.recheck_mount(str(mount.get("Source") or ""))

    def enforcement(self) -> dict[str, str]:
        return {
            "capabilities": "all dropped (cap_drop ALL)",
            "no_new_privileges": "security_opt no-new-privileges",
            "pids": "pids cgroup (pids_limit)",
            "memory": "memory cgroup (mem_limit, memswap_limit equal: no swap)",
            "cpus": "CFS quota (nano_cpus)",
            "network": "network_mode none unless the profile has a network",
            "read_only_root": "read-only root filesystem (read_only)",
            "tmp": "tmpfs volume at /tmp, sized by the profile",
            "mounts": "bind mounts of canonical paths under mount_roots, re-resolved before every start",
        }

    def private_dirs(self) -> list[str]:
        return [self._berth_root]

    def stop(self, berth_id: str, timeout: float = 10.0) -> SandboxStatus:
        container = self._container(berth_id)
        if self._status(container).state != "running":
            return self._status(container)
        with self._errors("stop", berth_id):
            # The SDK adds this to the HTTP timeout, so a slow stop is not "unreachable".
            container.stop(timeout=max(0, math.ceil(timeout)))
        return self._refresh(container, berth_id)

    def kill(self, berth_id: str, signal: str = "KILL") -> SandboxStatus:
        number = signal_number(signal)
        container = self._container(berth_id)
        if self._status(container).state != "running":
            return self._status(container)
        try:
            with self._errors("kill", berth_id):
                container.kill(signal=_signal.Signals(number).name)
        except RuntimeFailure as exc:
            if "is not running" not in str(exc):
                raise
        status = self._refresh(container, berth_id)
        deadline = time.monotonic() + 10
        while (
            number == _signal.SIGKILL and status.state == "running" and time.monotonic() < deadline
        ):
            time.sleep(0.02)
            status = self._refresh(container, berth_id)
        return status

    def remove(self, berth_id: str, force: bool = False) -> None:
        self._exec_targets.pop(berth_id, None)
        try:
            container = self._container(berth_id)
            with self._errors("remove", berth_id):
                container.remove(force=force, v=True)
        except SandboxNotFound:
            self._drop_berth_dir(berth_id)  # removed behind our back: ours is still here
            raise
        self._drop_berth_dir(berth_id)

    # ------------------------------------------------------------------ shared directory

    def _make_berth_dir(self, berth_id: str) -> tuple[str, bool]:
        """``<berth_root>/<berth_id>``, and whether this call created it."""
        if not _BERTH_ID_RE.match(berth_id):
            raise RuntimeFailure(f"invalid container id {berth_id!r} for a shared directory")
        try:
            os.makedirs(self._berth_root, mode=0o700, exist_ok=True)
            path = os.path.join(self._berth_root, berth_id)
            try:
                os.mkdir(path)
                created = True
            except FileExistsError:
                created = False  # a retried create
            os.chmod(path, 0o777)  # the image's user may not be root
        except OSError as exc:
            raise RuntimeFailure(f"cannot create the shared directory: {exc}") from None
        return path, created

    def _drop_berth_dir(self, berth_id: str) -> None:
        # Only ever our own <root>/<id>: never a path read back from the engine.
        if _BERTH_ID_RE.match(berth_id):
            path = os.path.join(self._berth_root, berth_id)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)

    def berth_dir(self, berth_id: str) -> BerthDir:
        container = self._container(berth_id)
        host = (container.attrs.get("HostConfig") or {}).get("Mounts") or []
        for mount in host:
            if mount.get("Target") == SANDBOX_BERTH_DIR and mount.get("Type") == "bind":
                return BerthDir(str(mount["Source"]), SANDBOX_BERTH_DIR)
        raise RuntimeFailure(
            f"container {berth_id} has no shared directory (create it with berth_dir=True)"
        )

    def inspect(self, berth_id: str) -> SandboxStatus:
        return self._status(self._container(berth_id))

    def list_managed(self, node_id: str) -> list[SandboxStatus]:
        with self._errors("list containers"):
            containers = self._docker().containers.list(
                all=True, filters={"label": f"berth.node={node_id}"}, ignore_removed=True
            )
        return [self._status(c) for c in containers if c.labels.get("berth.id")]

    # ------------------------------------------------------------------ exec

    def _open_exec(self, berth_id: str, spec: ExecSpec, *, tty: bool, stdin: bool) -> _Exec:
        if not spec.command:
            raise RuntimeFailure("exec needs a command")
        container_id = self._exec_targets.get(berth_id)
        if container_id is None:
            container = self._container(berth_id)
            if self._status(container).state != "running":
                raise RuntimeFailure(f"container {berth_id} is not running")
            container_id = self._exec_targets[berth_id] = str(container.id)
        api = self._docker().api
        try:
            with self._errors("exec", berth_id):
                try:
                    created = api.exec_create(
                        container_id,
                        list(spec.command),
                        stdout=True,
                        stderr=True,
                        stdin=stdin,
                        tty=tty,
                        environment=dict(spec.env) or None,
                        workdir=spec.workdir,
                    )
                except docker.errors.APIError as exc:
                    if exc.status_code == 409:  # not running (stopped, paused, restarting)
                        raise RuntimeFailure(f"container {berth_id} is not running") from None
                    raise
                handle = api.exec_start(created["Id"], tty=tty, socket=True)
        except RuntimeError_:
            self._exec_targets.pop(berth_id, None)  # look again next time
            raise
        return _Exec(self, container_id, created["Id"], handle, tty=tty)

    def exec(self, berth_id: str, spec: ExecSpec) -> ExecResult:
        started = time.monotonic()
        run = self._open_exec(berth_id, spec, tty=False, stdin=spec.stdin is not None)
        try:
            result = run.run_to_completion(
                spec.stdin, timeout=spec.timeout, output_cap=spec.output_cap, started=started
            )
        finally:
            run.close_socket()
        if (
            spec.workdir
            and result.exit_code == 126
            and b"chdir to cwd" in result.stdout + result.stderr
            and b"OCI runtime exec failed" in result.stdout + result.stderr
        ):
            raise WorkdirNotFound(
                f"working directory {spec.workdir!r} does not exist in the container", field="workdir"
            )
        return result

    def exec_detached(self, berth_id: str, spec: ExecSpec) -> None:
        """An exec the engine runs on its own (``detach``): its process is the container's."""
        if not spec.command:
            raise RuntimeFailure("exec needs a command")
        container = self._container(berth_id)
        if self._status(container).state != "running":
            raise RuntimeFailure(f"container {berth_id} is not running")
        api = self._docker().api
        with self._errors("exec", berth_id):
            try:
                created = api.exec_create(
                    str(container.id),
                    list(spec.command),
                    stdout=False,
                    stderr=False,
                    stdin=False,
                    environment=dict(spec.env) or None,
                    workdir=spec.workdir,
                )
                api.exec_start(created["Id"], detach=True)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise RuntimeFailure(f"container {berth_id} is not running") from None
                raise

    def exec_stream(self, berth_id: str, spec: ExecSpec, tty: bool = False) -> ExecStream:
        run = self._open_exec(berth_id, spec, tty=tty, stdin=True)
        run.wait_started()
        stream = DockerExecStream(run, timeout=spec.timeout)
        if spec.stdin:
            stream.write_stdin(spec.stdin)
        return stream

    # ------------------------------------------------------------------ logs and files

    def logs(self, berth_id: str, tail: int | None = None) -> bytes:
        container = self._container(berth_id)
        with self._errors("logs", berth_id):
            data = container.logs(
                stdout=True, stderr=True, tail="all" if tail is None else max(0, tail)
            )
        return bytes(data)

    def logs_capped(self, berth_id: str, tail: int | None, max_bytes: int) -> bytes:
        """The logs streamed from the engine, keeping only the last ``max_bytes`` (plus at
        most one log frame) in memory."""
        if max_bytes <= 0 or (tail is not None and tail <= 0):
            self._container(berth_id)  # still SandboxNotFound for an unknown container
            return b""
        container = self._container(berth_id)
        kept: collections.deque[bytes] = collections.deque()
        total = 0
        with self._errors("logs", berth_id):
            stream = container.logs(
                stdout=True, stderr=True, stream=True, follow=False,
                tail="all" if tail is None else tail,
            )
            try:
                for chunk in stream:
                    if not chunk:
                        continue
                    kept.append(chunk)
                    total += len(chunk)
                    while total - len(kept[0]) >= max_bytes:
                        total -= len(kept.popleft())
            finally:
                with contextlib.suppress(Exception):
                    stream.close()
        return b"".join(kept)[-max_bytes:]

    def follow_logs(self, berth_id: str, tail: int | None = None) -> Iterator[bytes]:
        container = self._container(berth_id)
        with self._errors("logs", berth_id):
            # The SDK lifts the socket timeout for this stream: quiet containers are fine.
            # The engine takes the tail and the follow from one point: nothing lost or doubled.
            stream = container.logs(stdout=True, stderr=True, stream=True, follow=True,
                                    tail="all" if tail is None else max(0, tail))

        def follow() -> Iterator[bytes]:
            try:
                with self._errors("logs", berth_id):
                    yield from stream
            finally:
                with contextlib.suppress(Exception):
                    stream.close()

        return follow()

    def put_file(self, berth_id: str, path: str, data: bytes) -> None:
        directory, name = posixpath.split(path)
        if not path.startswith("/") or not name or "\0" in path:
            raise InvalidPath(f"file path must be absolute and name a file: {path!r}")
        container = self._container(berth_id)
        norm = posixpath.normpath(path)
        if (
            (norm == "/tmp" or norm.startswith("/tmp/"))
            and (container.attrs.get("HostConfig") or {}).get("ReadonlyRootfs")
            and self._status(container).state != "running"
        ):
            raise InvalidPath(
                f"{path!r}: /tmp is a tmpfs that exists only while the container runs; "
                "start it first (or use a profile without a read-only root)"
            )
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        # The parent must exist: extracting parent entries would reset existing
        # directories' modes (e.g. /tmp's 1777).
        with self._file_errors(path, berth_id):
            container.put_archive(directory or "/", buffer.getvalue())

    @contextlib.contextmanager
    def _file_errors(self, path: str, berth_id: str) -> Iterator[None]:
        """``docker cp`` refusals as the client errors they are."""
        try:
            with self._errors(f"file {path}"):
                yield
        except RuntimeFailure as exc:
            if type(exc) is not RuntimeFailure:
                raise
            text = str(exc)
            if "Could not find the file" in text or "no such file or directory" in text.lower():
                raise FileNotFound(f"{path!r}: no such file or directory in the container") from None
            if "read-only" in text:
                raise InvalidPath(
                    f"{path!r} is on the container's read-only root; write under /tmp "
                    "(or use a profile without a read-only root)"
                ) from None
            if "not a directory" in text.lower():
                raise FileNotFound(f"{path!r}: a parent is not a directory") from None
            raise

    def get_file(self, berth_id: str, path: str) -> bytes:
        return self._get_file(berth_id, path, None)

    def get_file_capped(self, berth_id: str, path: str, max_bytes: int) -> bytes:
        return self._get_file(berth_id, path, max_bytes)

    def _get_file(self, berth_id: str, path: str, max_bytes: int | None) -> bytes:
        if not path.startswith("/") or "\0" in path:
            raise InvalidPath(f"file path must be absolute: {path!r}")
        container = self._container(berth_id)
        api = self._docker().api
        current = path
        for _ in range(8):  # symlinks are resolved by the engine inside the container
            with self._file_errors(path, berth_id):
                response, stat = self._open_archive(api, str(container.id), current)
            try:
                mode = int(stat.get("mode") or 0)
                if mode & _MODE_DIR:  # refused before a byte of the archive is read
                    raise InvalidPath(f"{path!r} is a directory")
                size = int(stat.get("size") or 0)
                if max_bytes is not None and not mode & _MODE_SYMLINK and size > max_bytes:
                    raise _too_large(path, size, max_bytes)
                with self._file_errors(path, berth_id):
                    try:
                        found = self._first_member(response, path, max_bytes)
                    except tarfile.TarError as exc:
                        raise RuntimeFailure(f"get_file {path}: bad archive from the engine: {exc}") from None
            finally:
                response.close()
            if isinstance(found, bytes):
                return found
            current = found if found.startswith("/") else posixpath.join(posixpath.dirname(current), found)
        raise InvalidPath(f"{path!r}: too many levels of symbolic links")

    def _open_archive(self, api: Any, container_id: str, path: str) -> tuple[requests.Response, dict[str, Any]]:
        """``GET /containers/{id}/archive`` as a stream the caller closes, and the decoded
        path-stat header. (The SDK's ``get_archive`` hides the response, so a download cut
        short could not close its connection.)"""
        response = api.get(
            f"{api.base_url}/v{api.api_version}/containers/{container_id}/archive",
            params={"path": path},
            headers={"Accept-Encoding": "identity"},
            stream=True,
            timeout=self._timeout,
        )
        try:
            response.raise_for_status()
        except requests.exceptions.HTTPError as exc:
            try:
                docker.errors.create_api_error_from_http_exception(exc)  # reads the message, raises
            finally:
                response.close()
            raise
        header = response.headers.get("X-Docker-Container-Path-Stat")
        try:
            stat = docker.utils.decode_json_header(header) if header else {}
        except ValueError:
            stat = {}
        return response, stat if isinstance(stat, dict) else {}

    @staticmethod
    def _first_member(response: requests.Response, path: str, max_bytes: int | None) -> bytes | str:
        """The content of the archive's first member (a regular file), or the target of a
        symlink; the tar is read as a stream, never beyond ``max_bytes + 1`` of content."""
        reader = _ChunkReader(response.iter_content(_CHUNK))
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            member = tar.next()
            if member is None:
                raise FileNotFound(f"get_file {path}: empty archive from the engine")
            if member.issym():
                return member.linkname
            if member.isdir():
                raise InvalidPath(f"{path!r} is a directory")
            if max_bytes is not None and member.size > max_bytes:
                raise _too_large(path, member.size, max_bytes)
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is None:
                raise InvalidPath(f"{path!r} is not a regular file")
            return extracted.read()

    # ------------------------------------------------------------------ images

    @staticmethod
    def _image_info(image: Any) -> ImageInfo:
        return ImageInfo(
            id=image.id,
            tags=tuple(image.tags),
            size=int(image.attrs.get("Size") or 0),
            created=normalize_time(image.attrs.get("Created")) or "",
            runtime="docker",
        )

    def images(self) -> list[ImageInfo]:
        with self._errors("list images"):
            return [self._image_info(i) for i in self._docker().images.list()]

    def pull(
        self, ref: str, progress: Callable[[dict[str, object]], None] | None = None
    ) -> ImageInfo:
        client = self._docker()
        with self._errors(f"pull {ref}"):
            for line in client.api.pull(ref, stream=True, decode=True):
                if not isinstance(line, dict):
                    continue
                if line.get("error"):
                    raise RuntimeFailure(f"pull {ref}: {line['error']}")
                if progress is not None:
                    try:
                        progress(line)
                    except Exception:  # a broken progress bar must not fail the pull
                        log.exception("docker runtime: pull progress callback failed")
            image = client.images.get(ref)
        return self._image_info(image)

    def remove_image(self, ref: str, force: bool = False) -> None:
        with self._errors(f"remove image {ref}"):
            self._docker().images.remove(ref, force=force)

    # ------------------------------------------------------------------ watch

    def watch(self, on_exit: Callable[[ExitNotice], None]) -> None:
        self._on_exit = on_exit
        if self._tracker is not None:
            return
        self._tracker = ExitTracker()
        for target, label in ((self._events_loop, "events"), (self._poll_loop, "poll")):
            thread = threading.Thread(
                target=target, name=f"docker-{label}-{self.node_id}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _deliver(self, notice: ExitNotice | None) -> None:
        callback = self._on_exit
        if notice is None or callback is None:
            return
        try:
            callback(notice)
        except Exception:  # a broken callback must not stop the watcher
            log.exception("docker runtime: on_exit callback failed for %s", notice.berth_id)

    def _events_loop(self) -> None:
        """Die events are hints: each one triggers an inspect of that container."""
        assert self._tracker is not None
        since: int | None = None
        backoff = 0.5
        while not self._closed.is_set():
            try:
                with self._errors("events"):
                    stream = self._docker().events(
                        decode=True,
                        since=since,
                        filters={
                            "type": "container",
                            "event": "die",
                            "label": f"berth.node={self.node_id}",
                        },
                    )
                    self._events_stream = stream
                    if self._closed.is_set():
                        break
                    backoff = 0.5
                    for event in stream:
                        since = int(event.get("time") or time.time())
                        self._on_event(event)
            except RuntimeError_ as exc:
                if not self._closed.is_set():
                    log.info("docker runtime: event stream interrupted (%s); reconnecting", exc)
            except Exception:
                if not self._closed.is_set():
                    log.exception("docker runtime: event stream failed; reconnecting")
            finally:
                self._events_stream = None
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_event(self, event: dict[str, Any]) -> None:
        assert self._tracker is not None
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        berth_id = attributes.get("berth.id")
        if not berth_id:
            return
        try:
            status = self.inspect(berth_id)
        except SandboxNotFound:
            code = attributes.get("exitCode")
            nanos = event.get("timeNano")
            finished = format_time(datetime.fromtimestamp(int(nanos) / 1e9, UTC)) if nanos else None
            self._deliver(
                self._tracker.vanished(
                    berth_id,
                    int(code) if code is not None and str(code).lstrip("-").isdigit() else None,
                    finished,
                    evidence=True,
                )
            )
            return
        except RuntimeError_:
            return  # the poll will see it
        self._deliver(self._tracker.observe(status))

    def _poll_loop(self) -> None:
        """The fallback: events can be missed (the engine keeps only the last 256)."""
        assert self._tracker is not None
        while not self._closed.is_set():
            try:
                statuses = self.list_managed(self.node_id)
            except RuntimeError_ as exc:
                log.debug("docker runtime: poll failed: %s", exc)
                statuses = None  # engine away: nothing can be said to have vanished
            except Exception:
                log.exception("docker runtime: poll failed")
                statuses = None
            if statuses is not None:
                present = {s.berth_id for s in statuses}
                for status in statuses:
                    self._deliver(self._tracker.observe(status))
                for berth_id in self._tracker.running_ids() - present:
                    self._deliver(self._tracker.vanished(berth_id))
                self._tracker.prune(present)
            self._closed.wait(self._poll_interval)

    def close(self) -> None:
        self._closed.set()
        stream = self._events_stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()
        if self._owns_client and self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


class _Exec:
    """One attached exec: its raw socket, the 8-byte frame demultiplexer, and the
    host-side kill (see the module docstring)."""

    def __init__(
        self, runtime: DockerRuntime, container_id: str, exec_id: str, handle: Any, *, tty: bool
    ) -> None:
        self._runtime = runtime
        self.container_id = container_id
        self.exec_id = exec_id
        self._handle = handle  # the SDK's SocketIO; keeps the connection referenced
        self.sock: socket.socket = getattr(handle, "_sock", handle)
        self.sock.settimeout(None)
        self.tty = tty
        self._buffer = bytearray()
        self._write_lock = threading.Lock()
        self.eof_at: float | None = None  # when the output stream ended

    def demux(self, data: bytes) -> list[tuple[str, bytes]]:
        """Split the stream into (name, payload); a tty stream has no frames."""
        if self.tty:
            return [("stdout", data)] if data else []
        self._buffer += data
        frames: list[tuple[str, bytes]] = []
        while len(self._buffer) >= 8:
            size = int.from_bytes(self._buffer[4:8], "big")
            if len(self._buffer) < 8 + size:
                break
            kind = "stderr" if self._buffer[0] == 2 else "stdout"
            frames.append((kind, bytes(self._buffer[8 : 8 + size])))
            del self._buffer[: 8 + size]
        return frames

    def inspect(self) -> dict[str, Any]:
        with self._runtime._errors("exec inspect"):
            result: dict[str, Any] = self._runtime._docker().api.exec_inspect(self.exec_id)
        return result

    @staticmethod
    def _ended(info: dict[str, Any]) -> bool:
        # Not Running with no ExitCode means "not started yet": the engine answers the
        # upgrade before it marks the exec running.
        return not info.get("Running") and info.get("ExitCode") is not None

    def wait_started(self, timeout: float = 5.0) -> None:
        """Until the engine has the process running (or already ended), so that a signal
        or a close right after ``exec_stream`` is never lost."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.inspect()
            if info.get("Running") or self._ended(info) or time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def _host_pid(self, wait: float = 1.0) -> int | None:
        """The exec'd process's host pid, if it still runs and is visibly this container's."""
        deadline = time.monotonic() + wait
        while True:
            info = self.inspect()
            pid = int(info.get("Pid") or 0)
            if self._ended(info):
                return None
            if info.get("Running") and pid > 0:
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if self.container_id in f.read():
                    return pid
        except OSError:
            pass
        raise RuntimeFailure(
            "cannot signal the exec'd process: it is not visible from this host "
            "(is the Docker engine remote?)"
        )

    def signal(self, sig: int) -> bool:
        """Signal the exec's process group and descendants; False if it already ended."""
        pid = self._host_pid()
        if pid is None:
            return False
        if sig == _signal.SIGKILL:
            _proc.kill_tree(pid)
        else:
            _proc.signal_tree(pid, sig)
        return True

    def exit_code(self, wait: float = 2.0) -> int | None:
        """Once the stream ended: Docker records the exit a moment later, give it that.
        None if it never does (the container died under the exec)."""
        deadline = time.monotonic() + wait
        while True:
            info = self.inspect()
            if self._ended(info):
                return int(info["ExitCode"])
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def send(self, data: bytes) -> None:
        with self._write_lock:
            self.sock.sendall(data)

    def shutdown_write(self) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(Exception):
            self._handle.close()

    def run_to_completion(
        self, stdin: bytes | None, *, timeout: float | None, output_cap: int, started: float
    ) -> ExecResult:
        out, err = CappedBuffer(output_cap), CappedBuffer(output_cap)
        pending = memoryview(stdin or b"")
        if stdin is not None and not pending:
            self.shutdown_write()
        self.sock.setblocking(False)
        deadline = started + timeout if timeout is not None else None
        stop_at: float | None = None
        timed_out = False
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and not timed_out and now >= deadline:
                    timed_out = True
                    stop_at = now + _KILL_GRACE
                    try:
                        if not self.signal(_signal.SIGKILL):
                            log.debug("exec %s ended before its timeout kill", self.exec_id[:12])
                    except RuntimeFailure as exc:
                        log.warning(
                            "exec %s timed out and could not be killed: %s", self.exec_id[:12], exc
                        )
                        break
                if stop_at is not None and now >= stop_at:
                    break
                wait = [1.0]
                if deadline is not None and not timed_out:
                    wait.append(max(0.0, deadline - now))
                if stop_at is not None:
                    wait.append(max(0.0, stop_at - now))
                writers = [self.sock] if pending else []
                readable, writable, _ = select.select([self.sock], writers, [], min(wait))
                if writable:
                    try:
                        pending = pending[self.sock.send(pending[:_CHUNK]) :]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        pending = memoryview(b"")
                    if not pending:
                        self.shutdown_write()
                if readable:
                    try:
                        chunk = self.sock.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    except (ConnectionResetError, OSError) as exc:
                        if timed_out:
                            break
                        raise RuntimeUnavailable(f"exec stream broken: {exc}") from None
                    if not chunk:
                        break
                    for kind, payload in self.demux(chunk):
                        (err if kind == "stderr" else out).append(payload)
        finally:
            self.sock.setblocking(True)
        code = self.exit_code()
        return ExecResult(
            exit_code=code,
            stdout=out.getvalue(),
            stderr=err.getvalue(),
            duration_ms=(time.monotonic() - started) * 1000,
            truncated=out.truncated or err.truncated,
            timed_out=timed_out,
        )


class DockerExecStream(ExecStream):
    """An interactive exec on the attached socket (see ``_Exec``). ``timed_out`` becomes
    True when ``timeout`` killed the process tree."""

    def __init__(self, run: _Exec, *, timeout: float | None) -> None:
        self._run = run
        self._closed = False
        self._stdin_closed = False
        self.timed_out = False
        self._timer: threading.Timer | None = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def _on_timeout(self) -> None:
        with contextlib.suppress(RuntimeError_):
            if self._run.signal(_signal.SIGKILL):
                self.timed_out = True

    def write_stdin(self, data: bytes) -> None:
        if self._stdin_closed or self._closed:
            raise RuntimeFailure("stdin of this exec is closed")
        try:
            self._run.send(data)
        except OSError as exc:
            raise RuntimeFailure(f"the process no longer reads stdin ({exc})") from None

    def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            if self._run.tty:
                with contextlib.suppress(OSError):
                    self._run.send(b"\x04")  # a terminal's end-of-file
            else:
                self._run.shutdown_write()

    def signal(self, signame: str) -> None:
        self._run.signal(signal_number(signame))

    def output(self) -> Iterator[tuple[str, bytes]]:
        while True:
            try:
                chunk = self._run.sock.recv(_CHUNK)
            except OSError:
                chunk = b""  # closed under us
            if not chunk:
                self._run.eof_at = time.monotonic()
                return
            yield from self._run.demux(chunk)

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self._run.inspect()
            if _Exec._ended(info):
                return int(info["ExitCode"])
            if self._run.eof_at is not None and time.monotonic() - self._run.eof_at > 2:
                return None  # the stream is over and the engine never recorded an exit
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(RuntimeError_):
            self._run.signal(_signal.SIGKILL)
        self._run.close_socket()
