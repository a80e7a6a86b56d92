"""Crash test: 8 concurrent clients create/start/exec/stop containers through the API, while
three more create/execute/destroy kernels, open/close sessions, and create/revoke API keys
(and pull the host image), as the daemon is killed with SIGKILL at random moments and
restarted, 50 rounds. Halfway, one clean stop and start saves the projections' checkpoints,
so every later boot restores them and replays only the log's tail.

Every command that got a 2xx must be in the log after the restarts, none twice, and every
read model the daemon serves (containers, kernels, sessions, keys, audit, results) must
equal a fresh replay of the log; all seven projections (images too, which the API does not
list: /v1/images answers from the runtime) restored from checkpoints plus the tail must
equal a fresh replay in full.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import requests

from berthd.daemon.config import load_config
from berthd.domain import EVENT_TYPES
from berthd.events import open_store
from berthd.events.projection import CheckpointDir, Projection, ProjectionRunner
from berthd.events.readmodels import (
    AuditView,
    ContainersView,
    ImagesView,
    KernelsView,
    KeysView,
    ResultsView,
    SessionsView,
)
from berthd.http.keypolicy import KeyDefaults
from berthd.http.resources import containers as containers_api
from berthd.http.resources import kernels as kernels_api
from berthd.http.resources import sessions as sessions_api
from berthd.http.resources.keys import key_view
from berthd.http.views import ResultView, container_view, kernel_view
from tests.daemon_process import DaemonProcess

CLIENTS = 8  # container writers; plus one kernel, one session and one key/image writer
ROUNDS = int(os.environ.get("BERTHD_CRASH_ROUNDS", "50"))  # issue 4: 50 SIGKILLs in CI
# operation -> (the event its command appends, the event that must follow it in its stream)
EVENTS: dict[str, tuple[str, str | None]] = {
    "create": ("ContainerCreateRequested", "ContainerCreated"),
    "start": ("ContainerStartRequested", "ContainerStarted"),
    "exec": ("ExecStarted", "ExecFinished"),
    "stop": ("ContainerStopRequested", "ContainerExited"),
    "kernel": ("KernelCreateRequested", "KernelStarted"),
    "execute": ("ExecutionStarted", "ExecutionFinished"),
    "destroy": ("KernelDestroyRequested", "KernelDestroyed"),
    "session": ("SessionOpened", None),
    "close": ("SessionClosed", None),
    "key": ("ApiKeyCreated", None),
    "revoke": ("ApiKeyRevoked", None),
    "pull": ("ImagePullRequested", "ImagePulled"),
}


def views() -> list[Projection]:
    """The daemon's projections, in its order (berthd/daemon/lifecycle.py)."""
    return [ContainersView(), ImagesView(), AuditView(), KeysView(), KernelsView(), ResultsView(), SessionsView()]


