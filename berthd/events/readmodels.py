"""The read models the HTTP API answers from: containers, images, audit, kernels, sessions,
results.

Each is a ``Projection`` fed in log order by the ``ProjectionRunner``. They reuse the
domain's ``evolve`` so that the read side can never disagree with the write side about
what an event means. Readers on other threads get immutable values (Structs, tuples).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from berthd.domain import container as c
from berthd.domain import image as im
from berthd.domain import kernel as k
from berthd.domain import node as n
from berthd.domain import session as se
from berthd.events.projection import Projection
from berthd.events.store import Recorded

__all__ = [
    "AuditEntry",
    "AuditView",
    "ContainersView",
    "ImagesView",
    "KernelsView",
    "KeyRecord",
    "KeysView",
    "PulledImage",
    "ResultsView",
    "SessionsView",
    "StoredResult",
]


class ContainersView(Projection):
    """Every container's current state by id, and live names -> ids."""

    name = "containers"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_id: dict[str, c.ContainerState] = {}
            self.by_name: dict[str, str] = {}

    def apply(self, rec: Recorded) -> None:
        if rec.kind != "container":
            return
        with self._lock:
            before = self.by_id.get(rec.stream_id)
            after = c.evolve(before, rec.event)
            if after is None:
                return
            self.by_id[rec.stream_id] = after
            if after.status in c.FINAL:
                if self.by_name.get(after.name) == after.id:
                    del self.by_name[after.name]
            else:
                self.by_name[after.name] = after.id

    def get(self, id_or_name: str) -> c.ContainerState | None:
        state = self.by_id.get(id_or_name)
        if state is not None:
            return state
        berth_id = self.by_name.get(id_or_name)
        return self.by_id.get(berth_id) if berth_id else None

    def name_taken(self, name: str) -> bool:
        return name in self.by_name

    def all(self) -> list[c.ContainerState]:
        with self._lock:
            return list(self.by_id.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(s.status for s in self.by_id.values()))


@dataclass(frozen=True, slots=True)
class PulledImage:
    ref: str
    status: str  # pulling | pulled | failed | removed
    image_id: str | None
    runtime: str
    at: str
    by: str | None
    reason: str | None = None


class ImagesView(Projection):
    """What was pulled or removed through berthd, by reference."""

    name = "images"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_ref: dict[str, PulledImage] = {}

    def apply(self, rec: Recorded) -> None:
        if rec.kind != "image":
            return
        e = rec.event
        at, by = rec.meta.timestamp, rec.meta.principal
        if isinstance(e, im.ImagePullRequested):
            self.by_ref[e.ref] = PulledImage(e.ref, "pulling", None, e.runtime, at, by)
        elif isinstance(e, im.ImagePulled):
            self.by_ref[e.ref] = PulledImage(e.ref, "pulled", e.image_id, e.runtime, at, by)
        elif isinstance(e, im.ImagePullFailed):
            prev = self.by_ref.get(e.ref)
            self.by_ref[e.ref] = PulledImage(
                e.ref, "failed", None, prev.runtime if prev else "docker", at, by, e.reason
            )
        elif isinstance(e, im.ImageRemoved):
            self.by_ref[e.ref] = PulledImage(e.ref, "removed", None, e.runtime, at, by)

    def get(self, ref: str) -> PulledImage | None:
        return self.by_ref.get(ref)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    position: int
    timestamp: str
    kind: str
    entity: str
    type: str
    principal: str | None
    correlation_id: str | None
    request_id: str | None


