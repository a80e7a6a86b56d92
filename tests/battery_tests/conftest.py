"""The battery: tests that try to break a real daemon (issue 4). Each prints its figures."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest

from tests.daemon_process import DaemonProcess


@pytest.fixture
def daemon_with(tmp_path: pathlib.Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start a daemon on loopback with a berthd.toml of the test's choosing."""
    started: list[DaemonProcess] = []

    def start(toml: str = "", runtime: str = "local", **kw: object) -> DaemonProcess:
        data = tmp_path / f"data{len(started)}"
        data.mkdir()
        (data / "berthd.toml").write_text(toml)
        d = DaemonProcess(data, runtime=runtime, **kw)  # type: ignore[arg-type]
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()
