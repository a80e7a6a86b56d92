"""Crash test: 8 concurrent clients create/start/exec/stop containers through the API while
the daemon is killed with SIGKILL at random moments and restarted, 50 rounds.

Every command that got a 2xx must be in the log after the restarts, none twice, and the
daemon's projections must equal a fresh replay of the log.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import requests

from berthd.domain import EVENT_TYPES
from berthd.events import open_store
from berthd.events.readmodels import ContainersView
from tests.daemon_process import DaemonProcess

CLIENTS = 8
ROUNDS = int(os.environ.get("BERTHD_CRASH_ROUNDS", "50"))  # issue 4: 50 SIGKILLs in CI
INTENT = {"create": "ContainerCreateRequested", "start": "ContainerStartRequested",
          "exec": "ExecStarted", "stop": "ContainerStopRequested"}
OUTCOME = {"create": "ContainerCreated", "start": "ContainerStarted", "exec": "ExecFinished",
           "stop": "ContainerExited"}


class Client(threading.Thread):
    def __init__(self, daemon: DaemonProcess, up: threading.Event, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.up = up
        self.done = done
        self.acked: list[tuple[str, str]] = []  # (operation, correlation id)
        self.errors: list[str] = []

    def call(self, method: str, path: str, body: object = None) -> requests.Response | None:
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
        if r.status_code >= 500:
            self.errors.append(f"{method} {path}: {r.status_code} {r.text[:200]}")
        if 200 <= r.status_code < 300:
            op = path.rsplit("/", 1)[-1] if method == "POST" and path != "/v1/containers" else "create"
            self.acked.append((op, corr))
        return r

    def run(self) -> None:
        while not self.done.is_set():
            r = self.call("POST", "/v1/containers", {"image": "host", "command": ["sleep", "3600"], "start": False})
            if r is None or r.status_code != 201:
                continue
            cid = r.json()["id"]
            for path, body in (("start", None), ("exec", {"command": ["echo", "hi"]}), ("stop", {"timeout": 1})):
                if self.done.is_set():
                    break
                self.call("POST", f"/v1/containers/{cid}/{path}", body)


@pytest.mark.slow
def test_sigkill_under_concurrent_writers(figures: Callable[[str], None], tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path / "data", runtime="local").start()
    up, done = threading.Event(), threading.Event()
    up.set()
    clients = [Client(d, up, done) for _ in range(CLIENTS)]
    rng = random.Random(20261122)
    try:
        for c in clients:
            c.start()
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0.3, 1.5))
            up.clear()
            d.kill()
            d.start()
            up.set()
        time.sleep(1.0)
        done.set()
        for c in clients:
            c.join(timeout=60)

        acked = [a for c in clients for a in c.acked]
        assert len(acked) > 50, "the clients got too little done to prove anything"
        assert not [e for c in clients for e in c.errors], [e for c in clients for e in c.errors][:5]

        # what the daemon shows after the last restart ...
        deadline = time.monotonic() + 30
        while d.get("/v1/info").json()["projection_position"] < d.get("/v1/info").json()["log_position"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        shown = {}
        for status in ("creating", "created", "running", "stopping", "exited", "removed", "lost"):
            offset = 0
            while True:
                page = d.get("/v1/containers", params={"status": status, "limit": 1000, "offset": offset}).json()
                shown.update({c["id"]: (c["status"], c["version"]) for c in page["items"]})
                offset += len(page["items"])
                if offset >= page["total"] or not page["items"]:
                    break
        head = d.get("/v1/info").json()["log_position"]

        # ... equals a fresh replay of the log up to the same position
        store = open_store(str(d.data_dir / "berthd.db"), EVENT_TYPES)
        try:
            view = ContainersView()
            by_corr: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            streams: dict[str, list[str]] = collections.defaultdict(list)
            intent_at: dict[str, tuple[str, int]] = {}
            position = 0
            while batch := store.read_all(after=position, limit=1000):
                for rec in batch:
                    if rec.position <= head:
                        view.apply(rec)
                    streams[rec.stream_id].append(rec.type)
                    if rec.meta.correlation_id:
                        by_corr[rec.meta.correlation_id][rec.type] += 1
                        intent_at.setdefault(rec.meta.correlation_id, (rec.stream_id, rec.version))
                position = batch[-1].position
        finally:
            store.close()
        replayed = {s.id: (s.status, s.version) for s in view.by_id.values()}
        assert shown == replayed

        # every acknowledged command is in the log, exactly once, and so is its outcome
        for op, corr in acked:
            assert by_corr[corr][INTENT[op]] == 1, (op, corr, dict(by_corr[corr]))
            stream, version = intent_at[corr]
            after = streams[stream][version:]  # what followed the intent in its stream
            assert OUTCOME[op] in after, (op, corr, streams[stream][version - 1:])
        figures(f"crash test: {ROUNDS} SIGKILLs, {len(acked)} acknowledged commands, "
              f"{len(replayed)} containers, log head {head}: 0 lost, 0 duplicated")
    finally:
        done.set()
        up.set()
        try:
            for c in d.get("/v1/containers", params={"limit": 1000}).json().get("items", []):
                d.delete(f"/v1/containers/{c['id']}?force=true")
        except Exception:
            pass
        d.stop()
