"""Kernels: persistent interpreters in a sandbox, and their executions.

A kernel's stream records its life (``KernelCreateRequested`` → ``KernelStarted`` or
``KernelStartFailed``; ``KernelRestarted``, ``KernelDied``, ``KernelDestroyed``) and every
execution as intent and outcome (``ExecutionStarted`` → ``ExecutionFinished``). The
outcome carries the result, output capped, so ``GET /v1/results/{id}`` is a projection of
the log and survives the daemon like everything else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec

from berthd.domain.base import Command, Event
from berthd.domain.container import NAME_RE
from berthd.domain.errors import Conflict, DeadKernel, RateLimited, ValidationError
from berthd.domain.image import ImageRef

__all__ = [
    "KERNEL_EVENTS",
    "CreateKernel",
    "DestroyKernel",
    "ExecuteCode",
    "ExecutionError",
    "ExecutionFinished",
    "ExecutionStarted",
    "InterruptKernel",
    "KernelCreateRequested",
    "KernelDestroyRequested",
    "KernelDestroyed",
    "KernelDied",
    "KernelInterrupted",
    "KernelRestartRequested",
    "KernelRestarted",
    "KernelStartFailed",
    "KernelStarted",
    "KernelState",
    "QueueFull",
    "RestartKernel",
    "decide",
    "evolve",
    "replay",
]

Language = Literal["python", "bash"]
Code = Annotated[str, msgspec.Meta(max_length=1 << 20)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=86400)]



class QueueFull(RateLimited):
    """Too many executions wait for a kernel (or a session) already: 429, retry later."""

    code = "QUEUE_FULL"


# ---------------------------------------------------------------------------- commands


class CreateKernel(Command):
    name: Annotated[str, msgspec.Meta(pattern=NAME_RE, max_length=63)] | None = None
    language: Language = "python"
    container: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    image: ImageRef | None = None
    profile: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] = "default"
    runtime: Literal["docker", "local"] | None = None


class ExecuteCode(Command):
    code: Code
    timeout: Timeout | None = None


class RestartKernel(Command):
    pass


class InterruptKernel(Command):
    pass


class DestroyKernel(Command):
    pass


# ---------------------------------------------------------------------------- events


class KernelEvent(Event, frozen=True, kw_only=True):
    kind = "kernel"


class KernelCreateRequested(KernelEvent, frozen=True, kw_only=True):
    id: str
    name: str
    language: str
    container_id: str  # the sandbox the kernel lives in
    own_container: bool = True  # created for the kernel (and removed with it)
    image: str | None = None
    profile: str = "default"
    owner: str = "admin"
    created_at: str = ""
    runtime: str = ""  # the runtime of the sandbox ("" in logs written before it was recorded)


class KernelStarted(KernelEvent, frozen=True, kw_only=True):
    started_at: str
    agent_pid: int | None = None


class KernelStartFailed(KernelEvent, frozen=True, kw_only=True):
    reason: str
    code: str = "RUNTIME_FAILED"


class ExecutionError(msgspec.Struct, frozen=True, kw_only=True):
    ename: str
    evalue: str
    traceback: str | list[str] = ""


class ExecutionStarted(KernelEvent, frozen=True, kw_only=True):
    result_id: str
    code: str  # capped by the caller: the log records what ran, not megabytes of it
    timeout: float | None = None
    started_at: str = ""


class ExecutionFinished(KernelEvent, frozen=True, kw_only=True):
    result_id: str
    status: str  # ok | error | timeout | dead
    execution_count: int = 0
    duration_ms: float = 0.0
    stdout: str = ""  # capped
    stderr: str = ""  # capped
    return_value: str | None = None
    error: ExecutionError | None = None
    truncated: bool = False
    exit_code: int | None = None
    finished_at: str = ""


class KernelInterrupted(KernelEvent, frozen=True, kw_only=True):
    result_id: str | None = None


class KernelRestartRequested(KernelEvent, frozen=True, kw_only=True):
    pass


class KernelRestarted(KernelEvent, frozen=True, kw_only=True):
    pass


class KernelDied(KernelEvent, frozen=True, kw_only=True):
    reason: str


class KernelDestroyRequested(KernelEvent, frozen=True, kw_only=True):
    pass


class KernelDestroyed(KernelEvent, frozen=True, kw_only=True):
    pass


KERNEL_EVENTS: tuple[type[Event], ...] = (
    KernelCreateRequested, KernelStarted, KernelStartFailed, ExecutionStarted, ExecutionFinished,
    KernelInterrupted, KernelRestartRequested, KernelRestarted, KernelDied, KernelDestroyRequested,
    KernelDestroyed,
)

# ---------------------------------------------------------------------------- state

FINAL = frozenset({"destroyed"})


class KernelState(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    language: str
    container_id: str
    own_container: bool = True
    image: str | None = None
    profile: str = "default"
    owner: str = "admin"
    status: str = "starting"  # starting | idle | busy | dead | restarting | destroyed
    execution_count: int = 0
    current: str | None = None  # result id of the running execution
    created_at: str = ""
    last_activity: str = ""
    error: str | None = None
    version: int = 0
    runtime: str = ""
    destroying: bool = False  # a destroy is in flight: its container's exit is not a death


@functools.singledispatch
def _apply(event: Event, s: KernelState) -> KernelState:
    return s


def evolve(state: KernelState | None, event: Event) -> KernelState | None:
    if isinstance(event, KernelCreateRequested):
        return KernelState(
            id=event.id, name=event.name, language=event.language, container_id=event.container_id,
            own_container=event.own_container, image=event.image, profile=event.profile,
            owner=event.owner, created_at=event.created_at, last_activity=event.created_at, version=1,
            runtime=event.runtime,
        )
    if state is None:
        return None
    return msgspec.structs.replace(_apply(event, state), version=state.version + 1)


def replay(events: Iterable[Event]) -> KernelState | None:
    return functools.reduce(evolve, events, None)


def _r(s: KernelState, **changes: Any) -> KernelState:
    return msgspec.structs.replace(s, **changes)


@_apply.register
def _(e: KernelStarted, s: KernelState) -> KernelState:
    return _r(s, status="idle", error=None, last_activity=e.started_at)


@_apply.register
def _(e: KernelStartFailed, s: KernelState) -> KernelState:
    return _r(s, status="dead", error=e.reason)


@_apply.register
def _(e: ExecutionStarted, s: KernelState) -> KernelState:
    return _r(s, status="busy", current=e.result_id, last_activity=e.started_at or s.last_activity)


@_apply.register
def _(e: ExecutionFinished, s: KernelState) -> KernelState:
    status = s.status if s.status in FINAL else "dead" if e.status == "dead" \
        else "idle" if s.status == "busy" else s.status
    return _r(s, status=status, current=None, execution_count=max(s.execution_count, e.execution_count),
              last_activity=e.finished_at or s.last_activity)


@_apply.register
def _(e: KernelRestartRequested, s: KernelState) -> KernelState:
    return _r(s, status="restarting")


@_apply.register
def _(e: KernelRestarted, s: KernelState) -> KernelState:
    return _r(s, status="idle", execution_count=0, current=None, error=None)


@_apply.register
def _(e: KernelDied, s: KernelState) -> KernelState:
    return _r(s, status="dead", current=None, error=e.reason)


@_apply.register
def _(e: KernelDestroyRequested, s: KernelState) -> KernelState:
    return _r(s, destroying=True)


@_apply.register
def _(e: KernelDestroyed, s: KernelState) -> KernelState:
    return _r(s, status="destroyed", current=None)


# ---------------------------------------------------------------------------- decide


def decide(state: KernelState | None, command: Command, *, now: str = "", new_id: str = "",
           owner: str = "admin", name: str = "", container_id: str = "", own_container: bool = True,
           code_cap: int = 65536, runtime: str = "", image: str | None = None) -> list[Event]:
    """The events ``command`` causes, or a refusal. Ids, time and the sandbox come from
    the caller so this stays pure."""
    if isinstance(command, CreateKernel):
        if state is not None:
            raise Conflict(f"kernel {new_id} already exists", id=new_id)
        return [KernelCreateRequested(
            id=new_id, name=name or command.name or f"kernel-{new_id}", language=command.language,
            container_id=container_id, own_container=own_container, image=image or command.image,
            profile=command.profile, owner=owner, created_at=now, runtime=runtime,
        )]
    if state is None:
        raise ValidationError("no such kernel")
    if state.status in FINAL:
        raise Conflict(f"kernel {state.name} is destroyed", id=state.id, status=state.status)
    if state.destroying and not isinstance(command, DestroyKernel):
        raise Conflict(f"kernel {state.name} is being destroyed", id=state.id, status=state.status)
    if isinstance(command, ExecuteCode):
        if state.status == "dead":
            raise DeadKernel(f"kernel {state.name} is dead ({state.error}); restart it "
                             f"(POST /v1/kernels/{state.id}/restart)", id=state.id, status=state.status)
        if state.status != "idle":
            raise Conflict(f"kernel {state.name} is {state.status}; retry when it is idle",
                           id=state.id, status=state.status)
        return [ExecutionStarted(result_id=new_id, code=command.code[:code_cap], timeout=command.timeout,
                                 started_at=now)]
    if isinstance(command, InterruptKernel):
        return [KernelInterrupted(result_id=state.current)]
    if isinstance(command, RestartKernel):
        if state.status in ("starting", "restarting"):
            raise Conflict(f"kernel {state.name} is {state.status}", id=state.id, status=state.status)
        return [KernelRestartRequested()]
    if isinstance(command, DestroyKernel):
        return [KernelDestroyRequested()]
    raise ValidationError(f"unknown command {type(command).__name__}")
