"""Host process helpers over ``/proc``: identity that survives pid reuse, and signalling a
whole process tree.

A process group alone is not enough to reach everything a command started (a child may
call ``setsid``), and a parent/child walk alone misses orphans re-parented to init; the
runtimes use both. Pids are checked against their start time before they are signalled,
so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import signal as _signal
import time
from dataclasses import dataclass

__all__ = [
    "ProcInfo",
    "alive",
    "boot_id",
    "descendants",
    "kill_tree",
    "kill_uid",
    "process_table",
    "read_proc",
    "signal_tree",
]


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str  # "R", "S", "Z", ...
    start_time: int  # clock ticks since boot


def read_proc(pid: int) -> ProcInfo | None:
    """Parse ``/proc/<pid>/stat``; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcInfo(pid, int(rest[1]), int(rest[2]), rest[0], int(rest[19]))
    except (IndexError, ValueError):
        return None


def alive(pid: int | None, start_time: int | None) -> bool:
    """The very process we recorded (same start time) still runs and is not a zombie."""
    if not pid or pid <= 0:
        return False
    info = read_proc(pid)
    if info is None or info.state in ("Z", "X"):
        return False
    return start_time is None or info.start_time == start_time


def boot_id() -> str:
    """Changes at every boot: recorded pids from another boot mean nothing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_table() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(pid: int, table: dict[int, ProcInfo]) -> set[int]:
    """Every process below ``pid`` in the parent/child tree (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = list(children.get(pid, ()))
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, ()))
    return found


def signal_tree(
    root: int,
    sig: int,
    *,
    include_root: bool = True,
    spare_children_of_root: bool = False,
) -> int:
    """Send ``sig`` to ``root``'s process group (if ``root`` leads one) and to every
    descendant of ``root``. ``spare_children_of_root`` leaves out root's direct children
    (bubblewrap's pid-namespace init, which must not get a TERM meant for the command).
    Returns how many processes were signalled."""
    table = process_table()
    root_info = table.get(root)
    if root_info is None:
        return 0
    targets = descendants(root, table)
    if root_info.pgid == root:
        targets |= {p.pid for p in table.values() if p.pgid == root and p.pid != root}
    if spare_children_of_root:
        targets -= {p for p in targets if table[p].ppid == root}
    if include_root:
        targets.add(root)
    sent = 0
    for pid in targets:
        if table[pid].state in ("Z", "X"):
            continue
        try:
            os.kill(pid, sig)
            sent += 1
        except (ProcessLookupError, PermissionError):
            pass
    return sent


def kill_tree(root: int, *, rounds: int = 5) -> None:
    """SIGKILL ``root``, its group and its descendants, again until nothing is left
    (a process may fork between our scan and our kill)."""
    for _ in range(rounds):
        table = process_table()
        info = table.get(root)
        pending = descendants(root, table)
        if info is not None and info.state not in ("Z", "X"):
            pending.add(root)
        if info is not None and info.pgid == root:
            pending |= {p.pid for p in table.values() if p.pgid == root}
        pending = {p for p in pending if p in table and table[p].state not in ("Z", "X")}
        if not pending:
            return
        signal_tree(root, _signal.SIGKILL)
        time.sleep(0.01)


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def kill_uid(uid: int, *, rounds: int = 10) -> None:
    """SIGKILL every process whose real uid is ``uid``, until none is left.

    Only for uids that belong to one sandbox alone (the local runtime's per-container
    uids): it reaches processes that left every group and tree, as a container engine
    reaches everything in a container's cgroup."""
    if uid == 0:
        raise ValueError("refusing to kill every process of root")
    for _ in range(rounds):
        victims = [int(e) for e in os.listdir("/proc") if e.isdigit() and _real_uid(int(e)) == uid]
        victims = [
            p
            for p in victims
            if (info := read_proc(p)) is not None and info.state not in ("Z", "X")
        ]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
