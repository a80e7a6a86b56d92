"""Benchmark 5 of issue 5: restart to ready.

A log of 1M events over 10k containers (100 events each: create, start, 47 execs, exit,
remove), generated once straight through the store's multi-event append into a SQLite
file and cached under ``~/.cache/berthd-bench``. Each measured boot copies it into a
fresh data dir and times a real ``berthd serve`` subprocess from ``Popen`` to the first
``GET /v1/ready`` that answers 200 (which means every projection has applied the head):

- **cold**: no projection checkpoint: every event of the log is replayed;
- **warm**: after a clean stop of the cold daemon, which saved its checkpoints; the next
  boot loads them and replays only the tail.

The anchor is the cold boot: the ratio is what checkpoints buy. The target (issue 5) is
the warm boot: <= 2 s.

    .venv/bin/python -m ops.bench.restart --json restart.json
    .venv/bin/python -m ops.bench.restart --quick      # 100k events over 1k entities
"""

from __future__ import annotations

import argparse
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

import requests

from berthd.domain import EVENT_TYPES
from berthd.domain import container as c
from berthd.domain.base import Meta
from berthd.events.backends import SQLiteEventStore
from ops.bench._common import environment, format_table, write_json

TARGET_S = 2.0
CACHE = Path(os.environ.get("BERTHD_BENCH_CACHE", Path.home() / ".cache" / "berthd-bench"))
LOG_FORMAT = 2  # bump when the generated log changes


def _container_events(i: int, per_entity: int) -> tuple[str, list[Any]]:
    """One container's whole life in ``per_entity`` events (>= 7)."""
    bid = f"c{i:012x}"
    at = "2026-11-22T10:00:00.000Z"
    events: list[Any] = [
        c.ContainerCreateRequested(id=bid, name=f"bench-{i}", image="busybox:latest", runtime="local",
                                   command=["sleep", "infinity"], labels={"bench": "restart"},
                                   created_at=at),
        c.ContainerCreated(runtime_ref=f"ref-{i}"),
        c.ContainerStarted(started_at=at),
    ]
    execs = (per_entity - 5) // 2
    for n in range(execs):
        eid = f"x{i:08x}{n:04x}"
        events.append(c.ExecStarted(exec_id=eid, command=["python3", "-c", "print(1+1)"]))
        events.append(c.ExecFinished(exec_id=eid, exit_code=0, duration_ms=1.25, stdout_bytes=2))
    events.append(c.ContainerExited(exit_code=0, finished_at=at, reason="stopped"))
    events.append(c.ContainerRemoveRequested())
    events.append(c.ContainerRemoved())
    return bid, events