class Client(threading.Thread):
    def __init__(self, daemon: DaemonProcess, up: threading.Event, done: threading.Event,
                 work: str = "containers") -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.up = up
        self.done = done
        self.work = work
        self.acked: list[tuple[str, str]] = []  # (operation, correlation id)
        self.errors: list[str] = []
        self.kernel: str | None = None  # the kernel writer's current kernel
        self.executions = 0

    def call(self, op: str, method: str, path: str, body: Any = None) -> requests.Response | None:
        corr = uuid.uuid4().hex
        if not self.up.wait(timeout=60):
            return None
        proc = self.d.proc
        try:
            r = requests.request(method, self.d.url(path), json=body, timeout=30,
                                 headers={**self.d.headers, "X-Correlation-ID": corr})
        except requests.RequestException as exc:
            if proc is not None and proc.poll() is None and self.up.is_set() and proc is self.d.proc:
                self.errors.append(f"{method} {path}: {type(exc).__name__} while the daemon was up")
            return None  # the daemon died under us: not acknowledged
        # a 5xx from a daemon being stopped cleanly (the halfway restart) is not acknowledged either
        if r.status_code >= 500 and self.up.is_set() and proc is self.d.proc:
            self.errors.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
        if 200 <= r.status_code < 300:
            self.acked.append((op, corr))
        return r

    def run(self) -> None:
        step = getattr(self, f"_{self.work}")
        while not self.done.is_set():
            step()

    def _containers(self) -> None:
        r = self.call("create", "POST", "/v1/containers", {"image": "host", "command": ["sleep", "3600"],
                                                           "start": False})
        if r is None or r.status_code != 201:
            return
        cid = r.json()["id"]
        for op, body in (("start", None), ("exec", {"command": ["echo", "hi"]}), ("stop", {"timeout": 1})):
            if self.done.is_set():
                break
            self.call(op, "POST", f"/v1/containers/{cid}/{op}", body)

    def _kernels(self) -> None:
        """One kernel at a time, executed in until its 8th execution, then destroyed: its
        state moves across the SIGKILLs (its sandbox outlives them and is reconnected)."""
        if self.kernel is None:
            r = self.call("kernel", "POST", "/v1/kernels", {"language": "bash"})
            if r is not None and r.status_code == 201:
                self.kernel, self.executions = r.json()["id"], 0
        elif self.executions < 8:
            r = self.call("execute", "POST", f"/v1/kernels/{self.kernel}/execute", {"code": "echo hi", "timeout": 10})
            if r is not None:  # a kernel that cannot execute (4xx) is destroyed
                self.executions = self.executions + 1 if r.status_code == 200 else 8
        else:
            r = self.call("destroy", "DELETE", f"/v1/kernels/{self.kernel}")
            if r is not None and r.status_code < 500:
                self.kernel = None
        time.sleep(0.2)

    def _sessions(self) -> None:
        r = self.call("session", "POST", "/v1/sessions", {"metadata": {"by": "crash test"}})
        if r is None or r.status_code != 201:
            return
        time.sleep(0.1)
        if not self.done.is_set():
            self.call("close", "DELETE", f"/v1/sessions/{r.json()['id']}")
        time.sleep(0.1)

    def _keys(self) -> None:
        r = self.call("key", "POST", "/v1/keys", {"name": f"k{uuid.uuid4().hex[:12]}", "role": "user"})
        if r is not None and r.status_code == 201 and len(self.acked) % 3 and not self.done.is_set():
            self.call("revoke", "DELETE", f"/v1/keys/{r.json()['id']}")  # two keys in three
        if not self.done.is_set() and len(self.acked) % 5 == 0:
            self.call("pull", "POST", "/v1/images/pull", {"ref": "host", "runtime": "local"})
        time.sleep(0.2)


