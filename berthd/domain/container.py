"""Containers: commands, events, state, and the pure ``decide``/``evolve`` pair.

Every lifecycle operation is two events: the intent (``...Requested``), appended before the
runtime is touched, and the outcome (``ContainerCreated``, ``ContainerStarted``,
``ContainerExited``, ``...Failed``), appended after. A crash between the two leaves the
intent without its outcome in the log, which is exactly what boot reconciliation looks
for. ``pending`` in the state names the operation in flight; lifecycle commands are
refused while one is (409), except ``kill``, which must always get through.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Annotated, Literal

import msgspec

from berthd.domain.base import Command, Event
from berthd.domain.errors import Conflict, ValidationError
from berthd.domain.image import ImageRef

__all__ = [
    "CONTAINER_EVENTS",
    "ContainerCreateFailed",
    "ContainerCreateRequested",
    "ContainerCreated",
    "ContainerExited",
    "ContainerKillRequested",
    "ContainerLost",
    "ContainerOperationFailed",
    "ContainerRemoveRequested",
    "ContainerRemoved",
    "ContainerRestartRequested",
    "ContainerStartRequested",
    "ContainerStarted",
    "ContainerState",
    "ContainerStopRequested",
    "CreateContainer",
    "ExecFailed",
    "ExecFinished",
    "ExecInContainer",
    "ExecStarted",
    "FileWritten",
    "KillContainer",
    "Limits",
    "MIN_CPUS",
    "MIN_MEMORY_MB",
    "MIN_PIDS",
    "Mount",
    "PortMapping",
    "RemoveContainer",
    "RestartContainer",
    "StartContainer",
    "StopContainer",
    "WriteFile",
    "decide",
    "evolve",
    "observe_exit",
    "Observed",
    "reconcile",
    "replay",
]

NAME_RE = r"^(?![0-9a-f]{12}$)[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""Names are unique per kind and never look like an id (12 hex), so an id or a name
given to an endpoint always means one container."""
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE, max_length=63)]
NoNul = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$", max_length=65536)]
Argv = Annotated[list[NoNul], msgspec.Meta(max_length=4096)]
AbsPath = Annotated[str, msgspec.Meta(pattern=r"^/[^\x00]*$", max_length=4096)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86400)]
Signal = Literal[
    "HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "STOP", "CONT", "WINCH", "ALRM",
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM", "SIGSTOP", "SIGCONT",
    "SIGWINCH", "SIGALRM",
]
EnvMap = dict[Annotated[str, msgspec.Meta(pattern=r"^[^=\x00]+$", max_length=1024)], NoNul]
LabelMap = dict[Annotated[str, msgspec.Meta(min_length=1, max_length=255)], Annotated[str, msgspec.Meta(max_length=4096)]]

# ---------------------------------------------------------------------------- parts


class Mount(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host_path: AbsPath
    container_path: AbsPath
    mode: Literal["ro", "rw"] = "ro"


class PortMapping(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    container_port: Port
    host_port: Port | None = None


MIN_MEMORY_MB = 6
"""Docker's engine minimum (``Minimum memory limit allowed is 6MB``); less is a 502 there."""
MIN_CPUS = 0.01
"""The kernel's smallest CFS quota, 1 ms per 100 ms period: Docker writes ``cpus * 100000`` to
``cpu.cfs_quota_us`` and runc fails the start below 1000 (EINVAL)."""
MIN_PIDS = 8
"""The pids limit counts the sandbox's own processes: the local runtime's main process needs
4 (shim, bubblewrap and its init, the command) and each exec 3 more (bubblewrap and its init,
the command); Docker's needs 2 (its init and the command). Below 4 the local sandbox cannot
start (1: EAGAIN, a 502; 2-3: it exits 1 at once), below 7 no exec can run; 8 runs the
command and one exec with a spare."""


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    # The bounds here are the ones events were recorded with (they decode through this type
    # too); a new create is held to the stricter minima in ``check`` (``decide``).
    memory_mb: Annotated[int, msgspec.Meta(ge=4, le=1 << 20)] | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)] | None = None

    def check(self) -> None:
        """400 naming the field for a limit no runtime can apply (the ``MIN_*`` above)."""
        if self.memory_mb is not None and self.memory_mb < MIN_MEMORY_MB:
            raise ValidationError(f"limits.memory_mb must be at least {MIN_MEMORY_MB} (MiB), "
                                  f"not {self.memory_mb}", field="limits.memory_mb")
        if self.cpus is not None and self.cpus < MIN_CPUS:
            raise ValidationError(f"limits.cpus must be at least {MIN_CPUS}, not {self.cpus}",
                                  field="limits.cpus")
        if self.pids is not None and self.pids < MIN_PIDS:
            raise ValidationError(f"limits.pids must be at least {MIN_PIDS} (the sandbox's own "
                                  f"processes count against it), not {self.pids}", field="limits.pids")


