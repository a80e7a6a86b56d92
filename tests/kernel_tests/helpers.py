"""Agents as plain host subprocesses: the quickest real setting (no sandbox at all)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from berthd.kernel import agent_source
from tests.kernel_tests.contract import KILL_GRACE


class HostAgents:
    """Start agents the way a sandbox does (a copied ``agent.py``, run as a script), each
    in a fresh directory under /tmp; ``stop()`` ends them all."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.directories: list[str] = []

    def directory(self, parent: str = "/tmp") -> str:
        path = tempfile.mkdtemp(prefix="berthd-kernel-", dir=parent)
        self.directories.append(path)
        Path(path, "agent.py").write_bytes(agent_source())
        return path

    def start(
        self,
        language: str,
        *,
        python: str = sys.executable,
        directory: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> str:
        """Start an agent; returns its socket path (it may not listen yet)."""
        where = directory or self.directory()
        with open(os.path.join(where, "agent.log"), "ab") as log:
            process = subprocess.Popen(
                [python, "-I", os.path.join(where, "agent.py"), "serve", "--language", language,
                 "--kill-grace", str(KILL_GRACE), *extra],
                cwd=where,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return os.path.join(where, "agent.sock")

    def log(self, socket_path: str) -> str:
        return Path(os.path.dirname(socket_path), "agent.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()  # the agent kills its interpreter's tree and exits
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        for path in self.directories:
            shutil.rmtree(path, ignore_errors=True)
        self.directories.clear()
