"""Per-container cgroups for the local runtime, where the host lets the daemon make them.

Supported: the cgroup v1 ``memory``, ``pids`` and ``cpu`` hierarchies mounted under
``/sys/fs/cgroup`` and writable (the daemon runs as root). A container gets
``<hierarchy>/berthd/<node>/<berth_id>`` in each, with ``memory.limit_in_bytes`` and
``memory.memsw.limit_in_bytes`` (no swap on top, when swap accounting exists),
``pids.max`` and a CFS quota. Processes join before anything else runs: the command is
prefixed by a ``sh -c 'echo $$ > .../cgroup.procs ...; exec "$@"'`` that runs as the
container's own uid, which owns its ``cgroup.procs`` files (and nothing else there: it
cannot move itself out). Inside bubblewrap ``/sys`` is read-only anyway.

Not supported (yet): the cgroup v2 unified hierarchy, whose delegation rules need the
move to happen as root; there the runtime falls back to rlimits (``LocalRuntime``).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CgroupV1"]

log = logging.getLogger(__name__)

_BASE = "/sys/fs/cgroup"
_CONTROLLERS = ("memory", "pids", "cpu")
_PERIOD_US = 100_000


class CgroupV1:
    """The v1 hierarchies for one node (see the module docstring)."""

    def __init__(self, node_id: str, base: str = _BASE) -> None:
        self._dirs = {c: os.path.join(base, c, "berthd", node_id) for c in _CONTROLLERS}

    @classmethod
    def detect(cls, node_id: str, base: str = _BASE) -> CgroupV1 | None:
        """The hierarchies if they are there and this process may make cgroups in them."""
        if os.geteuid() != 0:
            return None
        for controller in _CONTROLLERS:
            root = os.path.join(base, controller)
            if not os.path.isfile(os.path.join(root, "cgroup.procs")):
                return None
        found = cls(node_id, base)
        try:
            for directory in found._dirs.values():
                os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            log.info("local runtime: no cgroups (%s); limits fall back to rlimits", exc)
            return None
        return found

    def _paths(self, berth_id: str) -> dict[str, str]:
        return {c: os.path.join(d, berth_id) for c, d in self._dirs.items()}

    def create(self, berth_id: str, limits: dict[str, Any], uid: int | None) -> list[str]:
        """Make the container's cgroups with ``limits`` ({memory_mb, cpus, pids}); the
        ``cgroup.procs`` files its processes must join."""
        paths = self._paths(berth_id)
        for path in paths.values():
            os.makedirs(path, exist_ok=True)
        memory = limits.get("memory_mb")
        if memory:
            size = str(int(memory) * 1024 * 1024)
            _write(paths["memory"], "memory.limit_in_bytes", size)
            if os.path.exists(os.path.join(paths["memory"], "memory.memsw.limit_in_bytes")):
                _write(paths["memory"], "memory.memsw.limit_in_bytes", size)
        pids = limits.get("pids")
        if pids:
            _write(paths["pids"], "pids.max", str(int(pids)))
        cpus = limits.get("cpus")
        if cpus:
            _write(paths["cpu"], "cpu.cfs_period_us", str(_PERIOD_US))
            _write(paths["cpu"], "cpu.cfs_quota_us", str(max(1000, int(float(cpus) * _PERIOD_US))))
        procs = [os.path.join(p, "cgroup.procs") for p in paths.values()]
        if uid is not None:
            for file in procs:
                os.chown(file, uid, uid)
        return procs

    @staticmethod
    def join_prefix(procs: list[str]) -> list[str]:
        """argv that moves itself into ``procs`` and then execs the rest of the argv."""
        if not procs:
            return []
        moves = " && ".join(f"echo $$ > {shlex.quote(p)}" for p in procs)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "berth-cgroup"]

    def collect(self, live: Callable[[], set[str] | None]) -> None:
        """Remove the cgroups of containers that are gone (``remove`` may have found them
        busy: zombies whose new parent has not reaped them yet still count). ``live``
        lists the containers that exist; it is asked *after* the cgroups are listed, so
        a container being created (its directory comes before its cgroups) is spared."""
        found: list[tuple[str, str]] = []
        for directory in self._dirs.values():
            try:
                found += [(name, os.path.join(directory, name)) for name in os.listdir(directory)]
            except OSError:
                continue
        alive = live()
        if alive is None:
            return  # cannot tell: keep everything
        for name, path in found:
            if name not in alive and os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError:
                    pass  # still busy: next time

    def close(self) -> None:
        """Remove this node's own directories if no container cgroup is left in them."""
        for directory in self._dirs.values():
            try:
                os.rmdir(directory)
            except OSError:
                pass  # containers still have theirs (they outlive the daemon)

    def remove(self, berth_id: str, wait: float = 5.0) -> None:
        """Remove the container's cgroups once its processes are gone (best effort)."""
        deadline = time.monotonic() + wait
        for path in self._paths(berth_id).values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        log.debug("local runtime: cgroup %s not removed yet: %s", path, exc)
                        break
                    time.sleep(0.05)


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(value)
