"""Helpers shared by the benchmarks: timed runs of concurrent writers, latency
percentiles, the printed table and the JSON record.

Absolute numbers on shared machines drift from run to run; what a benchmark reports is
the ratio of berthd to its anchor measured in the same run, one right after the other.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Measured",
    "bench_record",
    "combine",
    "environment",
    "format_table",
    "latency_result",
    "percentile",
    "run_writers",
    "thread_cpu_seconds",
    "value_result",
    "write_json",
]

# One writer: called with n = 1, 2, 3, ... (its n-th operation); returns when the
# operation is acknowledged.
Operation = Callable[[int], None]


@dataclass
class Measured:
    """One side of one comparison: ``ops`` acknowledged in ``seconds`` by ``writers``."""

    label: str
    writers: int
    ops: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)  # sorted, seconds

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["latencies"]
        out["rate"] = round(self.rate, 1)
        return out


def combine(parts: Sequence[Measured]) -> Measured:
    """Rounds of the same measurement as one: operations and seconds added up,
    percentiles over every latency, ``extra`` counters added up."""
    merged = sorted(x for m in parts for x in m.latencies)
    extra: dict[str, Any] = {}
    for m in parts:
        for key, value in m.extra.items():
            extra[key] = extra.get(key, 0) + value
    return Measured(
        label=parts[0].label,
        writers=parts[0].writers,
        ops=sum(m.ops for m in parts),
        seconds=sum(m.seconds for m in parts),
        p50_ms=percentile(merged, 50) * 1e3,
        p95_ms=percentile(merged, 95) * 1e3,
        p99_ms=percentile(merged, 99) * 1e3,
        errors=sum(m.errors for m in parts),
        extra=extra,
        latencies=merged,
    )


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(p / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def run_writers(
    label: str,
    writers: int,
    make_operation: Callable[[int], Operation],
    *,
    seconds: float,
    warmup: float,
    thread_prefix: str = "",
) -> Measured:
    """Run ``writers`` threads, each doing ``make_operation(i)(n)`` for n = 1, 2, ...
    for ``warmup + seconds``; count what completed in the last ``seconds``.

    ``extra["cpu_s"]`` is the process's CPU time (user + system) in those seconds, and
    ``extra["thread_cpu_s"]`` that of its threads whose names start with
    ``thread_prefix`` (when given): where the CPU goes, as evidence of what limits a
    rate.

    An operation that raises counts as an error (and its writer stops): a benchmark of
    appends that fail would measure nothing.
    """
    operations = [make_operation(i) for i in range(writers)]
    barrier = threading.Barrier(writers + 1)
    latencies: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    times: dict[str, float] = {}

    def writer(i: int) -> None:
        op = operations[i]
        mine = latencies[i]
        clock = time.perf_counter
        barrier.wait()
        start_counting, stop = times["counting"], times["stop"]
        n = 0
        try:
            while True:
                n += 1
                began = clock()
                if began >= stop:
                    return
                op(n)
                ended = clock()
                if began >= start_counting and ended <= stop:
                    mine.append(ended - began)
        except BaseException as exc:  # reported, not raised: the other writers go on
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(i,), name=f"bench-{label}-{i}", daemon=True)
        for i in range(writers)
    ]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    times["counting"] = now + warmup
    times["stop"] = now + warmup + seconds
    barrier.wait()
    time.sleep(max(0.0, times["counting"] - time.perf_counter()))
    cpu0, tcpu0 = time.process_time(), thread_cpu_seconds(thread_prefix)
    time.sleep(max(0.0, times["stop"] - time.perf_counter()))
    cpu1, tcpu1 = time.process_time(), thread_cpu_seconds(thread_prefix)
    for thread in threads:
        thread.join()
    merged = sorted(x for per in latencies for x in per)
    if errors:
        print(f"  {label}: {len(errors)} writer(s) failed, first: {errors[0]!r}", file=sys.stderr)
    return Measured(
        label=label,
        writers=writers,
        ops=len(merged),
        seconds=seconds,
        p50_ms=percentile(merged, 50) * 1e3,
        p95_ms=percentile(merged, 95) * 1e3,
        p99_ms=percentile(merged, 99) * 1e3,
        errors=len(errors),
        extra={"cpu_s": cpu1 - cpu0, **({"thread_cpu_s": tcpu1 - tcpu0} if thread_prefix else {})},
        latencies=merged,
    )


def thread_cpu_seconds(prefix: str) -> float:
    """CPU time (user + system) used so far by this process's threads whose names start
    with ``prefix`` (Linux ``/proc``; 0 elsewhere or for an empty prefix)."""
    if not prefix:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for thread in threading.enumerate():
        if not thread.name.startswith(prefix) or thread.native_id is None:
            continue
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (also readable on a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import sqlite3
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "eventsourcing": version("eventsourcing"),
        "psycopg": version("psycopg"),
        "sqlite": sqlite3.sqlite_version,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- the shared JSON record
#
# Every ``ops/bench/<name>.py`` takes ``--quick`` and ``--json PATH``; ``ops/bench/run``
# calls ``python ops/bench/<name>.py --quick --json out.json`` and reads back
# ``{"name", "results": [latency_result(...) | value_result(...)], "ratios": {name: x}}``
# (plus whatever else a benchmark wants to record, under other keys).


def latency_result(
    label: str, latencies: Sequence[float], unit: str = "ms", *, samples: bool = False
) -> dict[str, Any]:
    """``{"label", "unit", "p50", "p95", "p99", "mean", "n"}`` of latencies in seconds,
    expressed in ``unit`` ("ms" or "us"); ``samples`` adds every latency in milliseconds
    as ``samples_ms`` (what ``ops/bench/run`` plots)."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    ordered = sorted(latencies)
    mean = sum(ordered) / len(ordered) if ordered else 0.0
    out: dict[str, Any] = {
        "label": label,
        "unit": unit,
        "p50": round(percentile(ordered, 50) * scale, 3),
        "p95": round(percentile(ordered, 95) * scale, 3),
        "p99": round(percentile(ordered, 99) * scale, 3),
        "mean": round(mean * scale, 3),
        "n": len(ordered),
    }
    if samples:
        out["samples_ms"] = [round(x * 1e3, 3) for x in ordered]
    return out


def value_result(label: str, value: float, unit: str) -> dict[str, Any]:
    """``{"label", "unit", "value"}``: one figure (a rate, a size)."""
    return {"label": label, "unit": unit, "value": value}


def bench_record(
    name: str, results: Sequence[dict[str, Any]], ratios: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """The JSON record ``--json`` writes (see above); ``extra`` keys go alongside."""
    return {
        "name": name,
        "results": list(results),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "environment": environment(),
        **extra,
    }
