"""The daemon on PostgreSQL (`--store postgresql://...`): same API, state survives a
SIGKILL, and `berthd replay` reads the same log."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import uuid

import psycopg

from tests.daemon_process import DaemonProcess


def test_daemon_on_postgresql(tmp_path: pathlib.Path, postgres_url: str) -> None:
    schema = "berthd_api_" + uuid.uuid4().hex[:8]
    sep = "&" if "?" in postgres_url else "?"
    store = f"{postgres_url}{sep}schema={schema}"
    d = DaemonProcess(tmp_path / "data", runtime="local", store=store).start()
    try:
        view = d.post("/v1/containers", {"image": "host", "name": "pg-one", "command": ["sleep", "300"]}).json()
        assert view["status"] == "running"
        out = d.post("/v1/containers/pg-one/exec", {"command": ["echo", "on postgres"]}).json()
        assert out["stdout"] == "on postgres\n"
        d.kill()
        d.start()
        assert d.get("/v1/containers/pg-one").json()["status"] == "running"
        events = d.get("/v1/events", params={"entity": view["id"]}).json()["items"]
        assert [e["type"] for e in events][:2] == ["ContainerCreateRequested", "ContainerCreated"]
        d.delete("/v1/containers/pg-one?force=true")
        assert d.stop() == 0
        r = subprocess.run([sys.executable, "-m", "berthd", "replay", "--data-dir", str(d.data_dir),
                            "--store", store], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # pg-one and the warm pool's sandboxes, all removed by now
        line = next(x for x in r.stdout.splitlines() if x.startswith("containers:"))
        assert "removed" in line and "running" not in line and "exited" not in line, line
    finally:
        d.stop()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