# ---------------------------------------------------------------------------- commands


class CreateContainer(Command):
    image: ImageRef
    command: Argv = []
    name: Name | None = None
    env: EnvMap = {}
    workdir: AbsPath | None = None
    mounts: list[Mount] = []
    ports: list[PortMapping] = []
    limits: Limits = Limits()
    profile: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = "default"
    labels: LabelMap = {}
    runtime: Literal["docker", "local"] | None = None
    start: bool = True


class StartContainer(Command):
    pass


class StopContainer(Command):
    timeout: Seconds = 10.0


class RestartContainer(Command):
    timeout: Seconds = 10.0


class KillContainer(Command):
    signal: Signal = "KILL"


class RemoveContainer(Command):
    force: bool = False


class ExecInContainer(Command):
    command: Annotated[list[NoNul], msgspec.Meta(min_length=1, max_length=4096)]
    env: EnvMap = {}
    workdir: AbsPath | None = None
    stdin: Annotated[str, msgspec.Meta(max_length=16 << 20)] | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None


class WriteFile(Command):
    path: AbsPath
    size: int


# ---------------------------------------------------------------------------- events


class ContainerEvent(Event, frozen=True, kw_only=True):
    kind = "container"


class ContainerCreateRequested(ContainerEvent, frozen=True, kw_only=True):
    id: str
    name: str
    image: str
    runtime: str
    command: list[str] = []
    env: dict[str, str] = {}
    workdir: str | None = None
    mounts: list[Mount] = []
    ports: list[PortMapping] = []
    limits: Limits = Limits()
    profile: str = "default"
    labels: dict[str, str] = {}
    owner: str = "admin"
    start: bool = True
    created_at: str = ""


class ContainerCreated(ContainerEvent, frozen=True, kw_only=True):
    runtime_ref: str | None = None


class ContainerCreateFailed(ContainerEvent, frozen=True, kw_only=True):
    reason: str
    code: str = "RUNTIME_FAILED"


class ContainerStartRequested(ContainerEvent, frozen=True, kw_only=True):
    pass


class ContainerStarted(ContainerEvent, frozen=True, kw_only=True):
    started_at: str


class ContainerStopRequested(ContainerEvent, frozen=True, kw_only=True):
    timeout: float = 10.0


class ContainerRestartRequested(ContainerEvent, frozen=True, kw_only=True):
    timeout: float = 10.0


class ContainerKillRequested(ContainerEvent, frozen=True, kw_only=True):
    signal: str = "KILL"


class ContainerExited(ContainerEvent, frozen=True, kw_only=True):
    """The main process ended: on its own, stopped, killed, restarted or found dead."""

    exit_code: int | None = None
    finished_at: str | None = None
    reason: str = "exited"  # exited | stopped | killed | restart | reconciled


class ContainerOperationFailed(ContainerEvent, frozen=True, kw_only=True):
    """A start/stop/kill/restart/remove intent the runtime refused; state goes back."""

    operation: str
    reason: str
    code: str = "RUNTIME_FAILED"
    status: str = "running"  # the status to return to


class ContainerRemoveRequested(ContainerEvent, frozen=True, kw_only=True):
    force: bool = False


class ContainerRemoved(ContainerEvent, frozen=True, kw_only=True):
    pass


class ContainerLost(ContainerEvent, frozen=True, kw_only=True):
    """The runtime no longer has the container, and we did not remove it."""

    reason: str = "vanished from the runtime"


