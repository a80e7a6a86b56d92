"""Small pieces shared by the runtimes: timestamps, exit codes, signals, output caps and
the bookkeeping that makes ``watch`` deliver each exit exactly once."""

from __future__ import annotations

import re
import signal as _signal
import threading
from datetime import UTC, datetime

from berthd.runtime.base import ExitNotice, RuntimeFailure, SandboxStatus

__all__ = [
    "CappedBuffer",
    "ExitTracker",
    "exit_code_from_returncode",
    "format_time",
    "normalize_time",
    "parse_time",
    "signal_number",
    "utc_now",
]

# Docker prints nanoseconds and "0001-01-01T00:00:00Z" for "never".
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$"
)


def utc_now() -> str:
    """Now, as the RFC 3339 UTC string every ``SandboxStatus`` carries."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """One format for every runtime (microseconds, ``Z``), so strings compare in order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp of any precision; None for empty or Docker's zero time."""
    if not text:
        return None
    match = _TIME_RE.match(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, frac, zone = match.groups()
    if int(year) <= 1:
        return None
    micros = int((frac or "0")[:6].ljust(6, "0"))
    tz = UTC if zone == "Z" else datetime.strptime(zone.replace(":", ""), "%z").tzinfo
    moment = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=tz
    )
    return moment.astimezone(UTC)


def normalize_time(text: str | None) -> str | None:
    """An engine's timestamp in our one format, or None for "never"."""
    moment = parse_time(text)
    return format_time(moment) if moment is not None else None


def exit_code_from_returncode(returncode: int) -> int:
    """Shell convention for a process killed by a signal (128 + N), as Docker reports it."""
    return 128 - returncode if returncode < 0 else returncode


def signal_number(name: str) -> int:
    """ "INT", "SIGINT", "int" or "2" -> 2; anything else is the caller's mistake."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        if number in {s.value for s in _signal.Signals}:
            return number
    else:
        if not text.startswith("SIG"):
            text = "SIG" + text
        try:
            return int(_signal.Signals[text])
        except KeyError:
            pass
    raise RuntimeFailure(f"unknown signal {name!r}; use a name such as TERM, INT or KILL")


class CappedBuffer:
    """Keeps the first ``cap`` bytes of a stream and remembers whether more came."""

    def __init__(self, cap: int) -> None:
        self._cap = max(0, cap)
        self._parts: list[bytes] = []
        self._size = 0
        self.truncated = False

    def append(self, data: bytes) -> None:
        room = self._cap - self._size
        if len(data) > room:
            self.truncated = True
            data = data[: max(0, room)]
        if data:
            self._parts.append(data)
            self._size += len(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class ExitTracker:
    """Decides which observed exits are news, so ``watch`` reports each run's end once.

    A run is identified by its ``started_at``. An exit is reported when we saw that run
    running, or when it finished after watching began (a run that started and ended
    between two looks); older exits are the reconciler's business (``list_managed``).
    Thread-safe: event and poll threads feed the same tracker.
    """

    def __init__(self, since: datetime | None = None) -> None:
        self._since = since or datetime.now(UTC)
        self._running: dict[str, str | None] = {}
        self._reported: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def observe(self, status: SandboxStatus) -> ExitNotice | None:
        """Feed the current status of one container; returns a notice if it is news."""
        with self._lock:
            run = status.started_at
            if status.state == "running":
                previous = self._running.get(status.berth_id, run)
                self._running[status.berth_id] = run
                if previous != run and self._reported.get(status.berth_id) != previous:
                    # Restarted between two looks: the earlier run ended, code unknown.
                    self._reported[status.berth_id] = previous
                    return ExitNotice(status.berth_id, None, None)
                return None
            if status.state != "exited":
                return None
            if status.berth_id in self._reported and self._reported[status.berth_id] == run:
                return None
            seen_running = self._running.get(status.berth_id, object()) == run
            finished = parse_time(status.finished_at)
            self._running.pop(status.berth_id, None)
            self._reported[status.berth_id] = run
            if seen_running or (finished is not None and finished >= self._since):
                return ExitNotice(status.berth_id, status.exit_code, status.finished_at)
            return None

    def vanished(
        self,
        berth_id: str,
        exit_code: int | None = None,
        finished_at: str | None = None,
        *,
        evidence: bool = False,
    ) -> ExitNotice | None:
        """The container is gone from the runtime. Report it if we saw it running, or if
        ``evidence`` (e.g. an engine event) says it just died."""
        with self._lock:
            if berth_id in self._running:
                run = self._running.pop(berth_id)
                if self._reported.get(berth_id, object()) == run:
                    return None
                self._reported[berth_id] = run
                return ExitNotice(berth_id, exit_code, finished_at)
            if evidence and finished_at is not None:
                key = f"gone:{finished_at}"
                if self._reported.get(berth_id) == key:
                    return None
                self._reported[berth_id] = key
                return ExitNotice(berth_id, exit_code, finished_at)
            return None

    def running_ids(self) -> set[str]:
        with self._lock:
            return set(self._running)

    def prune(self, present: set[str]) -> None:
        """Forget reported runs of containers that no longer exist (bounded memory)."""
        with self._lock:
            for berth_id in [b for b in self._reported if b not in present]:
                if berth_id not in self._running:
                    del self._reported[berth_id]
