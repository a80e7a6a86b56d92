"""Disk full on the data dir: writes answer 503, reads keep working, the log is not
corrupted, and writes succeed again once space returns."""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Callable

from berthd.domain import EVENT_TYPES
from berthd.events import open_store
from berthd.events.readmodels import ContainersView
from tests.conftest import fill_disk
from tests.daemon_process import DaemonProcess


def test_disk_full_is_503_without_loss_and_recovers(small_disk: pathlib.Path,
                                                    figures: Callable[[str], None]) -> None:
    d = DaemonProcess(small_disk / "data", runtime="local").start()
    body = {"image": "host", "command": ["sleep", "1"], "start": False}
    created: list[str] = []
    refused = 0
    try:
        for _ in range(3):
            r = d.post("/v1/containers", body)
            assert r.status_code == 201, r.text
            created.append(r.json()["id"])
        fill_disk(small_disk / "filler")
        for _ in range(20):
            r = d.post("/v1/containers", body)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "STORE_UNAVAILABLE"
            refused += 1
        assert d.get("/v1/containers").status_code == 200
        assert d.get("/v1/health").status_code == 200
        (small_disk / "filler").unlink()
        for _ in range(3):
            r = d.post("/v1/containers", body)
            assert r.status_code == 201, r.text
            created.append(r.json()["id"])
        for cid in created:
            assert d.get(f"/v1/containers/{cid}").status_code == 200
    finally:
        d.stop()

    db = str(small_disk / "data" / "berthd.db")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = open_store(db, EVENT_TYPES)
    try:
        view = ContainersView()
        position = 0
        while batch := store.read_all(after=position, limit=1000):
            for rec in batch:
                view.apply(rec)
            position = batch[-1].position
    finally:
        store.close()
    assert sorted(view.by_id) == sorted(created)
    figures(f"disk full: {refused} writes refused with 503, {len(created)} acknowledged before and after, "
          f"integrity_check ok, the replay holds exactly the acknowledged containers")
