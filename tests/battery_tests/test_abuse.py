"""Abuse inside a sandbox: a fork bomb, a memory hog and an output flood are contained by
the default security profile, and the daemon stays responsive throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Prober:
    """Times /v1/health every 100 ms while the abuse runs: the daemon must keep answering."""

    def __init__(self, d: DaemonProcess) -> None:
        self.d = d
        self.worst = 0.0
        self.failures = 0
        self.count = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                ok = requests.get(self.d.url("/v1/health"), timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            self.worst = max(self.worst, time.monotonic() - t0)
            self.count += 1
            self.failures += not ok
            self._stop.wait(0.1)

    def __enter__(self) -> Prober:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(params=["local", "docker"])
def sandbox(request: pytest.FixtureRequest, daemon_with: Callable[..., DaemonProcess]) \
        -> Iterator[tuple[DaemonProcess, str, str]]:
    """A daemon and a running sandbox with the default profile, on each runtime."""
    if request.param == "docker":
        request.getfixturevalue("docker_client")
        image = BUSYBOX_IMAGE
    else:
        image = "host"
    d = daemon_with("", runtime=request.param)
    r = d.post("/v1/containers", {"image": image, "command": ["sleep", "3600"]})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    try:
        yield d, cid, request.param
    finally:
        d.delete(f"/v1/containers/{cid}?force=true")


def test_a_fork_bomb_is_contained(sandbox: tuple[DaemonProcess, str, str],
                                  figures: Callable[[str], None]) -> None:
    d, cid, runtime = sandbox
    with Prober(d) as probe:
        r = d.post(f"/v1/containers/{cid}/exec",
                   {"command": ["sh", "-c", "b() { b | b & }; b; sleep 8"], "timeout": 8})
    assert r.status_code == 200, r.text
    assert r.json()["timed_out"] or r.json()["exit_code"] is not None
    # the sandbox is still under control: it can be stopped and removed
    t0 = time.monotonic()
    assert d.delete(f"/v1/containers/{cid}?force=true").status_code == 200
    removed_in = time.monotonic() - t0
    figures(f"{runtime} fork bomb: {probe.count} health probes, {probe.failures} failed, "
          f"slowest {probe.worst * 1000:.0f} ms; sandbox removed in {removed_in:.1f} s")
    assert probe.failures == 0 and probe.worst < 2.0
    assert removed_in < 30


def test_a_memory_hog_is_stopped_at_the_limit(sandbox: tuple[DaemonProcess, str, str],
                                              figures: Callable[[str], None]) -> None:
    d, cid, runtime = sandbox
    # dd's buffer of 1.5 GiB, filled by the read: past the 1 GiB limit of the default profile
    hog = "dd if=/dev/zero of=/dev/null bs=1536M count=1 && echo survived"
    with Prober(d) as probe:
        r = d.post(f"/v1/containers/{cid}/exec", {"command": ["sh", "-c", hog], "timeout": 120})
    assert r.status_code == 200, r.text
    out = r.json()
    figures(f"{runtime} memory hog: exit {out['exit_code']}, timed out {out['timed_out']}; "
          f"{probe.count} health probes, {probe.failures} failed, slowest {probe.worst * 1000:.0f} ms")
    assert "survived" not in out["stdout"]
    assert out["exit_code"] != 0
    assert probe.failures == 0


def test_an_output_flood_costs_the_daemon_no_more_than_the_cap(figures: Callable[[str], None],
        sandbox: tuple[DaemonProcess, str, str]) -> None:
    d, cid, runtime = sandbox
    assert d.proc is not None
    before = _rss_kib(d.proc.pid)
    with Prober(d) as probe:
        r = d.post(f"/v1/containers/{cid}/exec",
                   {"command": ["sh", "-c", "head -c 1073741824 /dev/zero | tr '\\0' x"], "timeout": 300})
    after = _rss_kib(d.proc.pid)
    assert r.status_code == 200, r.text
    out = r.json()
    figures(f"{runtime} 1 GiB output flood: {len(out['stdout'])} bytes kept, truncated {out['truncated']}; "
          f"daemon RSS {before} → {after} KiB; {probe.failures} failed probes, "
          f"slowest {probe.worst * 1000:.0f} ms")
    assert out["truncated"] is True
    assert len(out["stdout"]) <= 1 << 20
    assert after - before < 64 << 10  # far below the 1 GiB that was written
    assert probe.failures == 0
