"""Abuse inside a sandbox: a fork bomb, a memory hog and an output flood are contained by
the default security profile, and the daemon stays responsive throughout."""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess

DEFAULT_PIDS = 256  # the default profile's pids limit (berthd.runtime.security)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> bool:
    """Set the process's VmHWM (peak RSS) back to its current RSS (Linux >= 4.0, needs
    the right to write /proc/PID/clear_refs: the daemon is our child, same uid)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _pids_cgroup(runtime: str, cid: str, request: pytest.FixtureRequest) -> str:
    """The directory of the sandbox's pids cgroup (pids.current, pids.max, tasks)."""
    if runtime == "local":
        # berthd.runtime._cgroup: <pids hierarchy>/berthd/<node>/<berth id>
        found = glob.glob(f"/sys/fs/cgroup/pids/berthd/*/{cid}")
        if not found:
            pytest.fail("the local runtime made no pids cgroup for the sandbox (it needs root and "
                        "cgroup v1 pids; /v1/info 'enforcement' says how pids are held here)")
        return found[0]
    client = request.getfixturevalue("docker_client")
    (container,) = client.containers.list(filters={"label": f"berth.id={cid}"})
    pid = container.attrs["State"]["Pid"]
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "pids" in controllers.split(","):
                return f"/sys/fs/cgroup/pids{path}"  # cgroup v1
            if controllers == "":
                return f"/sys/fs/cgroup{path}"  # cgroup v2: one hierarchy
    pytest.fail(f"no pids cgroup for Docker container {container.id[:12]}")


class PidsWatch:
    """Samples the sandbox's pids cgroup every 20 ms: the most tasks (threads included, as
    the limit counts them) seen in it at once, by the kernel's count and by listing them."""

    def __init__(self, cgroup: str) -> None:
        self.cgroup = cgroup
        self.limit = self._read("pids.max")
        self.peak = 0
        self.peak_listed = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.cgroup, name)) as fh:
            return fh.read().strip()

    def refused_forks(self) -> int:
        """How many forks the limit refused (pids.events: ``max N``)."""
        return int(self._read("pids.events").split()[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(self._read("pids.current")))
                self.peak_listed = max(self.peak_listed, len(self._read("tasks").split()))
            except OSError:
                return  # the sandbox is gone
            self._stop.wait(0.02)

    def __enter__(self) -> PidsWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


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
                                  figures: Callable[[str], None], request: pytest.FixtureRequest) -> None:
    d, cid, runtime = sandbox
    pids = PidsWatch(_pids_cgroup(runtime, cid, request))
    assert pids.limit == str(DEFAULT_PIDS)  # the default profile's limit is the one in place
    with Prober(d) as probe, pids:
        r = d.post(f"/v1/containers/{cid}/exec",
                   {"command": ["sh", "-c", "b() { b | b & }; b; sleep 8"], "timeout": 8})
        refused = pids.refused_forks()
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    # the exec came back by itself: cut at its timeout, or its shell failed to fork `sleep`
    # under the limit; either way not an exit 0 (the bomb did not just finish)
    assert out["timed_out"] is True or out["exit_code"] not in (None, 0), out
    # the limit held: never more tasks in the sandbox than the profile allows, and it is the
    # limit that stopped the bomb (the kernel refused forks at it)
    assert 0 < pids.peak <= DEFAULT_PIDS, (pids.peak, pids.limit)
    assert pids.peak_listed <= DEFAULT_PIDS
    assert refused > 0, "the fork bomb never reached the pids limit"
    # the sandbox is still under control: it can be stopped and removed
    t0 = time.monotonic()
    assert d.delete(f"/v1/containers/{cid}?force=true").status_code == 200
    removed_in = time.monotonic() - t0
    figures(f"{runtime} fork bomb: at most {pids.peak} tasks (listed {pids.peak_listed}) under "
          f"pids.max {pids.limit}, {refused} forks refused; exit {out['exit_code']}, timed out "
          f"{out['timed_out']}; {probe.count} health probes, {probe.failures} failed, "
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
    pid = d.proc.pid
    # the peak (VmHWM), not the current RSS: memory held during the flood and given back
    # by the end still counts. The baseline is taken right before: the peak reset to the
    # current RSS where the kernel lets us, else the peak so far.
    reset = _reset_peak_rss(pid)
    before = _status_kib(pid, "VmHWM")
    with Prober(d) as probe:
        r = d.post(f"/v1/containers/{cid}/exec",
                   {"command": ["sh", "-c", "head -c 1073741824 /dev/zero | tr '\\0' x"], "timeout": 300})
    peak = _status_kib(pid, "VmHWM")
    assert r.status_code == 200, r.text
    out = r.json()
    figures(f"{runtime} 1 GiB output flood: {len(out['stdout'])} bytes kept, truncated {out['truncated']}; "
          f"daemon peak RSS {before} → {peak} KiB (+{peak - before} KiB, baseline "
          f"{'reset' if reset else 'peak so far'}); {probe.failures} failed probes, "
          f"slowest {probe.worst * 1000:.0f} ms")
    assert out["truncated"] is True
    assert len(out["stdout"]) <= 1 << 20  # the output cap: 1 MiB kept
    # the daemon's peak grew by no more than the cap plus working room: 32 MiB, where
    # buffering the 1 GiB that was written (or any sizeable part of it) would show
    assert peak - before < 32 << 10
    assert probe.failures == 0
