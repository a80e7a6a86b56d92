"""The one small interface every sandbox runtime implements.

A runtime is a side-effect adapter: it knows nothing of events, actors or HTTP. Every
call is blocking and may be slow, so actors call it from worker threads, never from their
mailbox. Runtimes identify containers by the berthd id (``berth_id``) they were created
with; they keep their own mapping to engine ids (the Docker id, a workspace dir) and
label what they create with ``berth.id`` and ``berth.node`` so that reconciliation after
a crash can find it again.

Errors: a runtime raises only the exceptions defined here. ``RuntimeUnavailable`` means
the engine cannot be reached (HTTP 503); ``SandboxNotFound`` means the container does not
exist (any more) in the runtime; ``RuntimeFailure`` is any other refusal by the engine
(bad image, bad command, ...), with a message fit for a user. Refusals that are the
client's fault are subclasses of ``RuntimeFailure`` carrying the stable API ``code`` of the
client error they become (``berthd.domain.errors.for_code``): a file or host path that does
not exist (``FileNotFound``, ``HostPathNotFound``: 404), a bad path (``InvalidPath``: 400),
a missing working directory (``WorkdirNotFound``: 400), a path that leaves its jail
(``PathForbidden``, ``MountForbidden``: 403), an unknown security profile
(``UnknownProfile``: 400), a file too big to download (``FileTooLarge``: 413). This
module stays stdlib-only (the local shim imports it), so the mapping goes by code, not by
class.

Shared directories: a container created with ``ContainerSpec.berth_dir`` gets a directory
that is the same on the host and inside the sandbox (``Runtime.berth_dir``), writable by
the container's processes, whose sandbox path they find in ``$BERTH_DIR``. Unix sockets
work across it, which is how the host reaches in-sandbox agents (``berthd.kernel``)
without depending on an exec stream that would die with the daemon. It lives as long as
the container and is deleted by ``remove``. The sandbox path ``/run/berth`` is reserved:
no mount may target it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from berthd.runtime.security import SecurityPolicy

__all__ = [
    "BERTH_DIR_ENV",
    "SANDBOX_BERTH_DIR",
    "BerthDir",
    "CommandMissing",
    "LimitRefused",
    "LOG_TAIL_WINDOW",
    "last_lines",
    "ContainerSpec",
    "ExecResult",
    "ExecSpec",
    "ExecStream",
    "ImageInfo",
    "ImageMissing",
    "Mount",
    "PortMapping",
    "Limits",
    "Runtime",
    "RuntimeError_",
    "RuntimeFailure",
    "RuntimeUnavailable",
    "SandboxNotFound",
    "SandboxStatus",
    "ExitNotice",
    "FileNotFound",
    "FileTooLarge",
    "HostPathNotFound",
    "InvalidPath",
    "MountForbidden",
    "PathForbidden",
    "UnknownProfile",
    "WorkdirNotFound",
]


BERTH_DIR_ENV = "BERTH_DIR"  # the sandbox path of the shared directory, in every process
SANDBOX_BERTH_DIR = "/run/berth"  # where it is inside a sandbox with a filesystem of its own


class RuntimeError_(Exception):  # noqa: N801 - the builtin name is taken
    """Base of every error a runtime raises. ``code``: the API error code it becomes
    (None: the generic mapping by class); ``details``: what the client error carries."""

    code: str | None = None

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        self.details = details


class RuntimeUnavailable(RuntimeError_):
    """The engine cannot be reached (socket gone, daemon stopped, timeout)."""


class SandboxNotFound(RuntimeError_):
    """The container does not exist in the runtime (never did, or was removed)."""


class RuntimeFailure(RuntimeError_):
    """The engine refused or failed an operation; the message says why."""


class ImageMissing(RuntimeFailure):
    """The image does not exist in the runtime (pull it first)."""


class FileNotFound(RuntimeFailure):
    """A file (or its parent directory) does not exist in the container (404)."""

    code = "PATH_NOT_FOUND"


class FileTooLarge(RuntimeFailure):
    """A file to download is bigger than the cap the caller gave (413); ``details``
    carries ``size`` (bytes, as far as known) and ``limit``."""

    code = "PAYLOAD_TOO_LARGE"


class HostPathNotFound(RuntimeFailure):
    """A host path (mount source, browsed directory) does not exist (404)."""

    code = "PATH_NOT_FOUND"


class InvalidPath(RuntimeFailure):
    """A path that cannot be used as asked: relative, ``..``, a directory where a file is
    wanted, outside what the runtime reaches (400)."""

    code = "INVALID_PATH"


class WorkdirNotFound(RuntimeFailure):
    """The working directory asked for does not exist in the container (400)."""

    code = "WORKDIR_NOT_FOUND"


class PathForbidden(RuntimeFailure):
    """A path that would leave its jail: a symlink out of the container or out of a host
    root, a host path outside the roots, a host control path (403)."""

    code = "PATH_FORBIDDEN"


class MountForbidden(PathForbidden):
    """A host mount outside the configured mount roots, or of a control path (403)."""

    code = "MOUNT_FORBIDDEN"


class UnknownProfile(RuntimeFailure):
    """No security profile of that name (400, field ``profile``)."""

    code = "VALIDATION_ERROR"


class CommandMissing(RuntimeFailure):
    """No command to run: none given and the image has no default, or the executable is
    not in the sandbox (400, field ``command``)."""

    code = "VALIDATION_ERROR"


LOG_TAIL_WINDOW = 8 << 20
"""The most bytes of existing logs a ``tail`` looks back through."""


def last_lines(data: bytes, n: int | None) -> bytes:
    """The last ``n`` lines of ``data`` (all of it for None)."""
    if n is None:
        return data
    if n <= 0:
        return b""
    return b"".join(data.splitlines(keepends=True)[-n:])


class LimitRefused(RuntimeFailure):
    """A limit the client asked for that this host cannot give, which the request could
    not know (e.g. more CPUs than the host has): 400, ``field`` names it."""

    code = "VALIDATION_ERROR"


@dataclass(frozen=True, slots=True)
class Mount:
    host_path: str
    container_path: str
    mode: str = "ro"  # "ro" | "rw"


@dataclass(frozen=True, slots=True)
class PortMapping:
    container_port: int
    host_port: int | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    memory_mb: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything a runtime needs to create one container."""

    berth_id: str
    node_id: str
    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    mounts: tuple[Mount, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    limits: Limits = Limits()
    network: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    berth_dir: bool = False  # give it a directory shared with the host (Runtime.berth_dir)
    profile: str = "default"  # the security profile (Runtime.security), enforced at create


class BerthDir(NamedTuple):
    """A container's shared directory, seen from both sides."""

    host: str  # the path on the daemon's host
    sandbox: str  # the same directory for the container's processes (also $BERTH_DIR)


@dataclass(frozen=True, slots=True)
class SandboxStatus:
    """What the runtime says of one container right now."""

    berth_id: str
    state: str  # "created" | "running" | "exited"
    exit_code: int | None = None
    started_at: str | None = None  # RFC 3339 UTC, "Z"
    finished_at: str | None = None
    node_id: str | None = None
    runtime_ref: str | None = None  # engine id, for logs and debugging


@dataclass(frozen=True, slots=True)
class ExitNotice:
    """Pushed by ``Runtime.watch``: a container stopped running."""

    berth_id: str
    exit_code: int | None
    finished_at: str | None


@dataclass(frozen=True, slots=True)
class ExecSpec:
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    stdin: bytes | None = None
    timeout: float | None = None  # seconds; None = no limit
    output_cap: int = 1 << 20  # bytes kept per stream; the rest is dropped, truncated=True


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    duration_ms: float
    truncated: bool = False
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    size: int
    created: str  # RFC 3339 UTC
    runtime: str


class ExecStream(abc.ABC):
    """An interactive exec: stdin in, (stream, bytes) chunks out, then the exit code."""

    @abc.abstractmethod
    def write_stdin(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def close_stdin(self) -> None: ...

    @abc.abstractmethod
    def signal(self, signame: str) -> None:
        """Send a signal ("INT", "TERM", "KILL", ...) to the exec'd process (group)."""

    @abc.abstractmethod
    def output(self) -> Iterator[tuple[str, bytes]]:
        """Yield ("stdout"|"stderr", chunk) until the process ends."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, once the process ended (None if unknown)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; kills the process if it is still running."""


class Runtime(abc.ABC):
    """A place where sandboxes run: the Docker engine, local processes, or a fake."""

    name: str  # "docker" | "local" | "fake"

    # True when ``exec_detached`` works: a long-lived process (a kernel agent) can be
    # started in a container that already runs. Docker, local and fake: yes.
    detached_execs: bool = False

    _security: SecurityPolicy | None = None

    def exec_detached(self, berth_id: str, spec: ExecSpec) -> None:
        """Start ``spec.command`` in the running container and return once it started,
        without waiting for it. It belongs to the container, not to this call: it keeps
        running after this returns and after the daemon dies (even by SIGKILL), with the
        isolation of any exec (user, binds, network, limits), and it ends when the
        container stops, is killed or is removed. No stdin; its output is not returned.
        ``RuntimeFailure`` if the container is not running or the command is not found
        (where the runtime can tell), ``WorkdirNotFound`` for a missing ``workdir``."""
        raise RuntimeFailure(f"the {self.name} runtime cannot start a detached process")

    @property
    def security(self) -> SecurityPolicy:
        """The profiles and host-path jails applied at create (``berthd.runtime.security``);
        the built-in profiles and no host roots until the daemon sets its own."""
        if self._security is None:
            from berthd.runtime.security import SecurityPolicy

            self._security = SecurityPolicy()
        return self._security

    @security.setter
    def security(self, policy: SecurityPolicy) -> None:
        self._security = policy

    def enforcement(self) -> dict[str, str]:
        """What enforces each part of a profile in this runtime, for ``/v1/info``
        ("not enforced" where nothing does)."""
        return {}

    def private_dirs(self) -> list[str]:
        """Host directories of this runtime that no mount may ever reach."""
        return []

    @property
    @abc.abstractmethod
    def isolation(self) -> str:
        """How sandboxes are isolated: "container", "bubblewrap", "none", ..."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise ``RuntimeUnavailable`` if the engine cannot be reached."""

    # containers
    @abc.abstractmethod
    def create(self, spec: ContainerSpec) -> SandboxStatus: ...

    @abc.abstractmethod
    def start(self, berth_id: str) -> SandboxStatus: ...

    @abc.abstractmethod
    def stop(self, berth_id: str, timeout: float = 10.0) -> SandboxStatus:
        """Stop (TERM, then KILL after ``timeout``); returns the exited status."""

    @abc.abstractmethod
    def kill(self, berth_id: str, signal: str = "KILL") -> SandboxStatus: ...

    @abc.abstractmethod
    def remove(self, berth_id: str, force: bool = False) -> None:
        """Remove the container; ``SandboxNotFound`` if it is already gone."""

    @abc.abstractmethod
    def inspect(self, berth_id: str) -> SandboxStatus: ...

    @abc.abstractmethod
    def list_managed(self, node_id: str) -> list[SandboxStatus]:
        """Every container this node created (label ``berth.node``) still in the runtime."""

    @abc.abstractmethod
    def exec(self, berth_id: str, spec: ExecSpec) -> ExecResult: ...

    @abc.abstractmethod
    def exec_stream(self, berth_id: str, spec: ExecSpec, tty: bool = False) -> ExecStream: ...

    @abc.abstractmethod
    def logs(self, berth_id: str, tail: int | None = None) -> bytes: ...

    def logs_capped(self, berth_id: str, tail: int | None, max_bytes: int) -> bytes:
        """The last ``max_bytes`` bytes of ``logs(berth_id, tail)``, holding no more than
        about that much in memory while reading them (runtimes override this default,
        which reads everything first)."""
        if max_bytes <= 0:
            return b""
        return self.logs(berth_id, tail)[-max_bytes:]

    @abc.abstractmethod
    def follow_logs(self, berth_id: str, tail: int | None = None) -> Iterator[bytes]:
        """Existing logs (with ``tail``, only their last ``tail`` lines, within the last
        ``LOG_TAIL_WINDOW`` bytes), then new output as it comes, until the container stops.
        Nothing is lost or repeated between the two, and memory stays bounded whatever
        the log's size."""

    @abc.abstractmethod
    def put_file(self, berth_id: str, path: str, data: bytes) -> None: ...

    def berth_dir(self, berth_id: str) -> BerthDir:
        """The shared directory of a container created with ``ContainerSpec.berth_dir``
        (see the module docstring). ``SandboxNotFound`` for an unknown container,
        ``RuntimeFailure`` for one created without it."""
        self.inspect(berth_id)
        raise RuntimeFailure(f"the {self.name} runtime has no shared directories")

    @abc.abstractmethod
    def get_file(self, berth_id: str, path: str) -> bytes: ...

    def get_file_capped(self, berth_id: str, path: str, max_bytes: int) -> bytes:
        """``get_file``, but a file of more than ``max_bytes`` bytes is ``FileTooLarge``,
        decided without reading more than ``max_bytes + 1`` of it into memory (runtimes
        override this default, which reads the whole file first)."""
        data = self.get_file(berth_id, path)
        if len(data) > max_bytes:
            raise FileTooLarge(
                f"{path!r} is {len(data)} bytes; downloads are limited to {max_bytes}",
                size=len(data), limit=max_bytes,
            )
        return data

    # images
    @abc.abstractmethod
    def images(self) -> list[ImageInfo]: ...

    @abc.abstractmethod
    def pull(self, ref: str, progress: Callable[[dict[str, object]], None] | None = None) -> ImageInfo: ...

    @abc.abstractmethod
    def remove_image(self, ref: str, force: bool = False) -> None: ...

    # lifecycle
    @abc.abstractmethod
    def watch(self, on_exit: Callable[[ExitNotice], None]) -> None:
        """Start pushing an ``ExitNotice`` for every managed container that stops running
        (exits on its own, is killed behind our back, or is stopped through us) within 5 s.
        Runs on the runtime's own thread; ``on_exit`` must not block."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop watching and release connections."""
