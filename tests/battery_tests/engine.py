"""A second, throw-away Docker engine for fault tests: stopping the shared test engine
would break every other test, so the battery starts its own dockerd on a private socket
and its own bridge (never ``--bridge none``: that makes dockerd delete the host's docker0,
which the shared engine uses), without iptables, and loads the busybox test image into it."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

import docker

from tests.conftest import BUSYBOX_IMAGE, missing

__all__ = ["PrivateEngine"]


class PrivateEngine:
    def __init__(self, root: pathlib.Path) -> None:
        # unix socket paths are limited to 108 bytes: keep the socket under /run
        self.root = root
        self.run_dir = pathlib.Path(f"/run/berthd-fault-{os.getpid()}-{id(self) & 0xffff:x}")
        self.sock = self.run_dir / "docker.sock"
        self.url = f"unix://{self.sock}"
        self.bridge = f"bf{os.getpid() % 100000:x}{id(self) & 0xff:x}"[:15]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> PrivateEngine:
        if os.geteuid() != 0 or shutil.which("dockerd") is None or shutil.which("ip") is None:
            missing("a second Docker engine",
                    "the fault tests start their own dockerd (root, docker.io, iproute2)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        if not pathlib.Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
            subprocess.run(["ip", "addr", "add", "10.213.77.1/24", "dev", self.bridge], check=True)
            subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        cmd = ["dockerd", "--host", self.url, "--data-root", str(self.root / "data"),
               "--exec-root", str(self.run_dir / "exec"), "--pidfile", str(self.run_dir / "docker.pid"),
               "--bridge", self.bridge, "--iptables=false", "--ip6tables=false", "--shutdown-timeout", "2"]
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(self.root / 'dockerd.log').read_text()[-3000:]}")
            try:
                client = docker.DockerClient(base_url=self.url, timeout=5)
            except docker.errors.DockerException:  # not listening yet
                time.sleep(0.2)
                continue
            try:
                client.ping()
                return self
            except Exception:
                time.sleep(0.2)
            finally:
                client.close()
        self.destroy()
        raise RuntimeError("the private dockerd did not answer in time")

    def load_test_image(self) -> None:
        main = docker.from_env(timeout=60)
        mine = docker.DockerClient(base_url=self.url, timeout=120)
        try:
            mine.images.load(b"".join(main.images.get(BUSYBOX_IMAGE).save(named=BUSYBOX_IMAGE)))
        finally:
            mine.close()
            main.close()

    def pause(self) -> None:
        """SIGSTOP: an engine that hangs (accepts connections, never answers)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM: the engine shuts down (its containers are stopped)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["umount", "-R", str(self.run_dir / "exec")], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        subprocess.run(["umount", "-R", str(self.root / "data")], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
