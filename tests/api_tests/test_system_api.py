"""System endpoints, OpenAPI, docs, metrics, the data-dir files and the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import requests

from tests.daemon_process import DaemonProcess


def test_ready_info_openapi_docs_metrics(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    r = requests.get(d.url("/v1/ready"), timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True
    assert {"store", "runtime"} <= set(r.json()["checks"])
    info = d.get("/v1/info").json()
    assert {"version", "node_id", "runtimes", "default_runtime", "isolation", "counts", "log_position"} <= set(info)
    assert info["default_runtime"] == "local" and "local" in info["runtimes"]
    spec = requests.get(d.url("/openapi.json"), timeout=10).json()
    assert spec["openapi"].startswith("3.1")
    assert "/v1/containers" in spec["paths"] and "CreateContainer" in spec["components"]["schemas"]
    assert "swagger-ui" in requests.get(d.url("/docs"), timeout=10).text
    assert requests.get(d.url("/docs/swagger-ui-bundle.js"), timeout=10).status_code == 200
    assert "berthd_log_position" in d.get("/metrics").text
    assert requests.get(d.url("/metrics"), timeout=10).status_code == 401  # node-wide figures: a key


def test_data_dir_files(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    key = d.data_dir / "admin.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    endpoints = json.loads((d.data_dir / "endpoints.json").read_text())
    assert {"http", "ws", "socket", "ws_socket"} <= set(endpoints)
    assert (d.data_dir / "berthd.db").exists()
    # the key's hash is on the log, never the key
    log_bytes = (d.data_dir / "berthd.db").read_bytes() + (d.data_dir / "berthd.db-wal").read_bytes() \
        if (d.data_dir / "berthd.db-wal").exists() else (d.data_dir / "berthd.db").read_bytes()
    assert d.key.encode() not in log_bytes


def test_unix_socket_is_admin_without_key(local_daemon: DaemonProcess) -> None:
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(local_daemon.data_dir / "berthd.sock"))

    for name in ("berthd.sock", "berthd-ws.sock"):
        real = (local_daemon.data_dir / name).resolve()
        assert stat.S_ISSOCK(real.stat().st_mode) and stat.S_IMODE(real.stat().st_mode) == 0o660, name
        assert stat.S_IMODE(real.parent.stat().st_mode) == 0o700  # chmod after bind is safe in here
    conn = UnixConnection("localhost")
    conn.request("GET", "/v1/info")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["node_id"]
    conn.close()


def test_second_daemon_on_same_data_dir_is_refused(local_daemon: DaemonProcess) -> None:
    r = subprocess.run([sys.executable, "-m", "berthd", "serve", "--data-dir", str(local_daemon.data_dir),
                        "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "already serving" in r.stderr


def test_config_typos_are_reported_with_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "berthd.toml"
    cfg.write_text('listn = "127.0.0.1:9999"\n')
    r = subprocess.run([sys.executable, "-m", "berthd", "serve", "--data-dir", str(tmp_path / "d"),
                        "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "listn" in r.stderr


def test_replay_and_audit_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path / "data").start()
    try:
        c = d.post("/v1/containers", {"image": "host", "name": "audited", "command": ["sleep", "30"]}).json()
        d.post(f"/v1/containers/{c['id']}/stop", {"timeout": 2})
    finally:
        assert d.stop() == 0
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "berthd", "replay", "--data-dir", str(d.data_dir)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("containers:"))
    assert "exited 1" in line and "running" not in line, line  # besides: the warm pool's, removed
    assert "ContainerStopRequested: 1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "berthd", "audit", "--data-dir", str(d.data_dir),
                        "--entity", "audited"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("ContainerCreateRequested" in line and "admin" in line for line in lines)
    assert all(c["id"] in line for line in lines)
    r = subprocess.run([sys.executable, "-m", "berthd", "audit", "--data-dir", str(d.data_dir),
                        "--since", "2999-01-01T00:00:00Z"], capture_output=True, text=True, timeout=60, env=env)
    assert r.stdout.strip() == ""


def test_graceful_stop_and_restart_keeps_state(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProcess(tmp_path / "data").start()
    try:
        c = d.post("/v1/containers", {"image": "host", "name": "keeper", "command": ["sleep", "300"]}).json()
        assert d.stop() == 0
        d.start()
        again = d.get("/v1/containers/keeper").json()
        assert again["id"] == c["id"] and again["status"] == "running"  # the local sandbox survived
        d.kill()
        d.start()
        assert d.get("/v1/containers/keeper").json()["status"] == "running"
        d.delete("/v1/containers/keeper?force=true")
    finally:
        d.stop()