class ExecStarted(ContainerEvent, frozen=True, kw_only=True):
    exec_id: str
    command: list[str]


class ExecFinished(ContainerEvent, frozen=True, kw_only=True):
    exec_id: str
    exit_code: int | None
    duration_ms: float
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    timed_out: bool = False


class ExecFailed(ContainerEvent, frozen=True, kw_only=True):
    exec_id: str
    reason: str


class FileWritten(ContainerEvent, frozen=True, kw_only=True):
    path: str
    size: int


CONTAINER_EVENTS: tuple[type[Event], ...] = (
    ContainerCreateRequested,
    ContainerCreated,
    ContainerCreateFailed,
    ContainerStartRequested,
    ContainerStarted,
    ContainerStopRequested,
    ContainerRestartRequested,
    ContainerKillRequested,
    ContainerExited,
    ContainerOperationFailed,
    ContainerRemoveRequested,
    ContainerRemoved,
    ContainerLost,
    ExecStarted,
    ExecFinished,
    ExecFailed,
    FileWritten,
)

# ---------------------------------------------------------------------------- state

Status = Literal["creating", "created", "running", "stopping", "exited", "removed", "lost"]
FINAL = frozenset({"removed", "lost"})


class ContainerState(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    image: str
    runtime: str
    command: list[str] = []
    env: dict[str, str] = {}
    workdir: str | None = None
    mounts: list[Mount] = []
    ports: list[PortMapping] = []
    limits: Limits = Limits()
    profile: str = "default"
    labels: dict[str, str] = {}
    owner: str = "admin"
    start: bool = True
    status: str = "creating"
    pending: str | None = None  # the lifecycle operation in flight
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    execs_running: int = 0
    killing: bool = False  # a kill was sent and the process has not been seen to end yet
    version: int = 0


@functools.singledispatch
def _apply(event: Event, state: ContainerState) -> ContainerState:
    return state  # an event this version does not know changes nothing


def evolve(state: ContainerState | None, event: Event) -> ContainerState | None:
    """Fold one event into the state; ``None`` before the stream's first event."""
    if isinstance(event, ContainerCreateRequested):
        return ContainerState(
            id=event.id, name=event.name, image=event.image, runtime=event.runtime,
            command=event.command, env=event.env, workdir=event.workdir, mounts=event.mounts,
            ports=event.ports, limits=event.limits, profile=event.profile, labels=event.labels,
            owner=event.owner, start=event.start, status="creating", pending="create",
            created_at=event.created_at, version=1,
        )
    if state is None:
        return None
    new = _apply(event, state)
    return msgspec.structs.replace(new, version=state.version + 1)


def replay(events: Iterable[Event]) -> ContainerState | None:
    return functools.reduce(evolve, events, None)


def _r(state: ContainerState, **changes: object) -> ContainerState:
    return msgspec.structs.replace(state, **changes)


@_apply.register
def _(e: ContainerCreated, s: ContainerState) -> ContainerState:
    return _r(s, status="created", pending=None)


@_apply.register
def _(e: ContainerCreateFailed, s: ContainerState) -> ContainerState:
    return _r(s, status="removed", pending=None, error=e.reason)


@_apply.register
def _(e: ContainerStartRequested, s: ContainerState) -> ContainerState:
    return _r(s, pending="start")


@_apply.register
def _(e: ContainerStarted, s: ContainerState) -> ContainerState:
    return _r(s, status="running", pending=None, started_at=e.started_at, finished_at=None,
              exit_code=None, error=None, killing=False)


@_apply.register
def _(e: ContainerStopRequested, s: ContainerState) -> ContainerState:
    return _r(s, status="stopping", pending="stop")


@_apply.register
def _(e: ContainerRestartRequested, s: ContainerState) -> ContainerState:
    return _r(s, pending="restart")


@_apply.register
def _(e: ContainerKillRequested, s: ContainerState) -> ContainerState:
    return _r(s, killing=True)


@_apply.register
def _(e: ContainerExited, s: ContainerState) -> ContainerState:
    # a restart keeps its pending mark until ContainerStarted (or a failure) ends it
    pending = "restart" if s.pending == "restart" else None
    return _r(s, status="exited", pending=pending, exit_code=e.exit_code,
              finished_at=e.finished_at, execs_running=0, killing=False)


@_apply.register
def _(e: ContainerOperationFailed, s: ContainerState) -> ContainerState:
    return _r(s, status=e.status, pending=None, error=e.reason, killing=False)


@_apply.register
def _(e: ContainerRemoveRequested, s: ContainerState) -> ContainerState:
    return _r(s, pending="remove")


@_apply.register
def _(e: ContainerRemoved, s: ContainerState) -> ContainerState:
    return _r(s, status="removed", pending=None, execs_running=0)


@_apply.register
def _(e: ContainerLost, s: ContainerState) -> ContainerState:
    return _r(s, status="lost", pending=None, error=e.reason, execs_running=0)


@_apply.register
def _(e: ExecStarted, s: ContainerState) -> ContainerState:
    return _r(s, execs_running=s.execs_running + 1)


@_apply.register
def _(e: ExecFinished, s: ContainerState) -> ContainerState:
    return _r(s, execs_running=max(0, s.execs_running - 1))


@_apply.register
def _(e: ExecFailed, s: ContainerState) -> ContainerState:
    return _r(s, execs_running=max(0, s.execs_running - 1))


# ---------------------------------------------------------------------------- decide


def _busy(state: ContainerState, what: str) -> Conflict:
    return Conflict(
        f"container {state.name} is busy with '{state.pending}'; retry {what} when it is done",
        id=state.id, status=state.status, pending=state.pending,
    )


def _gone(state: ContainerState) -> Conflict:
    return Conflict(f"container {state.name} is {state.status}", id=state.id, status=state.status)


def decide(state: ContainerState | None, command: Command, *, now: str = "", new_id: str = "",
           owner: str = "admin", runtime: str = "", name: str = "") -> list[Event]:
    """The events that ``command`` causes in ``state``, or a ``BerthdError`` refusal.

    ``now``, ``new_id``, ``owner``, ``runtime`` and ``name`` come from the caller so that
    this stays pure: the clock, the id generator and the runtime choice live outside.
    """
    if isinstance(command, CreateContainer):
        if state is not None:
            raise Conflict(f"container {new_id} already exists", id=new_id)
        command.limits.check()
        return [ContainerCreateRequested(
            id=new_id, name=name or command.name or f"berth-{new_id}", image=command.image,
            runtime=runtime, command=list(command.command), env=dict(command.env),
            workdir=command.workdir, mounts=list(command.mounts), ports=list(command.ports),
            limits=command.limits, profile=command.profile, labels=dict(command.labels),
            owner=owner, start=command.start, created_at=now,
        )]
    if state is None:
        raise ValidationError("no such container")  # callers resolve ids before deciding
    if state.status in FINAL:
        raise _gone(state)
    if isinstance(command, KillContainer):
        if state.status not in ("running", "stopping") and state.pending not in ("restart", "start"):
            raise Conflict(f"container {state.name} is not running", id=state.id, status=state.status)
        return [ContainerKillRequested(signal=_signame(command.signal))]
    if isinstance(command, ExecInContainer):
        if state.status != "running" or state.pending in ("stop", "restart", "remove"):
            raise Conflict(f"container {state.name} is not running; start it first",
                           id=state.id, status=state.status)
        return [ExecStarted(exec_id=new_id, command=list(command.command))]
    if isinstance(command, WriteFile):
        if state.pending == "remove" or state.status == "creating":
            raise _busy(state, "the upload")
        return [FileWritten(path=command.path, size=command.size)]
    if state.pending is not None:
        raise _busy(state, type(command).__name__.replace("Container", "").lower())
    if isinstance(command, StartContainer):
        if state.status == "running":
            raise Conflict(f"container {state.name} is already running", id=state.id, status=state.status)
        return [ContainerStartRequested()]
    if isinstance(command, StopContainer):
        if state.status != "running":
            raise Conflict(f"container {state.name} is not running", id=state.id, status=state.status)
        return [ContainerStopRequested(timeout=command.timeout)]
    if isinstance(command, RestartContainer):
        if state.status not in ("running", "exited", "created"):
            raise _gone(state)
        return [ContainerRestartRequested(timeout=command.timeout)]
    if isinstance(command, RemoveContainer):
        if state.status in ("running", "stopping") and not command.force:
            raise Conflict(
                f"container {state.name} is running: stop it first or remove with force=true",
                id=state.id, status=state.status,
            )
        return [ContainerRemoveRequested(force=command.force)]
    raise ValidationError(f"unknown command {type(command).__name__}")


def _signame(signal: str) -> str:
    name = signal.upper()
    return name[3:] if name.startswith("SIG") else name


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_RE, name) is not None


