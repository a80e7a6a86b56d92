"""Benchmark 7 of issue 5: memory per entity.

- **passivated**: an entity that exists only in the read models (its actor stopped).
  A log of N containers, 5 events each (create requested, created, started, an exec,
  exited: short streams, as most entities have), folded into the daemon's seven read
  models; RSS after minus RSS before, per entity. Measured at N = 10k and 100k.
- **live actor**: a container actor activated (its stream replayed, its pykka actor and
  thread started) through the ``Supervisor``, on the fake runtime; RSS per actor, at
  N = 1k and 10k (each ``pykka.ThreadingActor`` is an OS thread: 100k are beyond a default
  ``ulimit``/``pid_max`` and are not attempted).

Each measurement is a fresh subprocess; RSS is read after ``gc.collect()`` and glibc's
``malloc_trim(0)`` (so freed replay garbage is not counted). A deep-size walk of each
read model says what dominates. There is no anchor: the target is absolute (issue 5:
passivated <= 2 KiB each).

    .venv/bin/python -m ops.bench.memory --json memory.json
    .venv/bin/python -m ops.bench.memory --quick       # 10k passivated, 1k live
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import environment, format_table, write_json

TARGET_PASSIVATED_BYTES = 2048
CACHE = Path(os.environ.get("BERTHD_BENCH_CACHE", Path.home() / ".cache" / "berthd-bench"))
LOG_FORMAT = 1


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build_log(entities: int) -> Path:
    from berthd.domain import EVENT_TYPES
    from berthd.domain import container as c
    from berthd.domain.base import Meta
    from berthd.events.backends import SQLiteEventStore

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"memory-v{LOG_FORMAT}-{entities}.db"
    if path.exists():
        return path
    tmp = path.with_suffix(".building")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    store = SQLiteEventStore(tmp, EVENT_TYPES, Meta, pragmas=["PRAGMA synchronous=OFF"])
    try:
        for i in range(entities):
            bid = f"{i:012x}"
            meta = Meta(timestamp=f"2026-11-22T10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z",
                        node_id="bench", principal="admin", request_id=f"req{i:013x}")
            store.append(bid, 0, [
                c.ContainerCreateRequested(id=bid, name=f"box-{i}", image="busybox:latest", runtime="fake",
                                           command=["sleep", "infinity"],
                                           created_at="2026-11-22T10:00:00.000Z"),
                c.ContainerCreated(runtime_ref=f"ref{i:012x}"),
                c.ContainerStarted(started_at="2026-11-22T10:00:00.000Z"),
                c.ExecStarted(exec_id=f"x{i:012x}", command=["true"]),
                c.ExecFinished(exec_id=f"x{i:012x}", exit_code=0, duration_ms=1.0),
            ], meta)
    finally:
        store.close()
    os.replace(tmp, path)
    for suffix in ("-wal", "-shm"):
        src = Path(f"{tmp}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{path}{suffix}"))
    return path


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes reachable from ``obj`` not counted yet (shared objects once)."""
    import array

    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_size(x, seen) for x in obj)
    elif isinstance(obj, str | bytes | int | float | bool | array.array) or obj is None:
        pass
    else:
        fields = getattr(type(obj), "__struct_fields__", None) or getattr(type(obj), "__slots__", None)
        if fields:
            size += sum(deep_size(getattr(obj, f, None), seen) for f in fields)
        if hasattr(obj, "__dict__"):
            size += deep_size(vars(obj), seen)
    return size


def measure_passivated(log: str) -> dict[str, Any]:
    from berthd.domain import EVENT_TYPES
    from berthd.events import open_store
    from berthd.events.projection import ProjectionRunner
    from berthd.events.readmodels import (
        AuditView,
        ContainersView,
        ImagesView,
        KernelsView,
        KeysView,
        ResultsView,
        SessionsView,
    )

    work = Path(tempfile.mkdtemp(prefix="berthd-bench-memory-"))
    shutil.copyfile(log, work / "log.db")
    store = open_store(str(work / "log.db"), EVENT_TYPES)
    views = [ContainersView(), ImagesView(), AuditView(), KeysView(), KernelsView(), ResultsView(),
             SessionsView()]
    runner = ProjectionRunner(store, views)
    store.read_all(0, 10)  # connections and caches up before the baseline
    before = rss()
    runner.catch_up()
    after = rss()
    entities = len(views[0].by_id)  # type: ignore[attr-defined]
    breakdown = {v.name: deep_size(v, set()) for v in views}
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    return {"entities": entities, "events": runner.position, "rss_delta": after - before,
            "deep_bytes": breakdown}


