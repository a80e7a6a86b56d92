"""Shared test fixtures: real components, gated the same way everywhere.

Integration tests need a Docker engine (``DOCKER_HOST`` or the default socket) or a
PostgreSQL server (``BERTHD_TEST_POSTGRES``). On a developer's machine without them those
tests are skipped with the reason printed; with ``BERTHD_REQUIRE_INTEGRATION=1`` (set by
``.ci/run``) a missing component is a failure, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

REQUIRE = os.environ.get("BERTHD_REQUIRE_INTEGRATION") == "1"
BUSYBOX_IMAGE = os.environ.get("BERTHD_TEST_IMAGE", "berthd-test/busybox:latest")


def missing(component: str, reason: str) -> None:
    """Skip (developer machine) or fail (CI) because ``component`` is not there."""
    if REQUIRE:
        pytest.fail(f"{component} is required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"{component} unavailable: {reason}")


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 16 MiB tmpfs: a disk that is easy to fill (``fill_disk``)."""
    if os.geteuid() != 0:
        missing("root", "the disk-full tests mount a small tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path: pathlib.Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"\0" * (1 << 16)
    try:
        while os.write(fd, block):
            pass
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def docker_client():
    """A Docker SDK client on a live engine that has the busybox test image."""
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # any failure to reach the engine
        missing("Docker engine", f"{type(exc).__name__}: {exc}")
    try:
        client.images.get(BUSYBOX_IMAGE)
    except Exception as exc:
        missing("Docker test image", f"{BUSYBOX_IMAGE} not found ({exc}); run ops/test-images.sh")
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL for store tests."""
    url = os.environ.get("BERTHD_TEST_POSTGRES", "")
    if not url:
        missing("PostgreSQL", "BERTHD_TEST_POSTGRES is not set; run ops/postgres.sh")
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("select 1")
    except Exception as exc:
        missing("PostgreSQL", f"{type(exc).__name__}: {exc}")
    return url


_FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """Record a measured figure: printed at the end of the run, in a "figures" section, so
    CI logs show what the battery measured even when everything passed."""

    def record(line: str) -> None:
        _FIGURES.append(f"{request.node.nodeid}: {line.strip()}")

    return record


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