def observe_exit(state: ContainerState | None, exit_code: int | None,
                 finished_at: str | None) -> list[Event]:
    """The event for a main process seen ended by the runtime (watch, stop, reconcile).

    Nothing while a restart is in flight (its own outcome records the exit) or when the
    state already says the process is not running — so an exit is recorded exactly once.
    """
    if state is None or state.status not in ("running", "stopping") or state.pending == "restart":
        return []
    reason = "killed" if state.killing else "stopped" if state.pending == "stop" else "exited"
    return [ContainerExited(exit_code=exit_code, finished_at=finished_at, reason=reason)]


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """What the runtime says of a container (its inspect), in domain terms."""

    state: str  # created | running | exited
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None


def _interrupted(operation: str, status: str) -> ContainerOperationFailed:
    return ContainerOperationFailed(operation=operation, reason="interrupted by a daemon restart",
                                    code="INTERRUPTED", status=status)


def reconcile(state: ContainerState | None, seen: Observed | None, now: str) -> list[Event]:
    """Events that bring the log in line with the runtime after the daemon was down.

    ``seen`` is None when the runtime no longer has the container. An intent a crash left
    without outcome is closed by what really happened, or marked interrupted.
    """
    s = state
    if s is None or s.status in FINAL:
        return []
    if s.pending == "create":
        if seen is None:
            return [ContainerCreateFailed(reason="the daemon stopped before the container was created",
                                          code="INTERRUPTED")]
        events: list[Event] = [ContainerCreated()]
        if seen.state in ("running", "exited") and seen.started_at:
            events.append(ContainerStarted(started_at=seen.started_at))
            if seen.state == "exited":
                events.append(ContainerExited(exit_code=seen.exit_code, finished_at=seen.finished_at,
                                              reason="reconciled"))
        return events
    if seen is None:
        if s.pending == "remove":
            return [ContainerRemoved()]
        return [ContainerLost(reason="vanished from the runtime while the daemon was down")]
    if s.pending == "remove":
        return [_interrupted("remove", seen.state)]
    restarted = seen.started_at is not None and seen.started_at != s.started_at
    if seen.state == "running":
        if s.status == "running" and s.pending is None:
            return []
        if s.pending == "stop" or (s.pending == "restart" and not restarted):
            return [_interrupted(s.pending, "running")]
        events = []
        if s.status in ("running", "stopping"):
            events.append(ContainerExited(exit_code=None, finished_at=seen.started_at, reason="restart"))
        events.append(ContainerStarted(started_at=seen.started_at or now))
        return events
    # the runtime has it, not running (exited, or created and never started)
    events = []
    if s.status in ("running", "stopping"):
        reason = "killed" if s.killing else "stopped" if s.pending == "stop" else "reconciled"
        events.append(ContainerExited(exit_code=seen.exit_code, finished_at=seen.finished_at or now,
                                      reason=reason))
        if s.pending == "restart":
            events.append(_interrupted("restart", "exited"))
        return events
    if s.pending in ("start", "restart"):
        if seen.state == "exited" and restarted:
            return [ContainerStarted(started_at=seen.started_at or now),
                    ContainerExited(exit_code=seen.exit_code, finished_at=seen.finished_at or now,
                                    reason="reconciled")]
        return [_interrupted(s.pending, s.status)]
    if s.pending is not None:
        return [_interrupted(s.pending, s.status)]
    return []
