"""A real daemon on loopback per test module, on the local runtime and on Docker."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess


@pytest.fixture(scope="module")
def local_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(pathlib.Path(tmp_path_factory.mktemp("berthd")) / "data", runtime="local").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory, docker_client: object) -> Iterator[DaemonProcess]:
    d = DaemonProcess(pathlib.Path(tmp_path_factory.mktemp("berthd")) / "data", runtime="docker").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(params=["local", "docker"])
def daemon_and_image(request: pytest.FixtureRequest) -> tuple[DaemonProcess, str]:
    """The same API test against both runtimes."""
    if request.param == "local":
        return request.getfixturevalue("local_daemon"), "host"
    return request.getfixturevalue("docker_daemon"), BUSYBOX_IMAGE
