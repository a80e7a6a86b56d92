"""A ``user`` key cannot make the daemon run out of memory through a download or a logs
read: a file over the download cap (``limits.max_body_bytes``) answers 413 without being
read, a directory is refused from the engine's stat before its archive is pulled, and
``GET /logs`` reads only the last bytes it answers with. Measured on a real daemon
process, on both runtimes, by its peak RSS (``VmHWM``).

Where the big files go: the local runtime's ``/tmp`` is a host directory of the
container; Docker's default profile has a read-only root and ``/tmp`` a tmpfs of
``tmp_size_mb`` (256 MiB). A sparse file takes no tmpfs pages, so ``truncate -s 2G``
works there too (checked by the test: the file's size is asserted before the download).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess

MiB = 1 << 20
CAP = 16 * MiB  # limits.max_body_bytes, the download cap by default
LOGS_CAP = 8 * MiB  # limits.output_cap_bytes * 8, what GET /logs answers at most
GROWTH = 64 * MiB  # what one such request may add to the daemon's peak RSS


def peak_rss(d: DaemonProcess) -> int:
    assert d.proc is not None
    for line in pathlib.Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


class Api:
    """A daemon seen through a ``user`` key (the tenant of the threat model)."""

    def __init__(self, d: DaemonProcess, image: str) -> None:
        self.d = d
        self.image = image
        made = d.post("/v1/keys", {"name": "tenant", "role": "user"})
        assert made.status_code == 201, made.text
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {made.json()['key']}"

    def req(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.s.request(method, self.d.url(path), timeout=180, **kw)

    def container(self, command: list[str]) -> str:
        r = self.req("POST", "/v1/containers", json={"image": self.image, "command": command})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def sh(self, cid: str, script: str) -> str:
        r = self.req("POST", f"/v1/containers/{cid}/exec", json={"command": ["sh", "-c", script]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["exit_code"] == 0, body
        return str(body["stdout"])

    def wait_exited(self, cid: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.req("GET", f"/v1/containers/{cid}").json()["status"] == "exited":
                return
            time.sleep(0.2)
        raise AssertionError(f"container {cid} still running after {timeout}s")


@pytest.fixture(params=["local", "docker"])
def api(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Api]:
    """A fresh daemon per test: its peak RSS owes nothing to an earlier test."""
    if request.param == "docker":
        request.getfixturevalue("docker_client")  # skips (or fails in CI) without an engine
    d = DaemonProcess(tmp_path / "data", runtime=request.param)
    try:
        d.start()
        yield Api(d, "host" if request.param == "local" else BUSYBOX_IMAGE)
    finally:
        d.stop()


@pytest.fixture
def docker_api(tmp_path: pathlib.Path, docker_client: Any) -> Iterator[Api]:
    d = DaemonProcess(tmp_path / "data", runtime="docker")
    try:
        d.start()
        yield Api(d, BUSYBOX_IMAGE)
    finally:
        d.stop()


def test_a_2g_sparse_file_is_413_without_being_read(api: Api) -> None:
    cid = api.container(["sleep", "300"])
    assert api.sh(cid, "truncate -s 2G /tmp/big && stat -c %s /tmp/big").strip() == str(2 << 30)
    # warm the download path up so that the baseline includes its fixed costs
    api.sh(cid, "echo small > /tmp/small")
    assert api.req("GET", f"/v1/containers/{cid}/files", params={"path": "/tmp/small"}).content == b"small\n"
    before = peak_rss(api.d)
    started = time.monotonic()
    r = api.req("GET", f"/v1/containers/{cid}/files", params={"path": "/tmp/big"})
    elapsed = time.monotonic() - started
    growth = peak_rss(api.d) - before
    assert r.status_code == 413, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE"
    assert error["details"] == {"size": 2 << 30, "limit": CAP}
    assert str(2 << 30) in error["message"] and str(CAP) in error["message"]
    assert growth < GROWTH, f"peak RSS grew by {growth / MiB:.1f} MiB"
    assert elapsed < 10, f"took {elapsed:.1f}s: the file was read"
    api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})


def test_the_cap_is_exact(api: Api) -> None:
    """A file of exactly the cap downloads whole; one byte more is refused."""
    cid = api.container(["sleep", "300"])
    api.sh(cid, f"truncate -s {CAP} /tmp/at && truncate -s {CAP + 1} /tmp/over")
    r = api.req("GET", f"/v1/containers/{cid}/files", params={"path": "/tmp/at"})
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == CAP and r.content.count(0) == CAP
    r = api.req("GET", f"/v1/containers/{cid}/files", params={"path": "/tmp/over"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["details"] == {"size": CAP + 1, "limit": CAP}
    api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})


def test_docker_a_symlink_to_a_big_file_is_413(docker_api: Api) -> None:
    cid = docker_api.container(["sleep", "300"])
    docker_api.sh(cid, "truncate -s 2G /tmp/big && ln -s /tmp/big /tmp/link")
    before = peak_rss(docker_api.d)
    r = docker_api.req("GET", f"/v1/containers/{cid}/files", params={"path": "/tmp/link"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["details"] == {"size": 2 << 30, "limit": CAP}
    assert peak_rss(docker_api.d) - before < GROWTH
    docker_api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})


def test_docker_a_directory_is_refused_before_its_archive_is_pulled(docker_api: Api) -> None:
    cid = docker_api.container(["sleep", "300"])
    docker_api.sh(cid, "ln -s / /tmp/root")
    before = peak_rss(docker_api.d)
    for path in ("/", "/usr", "/tmp/root", "/tmp"):
        started = time.monotonic()
        r = docker_api.req("GET", f"/v1/containers/{cid}/files", params={"path": path})
        elapsed = time.monotonic() - started
        assert r.status_code == 400, (path, r.text[:300])
        assert r.json()["error"]["code"] == "INVALID_PATH", path
        assert "is a directory" in r.json()["error"]["message"], path
        assert elapsed < 2, f"{path}: {elapsed:.1f}s, the archive was pulled"
    growth = peak_rss(docker_api.d) - before
    assert growth < 16 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB"
    docker_api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})


def test_docker_containers_get_a_bounded_log_driver(docker_api: Api, docker_client: Any) -> None:
    cid = docker_api.container(["sleep", "300"])
    (found,) = docker_client.containers.list(all=True, filters={"label": f"berth.id={cid}"})
    config = found.attrs["HostConfig"]["LogConfig"]
    assert config == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}}
    assert found.labels["berth.id"] == cid and found.attrs["HostConfig"]["ReadonlyRootfs"]
    docker_api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})


def test_logs_of_a_container_that_printed_200mb_stay_bounded(api: Api) -> None:
    line = "y" * 99  # 100-byte lines
    cid = api.container(["sh", "-c", f"yes {line} | head -c 200000000; echo END-MARKER"])
    api.wait_exited(cid)
    r = api.req("GET", f"/v1/containers/{cid}/logs", params={"tail": "1"})
    assert r.json()["logs"] == "END-MARKER\n"  # warms the logs path up, checks the output
    before = peak_rss(api.d)
    started = time.monotonic()
    r = api.req("GET", f"/v1/containers/{cid}/logs")
    elapsed = time.monotonic() - started
    growth = peak_rss(api.d) - before
    assert r.status_code == 200, r.text[:300]
    logs = r.json()["logs"]
    assert logs.endswith(f"{line}\nEND-MARKER\n")
    if api.image == "host":
        assert len(logs) == LOGS_CAP, len(logs)  # the last 8 MiB: there are more
    else:  # the engine kept at most two 10 MB json files of it
        assert MiB < len(logs) <= LOGS_CAP, len(logs)
    assert set(logs[: -len("END-MARKER\n")]) <= {"y", "\n"}
    assert growth < GROWTH, f"peak RSS grew by {growth / MiB:.1f} MiB in {elapsed:.1f}s"
    # tail lines, then the cap, as before
    r = api.req("GET", f"/v1/containers/{cid}/logs", params={"tail": "3"})
    assert r.json()["logs"] == f"{line}\n{line}\nEND-MARKER\n"
    api.req("DELETE", f"/v1/containers/{cid}", params={"force": "true"})
