"""Response shapes of API.md as msgspec Structs: what resources send, and what the
OpenAPI document is generated from."""

from __future__ import annotations

from typing import Any

import msgspec

from berthd.domain import container as c
from berthd.domain import kernel as k

__all__ = [
    "ContainerList",
    "ContainerView",
    "ErrorBody",
    "EventList",
    "EventView",
    "ExecView",
    "ImageList",
    "ImageView",
    "KernelList",
    "KernelView",
    "RemovedView",
    "ResultView",
    "container_view",
    "kernel_view",
]


class ContainerView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    image: str
    command: list[str]
    status: str
    runtime: str
    created_at: str
    env: dict[str, str]
    mounts: list[c.Mount]
    ports: list[c.PortMapping]
    limits: c.Limits
    profile: str
    labels: dict[str, str]
    owner: str
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    version: int = 0


def container_view(s: c.ContainerState) -> ContainerView:
    return ContainerView(
        id=s.id, name=s.name, image=s.image, command=s.command, status=s.status, runtime=s.runtime,
        created_at=s.created_at, env=s.env, mounts=s.mounts, ports=s.ports, limits=s.limits,
        profile=s.profile, labels=s.labels, owner=s.owner, started_at=s.started_at,
        finished_at=s.finished_at, exit_code=s.exit_code, error=s.error, version=s.version,
    )


class ContainerList(msgspec.Struct):
    items: list[ContainerView]
    total: int
    limit: int
    offset: int


class RemovedView(msgspec.Struct):
    id: str
    status: str


class ExecView(msgspec.Struct, kw_only=True):
    exec_id: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool


class ImageView(msgspec.Struct, kw_only=True):
    id: str
    tags: list[str]
    size: int
    created: str
    runtime: str


class ImageList(msgspec.Struct):
    items: list[ImageView]
    total: int
    limit: int
    offset: int


class EntityRef(msgspec.Struct):
    kind: str
    id: str


class EventView(msgspec.Struct, kw_only=True, omit_defaults=True):
    position: int
    type: str
    entity: EntityRef
    version: int
    timestamp: str
    principal: str | None = None
    correlation_id: str | None = None
    data: dict[str, Any] = {}


class EventList(msgspec.Struct):
    items: list[EventView]
    last_position: int


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    details: dict[str, Any]


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class KernelView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    language: str
    status: str
    container_id: str
    execution_count: int
    created_at: str
    last_activity: str
    runtime: str = ""
    error: str | None = None


def kernel_view(s: k.KernelState) -> KernelView:
    return KernelView(
        id=s.id, name=s.name, language=s.language, status=s.status, container_id=s.container_id,
        execution_count=s.execution_count, created_at=s.created_at, last_activity=s.last_activity,
        runtime=s.runtime, error=s.error,
    )


class KernelList(msgspec.Struct):
    items: list[KernelView]
    total: int
    limit: int
    offset: int


class ResultView(msgspec.Struct, kw_only=True):
    """An execution's result (API.md's fields, plus ``result_id``, ``kernel_id`` and, for
    bash, ``exit_code``). ``status`` is ``running`` while it runs."""

    status: str
    stdout: str
    stderr: str
    return_value: str | None
    execution_count: int
    duration_ms: float
    truncated: bool
    error: k.ExecutionError | None
    result_id: str
    kernel_id: str = ""
    exit_code: int | None = None