def served(d: DaemonProcess, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged list endpoint."""
    items: list[dict[str, Any]] = []
    while True:
        page = d.get(path, params={**params, "limit": 1000, "offset": len(items)})
        assert page.status_code == 200, (path, params, page.text[:300])
        body = page.json()
        items += body["items"]
        if len(items) >= body["total"] or not body["items"]:
            assert len(items) == body["total"], (path, params)
            return items


def by_status(d: DaemonProcess, path: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    return {i["id"]: i for status in statuses for i in served(d, path, status=status)}


def result_ids(d: DaemonProcess) -> list[str]:
    """The id of every execution in the log (results are served one by one)."""
    ids: list[str] = []
    after = 0
    while True:
        page = d.get("/v1/events", params={"after": after, "limit": 1000,
                                           "type": ["ExecutionStarted", "ExecutionFinished", "CommandExecuted"]})
        assert page.status_code == 200, page.text[:300]
        body = page.json()
        ids += [e["data"]["result_id"] for e in body["items"] if e["data"]["result_id"] not in ids]
        if not body["items"] or body["last_position"] <= after:
            return ids
        after = body["last_position"]


def wire(value: object) -> Any:
    """A response Struct as the client decodes it."""
    return msgspec.json.decode(msgspec.json.encode(value))


def show(d: DaemonProcess, results: list[str]) -> dict[str, Any]:
    """Every read model as the API serves it."""
    return {
        "containers": by_status(d, "/v1/containers", containers_api.STATUSES),
        "kernels": by_status(d, "/v1/kernels", kernels_api.STATUSES),
        "sessions": by_status(d, "/v1/sessions", sessions_api.STATUSES),
        "keys": {i["id"]: i for i in served(d, "/v1/keys", revoked="true")},
        "audit": served(d, "/v1/audit"),
        "results": {r: d.get(f"/v1/results/{r}").json() for r in results},
    }


def expect(vs: list[Projection], key_defaults: KeyDefaults) -> dict[str, Any]:
    """What the API should serve from these read models (its own view functions)."""
    containers, _, audit, keys, kernels, results, sessions = vs
    assert isinstance(containers, ContainersView) and isinstance(audit, AuditView)
    assert isinstance(keys, KeysView) and isinstance(kernels, KernelsView)
    assert isinstance(results, ResultsView) and isinstance(sessions, SessionsView)
    deps: Any = SimpleNamespace(key_defaults=key_defaults)

    def result(id: str) -> Any:
        stored = results.by_id[id]
        f = stored.finished
        if f is None:
            return wire(ResultView(status="running", stdout="", stderr="", return_value=None, execution_count=0,
                                   duration_ms=0.0, truncated=False, error=None, result_id=id,
                                   kernel_id=stored.kernel_id))
        return wire(ResultView(status=f.status, stdout=f.stdout, stderr=f.stderr, return_value=f.return_value,
                               execution_count=f.execution_count, duration_ms=f.duration_ms,
                               truncated=f.truncated, error=f.error, result_id=id, kernel_id=stored.kernel_id,
                               exit_code=f.exit_code))

    return {
        "containers": {s.id: wire(container_view(s)) for s in containers.all()},
        "kernels": {s.id: wire(kernel_view(s)) for s in kernels.all()},
        "sessions": {s.id: wire(sessions_api.session_view(s)) for s in sessions.all()},
        "keys": {r.key_id: wire(key_view(deps, r)) for r in keys.all()},
        "audit": [{"position": e.position, "timestamp": e.timestamp, "entity": {"kind": e.kind, "id": e.entity},
                   "type": e.type, "principal": e.principal, "correlation_id": e.correlation_id,
                   "request_id": e.request_id} for e in audit.entries],
        "results": {r: result(r) for r in results.by_id},
    }


def restored_from(store: Any, checkpoints: Path) -> list[Projection]:
    """The projections as a boot makes them: checkpoints, then the log's tail."""
    vs = views()
    runner = ProjectionRunner(store, vs, checkpoints=CheckpointDir(checkpoints))
    positions = runner.restore_checkpoints()
    assert all(positions.values()), f"not every projection restored from {checkpoints}: {positions}"
    runner.catch_up()
    assert not runner.failures, runner.failures
    return vs


@pytest.mark.slow
def test_sigkill_under_concurrent_writers(figures: Callable[[str], None], tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path / "data", runtime="local").start()
    up, done = threading.Event(), threading.Event()
    up.set()
    clients = [Client(d, up, done) for _ in range(CLIENTS)]
    clients += [Client(d, up, done, work) for work in ("kernels", "sessions", "keys")]
    rng = random.Random(20261122)
    boot_log = 0  # where the last boot's lines start in the daemon's log
    try:
        for c in clients:
            c.start()
        for i in range(ROUNDS):
            time.sleep(rng.uniform(0.3, 1.5))
            up.clear()
            d.kill()
            boot_log = d.log_path.stat().st_size
            d.start()
            up.set()
            if i == ROUNDS // 2:  # a clean stop saves checkpoints: later boots restore them
                time.sleep(rng.uniform(0.3, 1.5))
                up.clear()
                assert d.stop() == 0, d.log_tail()
                d.start()
                up.set()
        time.sleep(1.0)
        done.set()
        for c in clients:
            c.join(timeout=60)

        acked = [a for c in clients for a in c.acked]
        assert len(acked) > 50, "the clients got too little done to prove anything"
        assert not [e for c in clients for e in c.errors], [e for c in clients for e in c.errors][:5]
        ops = collections.Counter(op for op, _ in acked)
        # (a kernel's destroy comes after 8 executions, and the rarer image pull: not always done)
        assert all(ops[op] for op in EVENTS if op not in ("destroy", "pull")), \
            f"some operations were never acknowledged: {dict(ops)}"
        # the last boot restored every projection from the halfway checkpoints (then the tail)
        boot = d.log_path.read_text(errors="replace")[boot_log:]
        restored_at_boot = [p.name for p in views() if f"projection {p.name} restored at position" in boot]
        assert len(restored_at_boot) == 7, (restored_at_boot, boot[:2000])
        assert "replaying it in full" not in boot, boot[:2000]
        boot_checkpoints = tmp_path / "boot-checkpoints"  # the ones it restored (no save since)
        shutil.copytree(d.data_dir / "checkpoints", boot_checkpoints)

        # what the daemon serves after the last restart, at a log position nothing moves meanwhile
        deadline = time.monotonic() + 30
        while True:
            info = d.get("/v1/info").json()
            head = info["log_position"]
            if info["projection_position"] >= head:
                shown = show(d, result_ids(d))
                if d.get("/v1/info").json()["log_position"] == head:
                    break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)

        # clean up, then a clean stop (which saves the checkpoints again)
        for c in d.get("/v1/containers", params={"limit": 1000}).json()["items"]:
            d.delete(f"/v1/containers/{c['id']}?force=true")
        for k in d.get("/v1/kernels", params={"limit": 1000}).json()["items"]:
            d.delete(f"/v1/kernels/{k['id']}")
        config = load_config({"data_dir": str(d.data_dir), "runtime": "local"},
                             {**os.environ, "BERTHD_POOL_SIZE": "0"})
        key_defaults = KeyDefaults(
            rate_limits={"general": config.rate_limits.general, "executions": config.rate_limits.executions,
                         "sessions": config.rate_limits.sessions},
            quotas={"containers": config.quotas.containers, "kernels": config.quotas.kernels,
                    "sessions": config.quotas.sessions})
        copy = tmp_path / "replay"
        copy.mkdir()
        assert d.stop() == 0, d.log_tail()

        for name in ("berthd.db", "berthd.db-wal", "berthd.db-shm"):
            if (d.data_dir / name).exists():
                shutil.copy2(d.data_dir / name, copy / name)
        shutil.copytree(d.data_dir / "checkpoints", copy / "checkpoints")

        # ... equals a fresh replay of the log up to the same position
        store = open_store(str(copy / "berthd.db"), EVENT_TYPES)
        try:
            at_head, full = views(), views()
            by_corr: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            streams: dict[str, list[str]] = collections.defaultdict(list)
            intent_at: dict[tuple[str, str], tuple[str, int]] = {}
            position = 0
            while batch := store.read_all(after=position, limit=1000):
                for rec in batch:
                    for v in full:
                        v.apply(rec)
                    if rec.position <= head:
                        for v in at_head:
                            v.apply(rec)
                    streams[rec.stream_id].append(rec.type)
                    if rec.meta.correlation_id:
                        by_corr[rec.meta.correlation_id][rec.type] += 1
                        intent_at.setdefault((rec.meta.correlation_id, rec.type), (rec.stream_id, rec.version))
                position = batch[-1].position

            # every projection as a boot restores it (the checkpoints the last boot used, and
            # the ones the final stop saved), plus the tail, equals the full replay
            for checkpoints in (boot_checkpoints, copy / "checkpoints"):
                for mine, fresh in zip(restored_from(store, checkpoints), full, strict=True):
                    assert mine.checkpoint_state() == fresh.checkpoint_state(), (checkpoints.name, mine.name)
        finally:
            store.close()

        expected = expect(at_head, key_defaults)
        results_view = at_head[5]
        assert isinstance(results_view, ResultsView)
        assert set(shown) == set(expected)
        for name in expected:
            assert shown[name] == expected[name], name
        counts = {name: len(expected[name]) for name in expected}
        counts["images"] = len(at_head[1].checkpoint_state()["by_ref"])
        assert all(counts.values()), f"a read model is empty, proving nothing: {counts}"

        # every acknowledged command is in the log, exactly once, and so is its outcome
        for op, corr in acked:
            intent, outcome = EVENTS[op]
            assert by_corr[corr][intent] == 1, (op, corr, dict(by_corr[corr]))
            if outcome is not None:
                stream, version = intent_at[(corr, intent)]
                after = streams[stream][version:]  # what followed the intent in its stream
                assert outcome in after, (op, corr, streams[stream][version - 1:])
        figures(f"crash test: {ROUNDS} SIGKILLs (+1 clean restart), {len(acked)} acknowledged commands "
                f"({', '.join(f'{n} {op}' for op, n in sorted(ops.items()))}), read models equal to a fresh "
                f"replay and to checkpoints + tail: {', '.join(f'{n} {v}' for v, n in counts.items())}; "
                f"log head {head}: 0 lost, 0 duplicated")
    finally:
        done.set()
        up.set()
        try:
            for c in d.get("/v1/containers", params={"limit": 1000}).json().get("items", []):
                d.delete(f"/v1/containers/{c['id']}?force=true")
            for k in d.get("/v1/kernels", params={"limit": 1000}).json().get("items", []):
                d.delete(f"/v1/kernels/{k['id']}")
        except Exception:
            pass
        d.stop()
