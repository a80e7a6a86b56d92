"""The logs WebSocket with ``follow=true&tail=N`` on a container that printed ~100 MB: the
last N lines, then the new ones, none lost or repeated, and the daemon's memory bounded
(a real daemon on each runtime; its peak RSS is read from /proc)."""

from __future__ import annotations

import json
import pathlib
import re
import time
import uuid
from collections.abc import Iterator

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess

MIB = 1 << 20
LOG_BYTES = 100_000_000  # 1,000,000 lines of 100 bytes
PEAK_GROWTH_LIMIT = 48 * MIB
# prints ~100 MB, five last lines, then two more once /tmp/go exists
SCRIPT = (
    f"yes {'x' * 99} | head -c {LOG_BYTES}; "
    "for i in 1 2 3 4 5; do echo tail-$i; done; "
    "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo new-1; echo new-2; sleep 300"
)
TAIL = "".join(f"tail-{i}\n" for i in range(1, 6))


@pytest.fixture(params=["local", "docker"])
def daemon_and_image(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[tuple[DaemonProcess, str]]:
    if request.param == "docker":
        request.getfixturevalue("docker_client")  # skips without an engine or the test image
    d = DaemonProcess(tmp_path / "data", runtime=request.param)
    (tmp_path / "data").mkdir()
    try:
        d.start()
        yield d, "host" if request.param == "local" else BUSYBOX_IMAGE
    finally:
        d.stop()


def _status_kib(pid: int, field: str) -> int:
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.M)
    assert match, text
    return int(match.group(1))


def _receive_until(ws: ClientConnection, text: str, end: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not text.endswith(end):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {end!r} in time; got {text[-500:]!r}"
        frame = json.loads(ws.recv(timeout=remaining))
        assert frame["type"] == "log", frame
        text += frame["data"]
    return text


def test_follow_with_tail_sends_the_last_lines_then_new_ones_in_bounded_memory(
        daemon_and_image: tuple[DaemonProcess, str]) -> None:
    d, image = daemon_and_image
    r = d.post("/v1/containers", {"image": image, "name": "t-" + uuid.uuid4().hex[:10],
                                  "command": ["sh", "-c", SCRIPT]})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    try:
        deadline = time.monotonic() + 120
        while d.get(f"/v1/containers/{cid}/logs", params={"tail": 1}).json()["logs"] != "tail-5\n":
            assert time.monotonic() < deadline, "the container did not print its 100 MB in time"
            time.sleep(0.5)

        assert d.proc is not None
        pid = d.proc.pid
        pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib(pid, "VmHWM")
        with connect(f"{d.ws}/v1/containers/{cid}/logs?follow=true&tail=5", additional_headers=d.headers,
                     open_timeout=10, max_size=None) as ws:
            got = _receive_until(ws, "", "tail-5\n", timeout=60)
            assert got == TAIL
            with pytest.raises(TimeoutError):  # nothing else until the container prints again
                ws.recv(timeout=1.0)
            r = d.post(f"/v1/containers/{cid}/exec", {"command": ["touch", "/tmp/go"]})
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
            got = _receive_until(ws, got, "new-2\n", timeout=30)
            assert got == TAIL + "new-1\nnew-2\n"
        growth = (_status_kib(pid, "VmHWM") - before) * 1024
        print(f"{d.runtime}: daemon peak RSS growth {growth / MIB:.1f} MiB while following a ~100 MB log")
        assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew by {growth / MIB:.1f} MiB"
    finally:
        d.delete(f"/v1/containers/{cid}", params={"force": "true"})