class AuditView(Projection):
    """Who did what, when: one entry per event, indexed by entity and by principal."""

    name = "audit"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.entries: list[AuditEntry] = []
            self.by_entity: dict[str, list[int]] = {}

    def apply(self, rec: Recorded) -> None:
        m = rec.meta
        entry = AuditEntry(
            rec.position,
            m.timestamp,
            rec.kind,
            rec.stream_id,
            rec.type,
            m.principal,
            m.correlation_id,
            m.request_id,
        )
        with self._lock:
            self.by_entity.setdefault(rec.stream_id, []).append(len(self.entries))
            self.entries.append(entry)

    def query(
        self,
        entity: str | None = None,
        since: str | None = None,
        principal: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> tuple[list[AuditEntry], int]:
        with self._lock:
            if entity is not None:
                rows = [self.entries[i] for i in self.by_entity.get(entity, [])]
            else:
                rows = list(self.entries)
        if since is not None:
            rows = [r for r in rows if r.timestamp >= since]
        if principal is not None:
            rows = [r for r in rows if r.principal == principal]
        return rows[offset : offset + limit], len(rows)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    name: str
    role: str
    key_hash: str
    rate_limit: int | None
    created_at: str
    revoked: bool = False


class KeysView(Projection):
    """API keys by id and by hash (the secret itself is never in the log)."""

    name = "keys"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_id: dict[str, KeyRecord] = {}
        self.by_hash: dict[str, KeyRecord] = {}

    def apply(self, rec: Recorded) -> None:
        e = rec.event
        if isinstance(e, n.ApiKeyCreated):
            key = KeyRecord(e.key_id, e.name, e.role, e.key_hash, e.rate_limit, e.created_at)
            self.by_id[e.key_id] = key
            self.by_hash[e.key_hash] = key
        elif isinstance(e, n.ApiKeyRevoked):
            old = self.by_id.get(e.key_id)
            if old is not None:
                self.by_id[e.key_id] = KeyRecord(
                    old.key_id,
                    old.name,
                    old.role,
                    old.key_hash,
                    old.rate_limit,
                    old.created_at,
                    revoked=True,
                )
                self.by_hash.pop(old.key_hash, None)


class KernelsView(Projection):
    """Every kernel's current state by id, live names -> ids, and container -> kernel."""

    name = "kernels"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_id: dict[str, k.KernelState] = {}
            self.by_name: dict[str, str] = {}
            self.by_container: dict[str, str] = {}

    def apply(self, rec: Recorded) -> None:
        if rec.kind != "kernel":
            return
        with self._lock:
            after = k.evolve(self.by_id.get(rec.stream_id), rec.event)
            if after is None:
                return
            self.by_id[rec.stream_id] = after
            if after.status in k.FINAL:
                if self.by_name.get(after.name) == after.id:
                    del self.by_name[after.name]
                if self.by_container.get(after.container_id) == after.id:
                    del self.by_container[after.container_id]
            else:
                self.by_name[after.name] = after.id
                self.by_container[after.container_id] = after.id

    def get(self, id_or_name: str) -> k.KernelState | None:
        state = self.by_id.get(id_or_name)
        if state is not None:
            return state
        kernel_id = self.by_name.get(id_or_name)
        return self.by_id.get(kernel_id) if kernel_id else None

    def name_taken(self, name: str) -> bool:
        return name in self.by_name

    def kernel_of(self, container_id: str) -> str | None:
        return self.by_container.get(container_id)

    def all(self) -> list[k.KernelState]:
        with self._lock:
            return list(self.by_id.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(s.status for s in self.by_id.values()))


class SessionsView(Projection):
    """Every session's current state by id, and live (active) names -> ids."""

    name = "sessions"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_id: dict[str, se.SessionState] = {}
            self.by_name: dict[str, str] = {}

    def apply(self, rec: Recorded) -> None:
        if rec.kind != "session":
            return
        with self._lock:
            after = se.evolve(self.by_id.get(rec.stream_id), rec.event)
            if after is None:
                return
            self.by_id[rec.stream_id] = after
            if after.status in se.FINAL:
                if self.by_name.get(after.name) == after.id:
                    del self.by_name[after.name]
            else:
                self.by_name[after.name] = after.id

    def get(self, id_or_name: str) -> se.SessionState | None:
        state = self.by_id.get(id_or_name)
        if state is not None:
            return state
        session_id = self.by_name.get(id_or_name)
        return self.by_id.get(session_id) if session_id else None

    def name_taken(self, name: str) -> bool:
        return name in self.by_name

    def all(self) -> list[se.SessionState]:
        with self._lock:
            return list(self.by_id.values())

    def active(self) -> list[se.SessionState]:
        with self._lock:
            return [s for s in self.by_id.values() if s.status == "active"]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(s.status for s in self.by_id.values()))


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One execution as the log has it: ``finished`` is None while it runs."""

    result_id: str
    kernel_id: str
    owner: str
    started_at: str
    finished: k.ExecutionFinished | None = None


class ResultsView(Projection):
    """Executions by result id, from ``ExecutionStarted`` and ``ExecutionFinished``
    (their output is the log's, capped), and a session's commands from ``CommandExecuted``
    (``mode == "command"``: shown as a kernel result of its session's kernel)."""

    name = "results"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_id: dict[str, StoredResult] = {}
            self._owners: dict[str, str] = {}  # kernel or session id -> owner
            self._kernel_of: dict[str, str] = {}  # session id -> its kernel id

    def apply(self, rec: Recorded) -> None:
        e = rec.event
        with self._lock:
            if isinstance(e, k.KernelCreateRequested):
                self._owners[rec.stream_id] = e.owner
            elif isinstance(e, k.ExecutionStarted):
                self.by_id[e.result_id] = StoredResult(
                    e.result_id, rec.stream_id, self._owners.get(rec.stream_id, "admin"), e.started_at)
            elif isinstance(e, k.ExecutionFinished):
                before = self.by_id.get(e.result_id)
                self.by_id[e.result_id] = StoredResult(
                    e.result_id, rec.stream_id, self._owners.get(rec.stream_id, "admin"),
                    before.started_at if before else "", e)
            elif isinstance(e, se.SessionOpened):
                self._owners[rec.stream_id] = e.owner
            elif isinstance(e, se.SessionKernelAttached):
                self._kernel_of[rec.stream_id] = e.kernel_id
            elif isinstance(e, se.CommandExecuted) and e.mode == "command":
                self.by_id[e.result_id] = StoredResult(
                    e.result_id, self._kernel_of.get(rec.stream_id, ""),
                    self._owners.get(rec.stream_id, "admin"), e.executed_at,
                    k.ExecutionFinished(
                        result_id=e.result_id, status=e.status, execution_count=e.execution_count,
                        duration_ms=e.duration_ms, stdout=e.stdout, stderr=e.stderr,
                        truncated=e.truncated, exit_code=e.exit_code, finished_at=e.executed_at))

    def get(self, result_id: str) -> StoredResult | None:
        return self.by_id.get(result_id)