def measure_live(log: str, n: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import pykka

    from berthd.actors import Supervisor, system_clock
    from berthd.domain import EVENT_TYPES
    from berthd.events import open_store
    from berthd.runtime.fake import FakeRuntime

    work = Path(tempfile.mkdtemp(prefix="berthd-bench-memory-"))
    shutil.copyfile(log, work / "log.db")
    store = open_store(str(work / "log.db"), EVENT_TYPES)
    workers = ThreadPoolExecutor(max_workers=8)
    sup = Supervisor(store=store, runtimes={"fake": FakeRuntime("bench")}, default_runtime="fake",
                     workers=workers, clock=system_clock, node_id="bench", name_taken=lambda _n: False,
                     passivate_after=3600.0)
    ids = [f"{i:012x}" for i in range(n)]
    try:
        sup._get(ids[0])  # the first activation pays for imports and pools
        before = rss()
        began = time.perf_counter()
        for berth_id in ids[1:]:
            sup._get(berth_id)
        took = time.perf_counter() - began
        after = rss()
        live = sup.live_actors
    finally:
        pykka.ActorRegistry.stop_all(timeout=60)
        workers.shutdown(wait=False)
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"actors": live, "rss_delta": after - before, "per_actor_activation_ms": took / max(1, n - 1) * 1e3}


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "ops.bench.memory", *args], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {args} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, log, *rest = args.child
        result = measure_passivated(log) if what == "passivated" else measure_live(log, int(rest[0]))
        print(json.dumps(result))
        return 0
    passivated_sizes = [10_000] if args.quick else [10_000, 100_000]
    live_sizes = [1_000] if args.quick else [1_000, 10_000]
    results: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    passivated: dict[int, dict[str, Any]] = {}
    for n in passivated_sizes:
        m = run_child("--child", "passivated", str(build_log(n)))
        passivated[n] = m
        per = m["rss_delta"] / n
        deep = {k: round(v / n) for k, v in m["deep_bytes"].items()}
        results.append({"label": f"passivated entity, {n:,} entities (RSS)", "unit": "bytes/entity",
                        "value": round(per)})
        results.append({"label": f"passivated entity, {n:,} entities (deep size by view)",
                        "unit": "bytes/entity", "value": deep})
        rows.append([f"passivated, {n:,}", f"{per:,.0f}", ", ".join(f"{k} {v}" for k, v in deep.items() if v)])
    live_rows: dict[int, dict[str, Any]] = {}
    for n in live_sizes:
        m = run_child("--child", "live", str(build_log(max(live_sizes))), str(n))
        live_rows[n] = m
        per = m["rss_delta"] / max(1, m["actors"] - 1)
        results.append({"label": f"live actor, {n:,} actors (RSS)", "unit": "bytes/actor", "value": round(per)})
        rows.append([f"live actor, {n:,}", f"{per:,.0f}",
                     f"activation {m['per_actor_activation_ms']:.2f} ms each"])
    worst = max(passivated[n]["rss_delta"] / n for n in passivated_sizes)
    met = worst <= TARGET_PASSIVATED_BYTES
    print()
    print("Memory per entity (5-event containers; RSS delta per entity)")
    print()
    print(format_table(["what", "bytes each", "notes (deep size per entity by read model)"], rows))
    print()
    print(f"target: passivated <= {TARGET_PASSIVATED_BYTES} bytes each: {worst:,.0f} -> "
          f"{'met' if met else 'NOT met'}")
    if args.json:
        write_json(args.json, {
            "name": "memory",
            "command": " ".join([Path(sys.executable).name, "-m", "ops.bench.memory", *sys.argv[1:]]),
            "environment": environment(),
            "results": results,
            "ratios": {},
            "raw": {"passivated": passivated, "live": live_rows},
            "summary": [{"measure": f"passivated entity, {n:,} (bytes)", "anchor": None,
                         "berthd": round(passivated[n]["rss_delta"] / n), "ratio": None,
                         "target": f"<= {TARGET_PASSIVATED_BYTES}",
                         "met": passivated[n]["rss_delta"] / n <= TARGET_PASSIVATED_BYTES}
                        for n in passivated_sizes]
            + [{"measure": f"live actor, {n:,} (bytes)", "anchor": None,
                "berthd": round(live_rows[n]["rss_delta"] / max(1, live_rows[n]["actors"] - 1)),
                "ratio": None, "target": "", "met": None} for n in live_sizes],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
