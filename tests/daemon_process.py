"""A real ``berthd serve`` in a subprocess on loopback, for API and crash tests."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import requests

__all__ = ["DaemonProcess"]


class DaemonProcess:
    def __init__(self, data_dir: pathlib.Path, runtime: str = "local", store: str | None = None,
                 extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.runtime = runtime
        self.store = store
        self.extra_env = extra_env or {}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = ""
        self.ws = ""
        self.key = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-daemon.log"

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        endpoints = self.data_dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "berthd", "serve", "--data-dir", str(self.data_dir),
               "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--runtime", self.runtime,
               *self.args]
        if self.store:
            cmd += ["--store", self.store]
        # no warm pool unless a test asks: its background refills would move the log head
        env = {**os.environ, "BERTHD_POOL_SIZE": "0", **self.extra_env}
        env.pop("BERTHD_ADMIN_KEY", None)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"berthd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if endpoints.exists():
                data = json.loads(endpoints.read_text())
                self.http = f"http://{data['http']}"
                self.ws = f"ws://{data['ws']}"
                self.key = (self.data_dir / "admin.key").read_text().strip()
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"berthd not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush beyond what was acknowledged."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def session(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def url(self, path: str) -> str:
        return self.http + path

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url(path), headers=self.headers, timeout=60, **kw)

    def post(self, path: str, json_body: Any = None, **kw: Any) -> requests.Response:
        return requests.post(self.url(path), headers=self.headers, json=json_body, timeout=120, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return requests.delete(self.url(path), headers=self.headers, timeout=60, **kw)
