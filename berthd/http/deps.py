"""Everything the HTTP and WebSocket layers need, passed in: no module globals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from berthd.actors import Clock, ImageService, Supervisor
from berthd.actors.kernel import KernelSupervisor
from berthd.actors.pool import WarmPool
from berthd.actors.session import SessionSupervisor
from berthd.events.projection import ProjectionRunner
from berthd.events.readmodels import (
    AuditView,
    ContainersView,
    ImagesView,
    KernelsView,
    KeysView,
    ResultsView,
    SessionsView,
)
from berthd.events.store import EventStore
from berthd.http.auth import Authenticator
from berthd.http.idempotency import IdempotencyStore
from berthd.http.keypolicy import KeyDefaults
from berthd.http.ratelimit import RateLimiter
from berthd.runtime.base import Runtime

__all__ = ["Deps", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request may cost the daemon."""

    max_body_bytes: int = 16 << 20  # JSON bodies and file uploads
    output_cap_bytes: int = 1 << 20  # per stream, per exec
    read_your_writes_timeout: float = 5.0  # seconds to wait for the projections
    command_timeout: float = 600.0  # seconds a lifecycle request may wait for its outcome
    ws_max_message_bytes: int = 1 << 20
    ws_queue_events: int = 1000  # per event subscriber before it is cut off (1013)


@dataclass(slots=True)
class Deps:
    store: EventStore
    runner: ProjectionRunner
    containers: ContainersView
    images_view: ImagesView
    audit: AuditView
    supervisor: Supervisor
    images: ImageService
    runtimes: dict[str, Runtime]
    default_runtime: str
    auth: Authenticator
    clock: Clock
    node_id: str
    version: str
    limits: Limits = field(default_factory=Limits)
    ready_checks: dict[str, Callable[[], str]] = field(default_factory=dict)
    info_extra: Callable[[], dict[str, Any]] | None = None
    pool: WarmPool | None = None  # None: /v1/run is not served
    kernels: KernelSupervisor | None = None  # None: kernels are not served (503)
    kernels_view: KernelsView = field(default_factory=KernelsView)
    results: ResultsView = field(default_factory=ResultsView)
    sessions: SessionSupervisor | None = None  # None: sessions are not served (503)
    sessions_view: SessionsView = field(default_factory=SessionsView)
    keys: KeysView = field(default_factory=KeysView)  # the same view the Authenticator checks
    key_defaults: KeyDefaults = field(default_factory=KeyDefaults)
    rate_limiter: RateLimiter | None = None  # None: create_app makes one on the system clock
    idempotency: IdempotencyStore | None = None  # None: Idempotency-Key is not honoured
