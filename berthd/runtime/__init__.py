"""Sandbox runtimes behind one interface (``base.Runtime``): Docker, local processes
(bubblewrap when present) and an in-memory fake for tests.

The concrete runtimes are imported lazily, so that ``python -m berthd.runtime._shim``
(which runs next to every local container) does not import the Docker SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from berthd.runtime.base import (
    ContainerSpec,
    ExecResult,
    ExecSpec,
    ExecStream,
    ExitNotice,
    ImageInfo,
    Limits,
    Mount,
    PortMapping,
    Runtime,
    RuntimeError_,
    RuntimeFailure,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxStatus,
)

if TYPE_CHECKING:
    from berthd.runtime.docker import DockerRuntime
    from berthd.runtime.fake import FakeRuntime
    from berthd.runtime.local import LocalRuntime

__all__ = [
    "ContainerSpec",
    "DockerRuntime",
    "ExecResult",
    "ExecSpec",
    "ExecStream",
    "ExitNotice",
    "FakeRuntime",
    "ImageInfo",
    "Limits",
    "LocalRuntime",
    "Mount",
    "PortMapping",
    "Runtime",
    "RuntimeError_",
    "RuntimeFailure",
    "RuntimeUnavailable",
    "SandboxNotFound",
    "SandboxStatus",
]

_LAZY = {
    "DockerRuntime": "berthd.runtime.docker",
    "FakeRuntime": "berthd.runtime.fake",
    "LocalRuntime": "berthd.runtime.local",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'berthd.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
