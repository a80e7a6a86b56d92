"""The read models the HTTP API answers from: containers, images, audit, kernels, sessions,
results.

Each is a ``Projection`` fed in log order by the ``ProjectionRunner``. They reuse the
domain's ``evolve`` so that the read side can never disagree with the write side about
what an event means. Readers on other threads get immutable values (Structs, tuples).
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import msgspec

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
    checkpoint_fields: ClassVar[dict[str, Any]] = {"by_id": dict[str, c.ContainerState], "by_name": dict[str, str]}

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
            if before is None:
                after = _compact(after)
            self.by_id[after.id] = after
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

    def restore_state(self, state: dict[str, Any]) -> None:
        by_id = {i: _compact(s) for i, s in state["by_id"].items()}
        super().restore_state({"by_id": by_id, "by_name": {s.name: s.id for s in by_id.values()
                                                           if state["by_name"].get(s.name) == s.id}})

    def name_taken(self, name: str) -> bool:
        return name in self.by_name

    def all(self) -> list[c.ContainerState]:
        with self._lock:
            return list(self.by_id.values())

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(s.status for s in self.by_id.values()))


_NO_LIMITS = c.Limits()
_EMPTY_LIST: list[Any] = []  # shared by every state without one: never mutated (states are values)
_EMPTY_DICT: dict[str, Any] = {}


def _compact(s: c.ContainerState) -> c.ContainerState:
    """The state with values most containers repeat shared rather than copied once per
    container (a passivated container costs only its read-model entries: issue 5 §7)."""
    i = sys.intern
    changes: dict[str, Any] = {"image": i(s.image), "runtime": i(s.runtime), "owner": i(s.owner),
                               "profile": i(s.profile), "status": i(s.status)}
    for f, empty in (("command", _EMPTY_LIST), ("env", _EMPTY_DICT), ("mounts", _EMPTY_LIST),
                     ("ports", _EMPTY_LIST), ("labels", _EMPTY_DICT)):
        if not getattr(s, f):
            changes[f] = empty
    if s.limits == _NO_LIMITS:
        changes["limits"] = _NO_LIMITS
    return msgspec.structs.replace(s, **changes)


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
    checkpoint_fields: ClassVar[dict[str, Any]] = {"by_ref": dict[str, PulledImage]}

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
    """Who did what, when: one entry per event, indexed by entity and by principal.

    Held as columns (one log can hold millions of events): positions and interned
    string ids in ``array``s, timestamps and request ids in lists; ``AuditEntry`` values
    are made only for the rows a query returns. That is ~120 bytes an event instead of
    ~430 as objects, and a checkpoint that loads mostly as raw array bytes.
    """

    name = "audit"
    checkpoint_fields: ClassVar[dict[str, Any]] = {
        "positions": bytes,
        "timestamps": list[str],
        "strings": list[str],
        "kinds": bytes,
        "entities": bytes,
        "types": bytes,
        "principals": bytes,
        "correlation_ids": list[str | None],
        "request_ids": list[str | None],
        "by_entity": dict[int, bytes],
    }
    checkpoint_derived = frozenset({"_ids", "_by_entity"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._set_columns(array("q"), [], [], array("i"), array("i"), array("i"), array("i"), [], [], {})

    def _set_columns(self, positions: array[int], timestamps: list[str], strings: list[str],
                     kinds: array[int], entities: array[int], types: array[int], principals: array[int],
                     correlation_ids: list[str | None], request_ids: list[str | None],
                     by_entity: dict[int, array[int]]) -> None:
        self.positions, self.timestamps, self.strings = positions, timestamps, strings
        self.kinds, self.entities, self.types, self.principals = kinds, entities, types, principals
        self.correlation_ids, self.request_ids = correlation_ids, request_ids
        self._ids = {v: i for i, v in enumerate(strings)}
        self._by_entity = by_entity  # entity's string id -> its rows

    def _id(self, value: str) -> int:
        i = self._ids.get(value)
        if i is None:
            i = self._ids[value] = len(self.strings)
            self.strings.append(value)
        return i

    def apply(self, rec: Recorded) -> None:
        m = rec.meta
        with self._lock:
            row = len(self.positions)
            entity = self._id(rec.stream_id)
            self.positions.append(rec.position)
            # the events of one append share their metadata: share its strings too
            ts, corr, req = m.timestamp, m.correlation_id, m.request_id
            if row:
                if ts == self.timestamps[-1]:
                    ts = self.timestamps[-1]
                if corr is not None and corr == self.correlation_ids[-1]:
                    corr = self.correlation_ids[-1]
                if req is not None and req == self.request_ids[-1]:
                    req = self.request_ids[-1]
            self.timestamps.append(ts)
            self.kinds.append(self._id(rec.kind))
            self.entities.append(entity)
            self.types.append(self._id(rec.type))
            self.principals.append(-1 if m.principal is None else self._id(m.principal))
            self.correlation_ids.append(corr)
            self.request_ids.append(req)
            rows = self._by_entity.get(entity)
            if rows is None:
                rows = self._by_entity[entity] = array("i")
            rows.append(row)

    @property
    def by_entity(self) -> dict[str, int]:
        """Each entity's number of entries."""
        with self._lock:
            return {self.strings[e]: len(rows) for e, rows in self._by_entity.items()}

    @property
    def entries(self) -> list[AuditEntry]:
        """Every entry, in log order (made on demand: prefer ``query``)."""
        with self._lock:
            return [self._entry(i) for i in range(len(self.positions))]

    def _entry(self, i: int) -> AuditEntry:
        s, principal = self.strings, self.principals[i]
        return AuditEntry(self.positions[i], self.timestamps[i], s[self.kinds[i]], s[self.entities[i]],
                          s[self.types[i]], None if principal < 0 else s[principal],
                          self.correlation_ids[i], self.request_ids[i])

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "positions": self.positions.tobytes(), "timestamps": self.timestamps, "strings": self.strings,
            "kinds": self.kinds.tobytes(), "entities": self.entities.tobytes(),
            "types": self.types.tobytes(), "principals": self.principals.tobytes(),
            "correlation_ids": self.correlation_ids, "request_ids": self.request_ids,
            "by_entity": {e: rows.tobytes() for e, rows in self._by_entity.items()},
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        def ints(code: str, raw: bytes) -> array[int]:
            out = array(code)
            out.frombytes(raw)
            return out

        columns = (ints("q", state["positions"]), state["timestamps"], state["strings"],
                   ints("i", state["kinds"]), ints("i", state["entities"]), ints("i", state["types"]),
                   ints("i", state["principals"]), state["correlation_ids"], state["request_ids"])
        by_entity = {e: ints("i", raw) for e, raw in state["by_entity"].items()}
        rows = len(columns[0])
        if not all(len(col) == rows for i, col in enumerate(columns) if i != 2):
            raise ValueError("audit checkpoint columns differ in length")
        if any(len(columns[2]) <= max(col, default=-1) for col in columns[3:7]):
            raise ValueError("audit checkpoint refers to strings it does not hold")
        if sum(len(r) for r in by_entity.values()) != rows or any(
                e >= len(columns[2]) for e in by_entity):
            raise ValueError("audit checkpoint's entity index does not match its rows")
        with self._lock:
            self._set_columns(*columns, by_entity)

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
                e = self._ids.get(entity)
                rows: Sequence[int] = self._by_entity.get(e, ()) if e is not None else ()
            else:
                rows = range(len(self.positions))
            if since is not None:
                ts = self.timestamps
                rows = [i for i in rows if ts[i] >= since]
            if principal is not None:
                pid = self._ids.get(principal, -2)
                ps = self.principals
                rows = [i for i in rows if ps[i] == pid]
            total = len(rows)
            return [self._entry(i) for i in rows[offset : offset + limit]], total


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as the log has it; a ``None`` limit or quota takes the configured default."""

    key_id: str
    name: str
    role: str
    key_hash: str
    rate_limit: int | None
    created_at: str
    revoked: bool = False
    executions_rate_limit: int | None = None
    sessions_rate_limit: int | None = None
    max_containers: int | None = None
    max_kernels: int | None = None
    max_sessions: int | None = None
    revoked_at: str | None = None


class KeysView(Projection):
    """API keys by id and by hash (the secret itself is never in the log); a revoked key
    leaves ``by_hash`` at once, so it stops authenticating when its event is applied."""

    name = "keys"
    checkpoint_fields: ClassVar[dict[str, Any]] = {"by_id": dict[str, KeyRecord], "by_hash": dict[str, KeyRecord]}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_id: dict[str, KeyRecord] = {}
            self.by_hash: dict[str, KeyRecord] = {}

    def apply(self, rec: Recorded) -> None:
        e = rec.event
        with self._lock:
            if isinstance(e, n.ApiKeyCreated):
                key = KeyRecord(
                    e.key_id, e.name, e.role, e.key_hash, e.rate_limit, e.created_at or rec.meta.timestamp,
                    executions_rate_limit=e.executions_rate_limit, sessions_rate_limit=e.sessions_rate_limit,
                    max_containers=e.max_containers, max_kernels=e.max_kernels, max_sessions=e.max_sessions,
                )
                self.by_id[e.key_id] = key
                self.by_hash[e.key_hash] = key
            elif isinstance(e, n.ApiKeyRevoked):
                old = self.by_id.get(e.key_id)
                if old is not None:
                    self.by_id[e.key_id] = replace(old, revoked=True, revoked_at=rec.meta.timestamp)
                    self.by_hash.pop(old.key_hash, None)

    def get(self, key_id: str) -> KeyRecord | None:
        return self.by_id.get(key_id)

    def all(self) -> list[KeyRecord]:
        with self._lock:
            return list(self.by_id.values())

    def name_taken(self, name: str) -> bool:
        with self._lock:
            return any(k.name == name and not k.revoked for k in self.by_id.values())


class KernelsView(Projection):
    """Every kernel's current state by id, live names -> ids, and container -> kernel."""

    name = "kernels"
    checkpoint_fields: ClassVar[dict[str, Any]] = {
        "by_id": dict[str, k.KernelState], "by_name": dict[str, str], "by_container": dict[str, str]}

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
    checkpoint_fields: ClassVar[dict[str, Any]] = {"by_id": dict[str, se.SessionState], "by_name": dict[str, str]}

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

    def ended(self) -> list[se.SessionState]:
        """Closed or expired sessions that had a kernel (boot checks it is gone too)."""
        with self._lock:
            return [s for s in self.by_id.values() if s.status in se.FINAL and s.kernel_id is not None]

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
    checkpoint_fields: ClassVar[dict[str, Any]] = {
        "by_id": dict[str, StoredResult], "_owners": dict[str, str], "_kernel_of": dict[str, str]}

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