def build_log(entities: int, per_entity: int) -> Path:
    """The cached log file (built on first use): ``entities`` * ``per_entity`` events."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"restart-v{LOG_FORMAT}-{entities}x{per_entity}.db"
    if path.exists():
        return path
    tmp = path.with_suffix(".building")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    began = time.perf_counter()
    # synchronous=OFF only while generating: the file is a fixture, not a durable log
    store = SQLiteEventStore(tmp, EVENT_TYPES, Meta, pragmas=["PRAGMA synchronous=OFF"])
    meta = Meta(timestamp="2026-11-22T10:00:00.000Z", node_id="bench", principal="admin")
    try:
        for i in range(entities):
            bid, events = _container_events(i, per_entity)
            store.append(bid, 0, events, meta)
        head = store.head()
    finally:
        store.close()
    import sqlite3

    conn = sqlite3.connect(tmp)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for p in (Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    os.replace(tmp, path)
    print(f"generated {head:,} events over {entities:,} entities in "
          f"{time.perf_counter() - began:.1f} s -> {path}", file=sys.stderr)
    return path


class Boot:
    """One ``berthd serve`` on a data dir, timed from Popen to ready."""

    def __init__(self, data_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start_and_time(self, timeout: float = 600.0) -> float:
        endpoints = self.data_dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "berthd", "serve", "--data-dir", str(self.data_dir),
               "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--runtime", "local"]
        env = {**os.environ, "BERTHD_POOL_SIZE": "0", **self.extra_env}
        env.pop("BERTHD_ADMIN_KEY", None)
        with open(self.log_path, "ab") as log:
            began = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = began + timeout
        session = requests.Session()
        url = ""
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"berthd exited with {self.proc.returncode}; see {self.log_path}")
            if not url and endpoints.exists():
                try:
                    url = f"http://{json.loads(endpoints.read_text())['http']}/v1/ready"
                except (ValueError, KeyError):
                    pass
            if url:
                try:
                    if session.get(url, timeout=5).status_code == 200:
                        return time.perf_counter() - began
                except requests.RequestException:
                    pass
            time.sleep(0.005)
        raise RuntimeError(f"berthd not ready within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM (a clean stop: checkpoints are saved); seconds it took."""
        assert self.proc is not None
        began = time.perf_counter()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.perf_counter() - began


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.restart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k events over 1k entities")
    parser.add_argument("--entities", type=int, help="default 10,000 (quick 1,000)")
    parser.add_argument("--per-entity", type=int, default=100, help="events per entity (default 100)")
    parser.add_argument("--rounds", type=int, help="warm boots measured (default 3; quick 1)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    entities = args.entities or (1_000 if args.quick else 10_000)
    rounds = args.rounds or (1 if args.quick else 3)
    source = build_log(entities, max(7, args.per_entity))
    events = entities * max(7, args.per_entity)

    work = Path(tempfile.mkdtemp(prefix="berthd-bench-restart-"))
    data = work / "data"
    data.mkdir(mode=0o700)
    shutil.copyfile(source, data / "berthd.db")
    log_path = work / "daemon.log"
    try:
        boot = Boot(data, log_path)
        cold = boot.start_and_time()
        cold_rss = rss_mib(boot.proc.pid) if boot.proc else 0.0
        stops = [boot.stop()]
        warm: list[float] = []
        warm_rss = 0.0
        for _ in range(rounds):
            boot = Boot(data, log_path)
            warm.append(boot.start_and_time())
            warm_rss = rss_mib(boot.proc.pid) if boot.proc else 0.0
            stops.append(boot.stop())
        checkpoints = sorted(p.name for p in (data / "checkpoints").glob("*")) \
            if (data / "checkpoints").is_dir() else []
        ckpt_bytes = sum(p.stat().st_size for p in (data / "checkpoints").glob("*")) \
            if checkpoints else 0
    except BaseException:
        print(f"daemon log kept at {log_path}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    warm_best, warm_med = min(warm), sorted(warm)[len(warm) // 2]
    ratio = cold / warm_med if warm_med else 0.0
    met = warm_med <= TARGET_S
    print()
    print(f"Restart to ready: {events:,} events over {entities:,} containers")
    print()
    print(format_table(
        ["boot", "seconds", "RSS MiB"],
        [["cold (full replay)", f"{cold:.2f}", f"{cold_rss:.0f}"],
         [f"warm (checkpoint + tail), median of {len(warm)}", f"{warm_med:.2f}", f"{warm_rss:.0f}"],
         ["warm, best", f"{warm_best:.2f}", ""]]))
    print()
    print(f"clean stops took {', '.join(f'{s:.2f}' for s in stops)} s; checkpoints: "
          f"{len(checkpoints)} files, {ckpt_bytes / 1e6:.1f} MB")
    print(f"target: warm boot <= {TARGET_S:.1f} s: {warm_med:.2f} s -> {'met' if met else 'NOT met'}")
    if args.json:
        write_json(args.json, {
            "name": "restart",
            "command": " ".join([Path(sys.executable).name, "-m", "ops.bench.restart", *sys.argv[1:]]),
            "environment": environment(),
            "events": events,
            "entities": entities,
            "results": [
                {"label": "cold boot (full replay)", "unit": "s", "value": round(cold, 3)},
                {"label": "warm boot (checkpoint + tail)", "unit": "s", "value": round(warm_med, 3)},
                {"label": "warm boot, best", "unit": "s", "value": round(warm_best, 3)},
                {"label": "RSS after cold boot", "unit": "MiB", "value": round(cold_rss, 1)},
                {"label": "RSS after warm boot", "unit": "MiB", "value": round(warm_rss, 1)},
                {"label": "checkpoint size", "unit": "MB", "value": round(ckpt_bytes / 1e6, 2)},
            ],
            "ratios": {"cold_over_warm": round(ratio, 2)},
            "summary": [{"measure": f"boot to ready, {events:,} events (s)", "anchor": round(cold, 2),
                         "berthd": round(warm_med, 2), "ratio": round(ratio, 2),
                         "target": f"<= {TARGET_S:.0f} s", "met": met}],
            "target": {"label": "warm boot", "unit": "s", "max": TARGET_S,
                       "value": round(warm_med, 3), "met": met},
            "stops_s": [round(s, 3) for s in stops],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
