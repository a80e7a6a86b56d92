"""Benchmark 2 of issue 5: sandbox acquire.

Latency of a one-shot ``true`` in a fresh sandbox, one request at a time:

- the anchor: a cold Docker create + start + exec + remove through the Docker SDK
  directly (``containers.create``, ``start``, ``exec_run``, ``remove(force=True)``);
- berthd: ``POST /v1/run {"command": ["true"], "fast": true}`` over HTTP with keep-alive,
  answered from the warm pool (a hit). Before each timed request the bench waits (untimed)
  until the pool has a sandbox ready, so what is measured is a hit; any miss is counted
  and reported apart.

For context it also times ``fast: false`` (berthd's cold path) and a bare ``exec_run`` of
``true`` on a container that is already running (the engine's exec floor, which every
Docker hit pays). Both sides run in the same run on the same engine, one after the other;
berthd is a daemon of its own (a subprocess on loopback) started and stopped here.

    DOCKER_HOST=unix:///run/berthd-ci/docker.sock .venv/bin/python -m ops.bench.acquire
    .venv/bin/python -m ops.bench.acquire --quick      # ~20 s, for CI smoke

Target (issue 5): pool hit p50 <= 30 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import requests

from berthd.daemon.config import Config
from berthd.daemon.lifecycle import Daemon
from ops.bench._common import environment, format_table, percentile, write_json

DEFAULT_IMAGE = os.environ.get("BERTHD_TEST_IMAGE", "berthd-test/busybox:latest")


# ---------------------------------------------------------------------- the daemon


def serve(data_dir: str, runtime: str, image: str, size: int) -> int:
    """``--serve``: run a daemon with a warm pool of ``image`` until SIGTERM (the bench's subprocess)."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    daemon = Daemon(Config(data_dir=data_dir, runtime=runtime, socket=False,  # type: ignore[arg-type]
                           listen="127.0.0.1:0", ws_listen="127.0.0.1:0", pool_image=image, pool_size=size))
    daemon.start()
    daemon.serve_until(stop)
    return 0


class DaemonRun:
    """The pooled daemon in a subprocess, and a keep-alive client to it."""

    def __init__(self, runtime: str, image: str, size: int) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="berthd-bench-acquire-")
        self.data = Path(self.tmp.name) / "data"
        self.log = Path(self.tmp.name) / "daemon.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ops.bench.acquire",
                    "--serve",
                    str(self.data),
                    "--runtime",
                    runtime,
                    "--image",
                    image,
                    "--pool-size",
                    str(size),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        endpoints = self.data / "endpoints.json"
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(
                    f"berthd did not start:\n{self.log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.05)
        self.base = "http://" + json.loads(endpoints.read_text())["http"]
        self.session = requests.Session()
        self.session.headers["Authorization"] = (
            "Bearer " + (self.data / "admin.key").read_text().strip()
        )

    def pool(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.session.get(self.base + "/v1/info", timeout=30).json()["pool"]
        return stats

    def wait_available(self, n: int, timeout: float = 60, quiet: bool = False) -> None:
        """Until ``n`` sandboxes are ready (and, ``quiet``, no removal is in flight)."""
        deadline = time.monotonic() + timeout
        while (s := self.pool())["available"] < n or (quiet and s["removing"]):
            if time.monotonic() > deadline:
                raise SystemExit(f"the pool did not fill: {self.pool()}")
            time.sleep(0.02)

    def run(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.session.post(self.base + "/v1/run", json=body, timeout=120)
        if r.status_code != 200:
            raise SystemExit(f"/v1/run answered {r.status_code}: {r.text}")
        out: dict[str, Any] = r.json()
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


# ---------------------------------------------------------------------- measuring


def timed(n: int, op: Callable[[], Any], before: Callable[[], None] | None = None) -> list[float]:
    """``n`` sequential calls of ``op``; ``before`` runs untimed ahead of each."""
    out: list[float] = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        op()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def summary(label: str, lat: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "label": label,
        "n": len(lat),
        "p50_ms": percentile(lat, 50) * 1e3,
        "p95_ms": percentile(lat, 95) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (CI smoke)")
    parser.add_argument(
        "-n", type=int, default=0, help="iterations per side (default 100, quick 15)"
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--runtime", default="docker", choices=["docker", "local"])
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--serve", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.runtime, args.image, args.pool_size)
    n = args.n or (15 if args.quick else 100)
    warmup = 3

    import docker

    engine = docker.from_env(timeout=120)
    engine.ping()
    engine.images.get(args.image)

    def docker_cold() -> None:
        box = engine.containers.create(
            args.image, ["sleep", "infinity"], labels={"berthd-bench": "acquire"}
        )
        try:
            box.start()
            code, _ = box.exec_run(["true"])
            assert code == 0
        finally:
            box.remove(force=True)

    # the anchor first, on its own
    timed(warmup, docker_cold)
    anchor = timed(n, docker_cold)
    floor_box = engine.containers.create(
        args.image, ["sleep", "infinity"], labels={"berthd-bench": "acquire"}
    )
    try:
        floor_box.start()
        exec_floor = timed(n, lambda: floor_box.exec_run(["true"]))
    finally:
        floor_box.remove(force=True)

    daemon = DaemonRun(args.runtime, args.image, args.pool_size)
    try:
        daemon.wait_available(args.pool_size)
        body = {
            "command": ["true"],
            "image": args.image if args.runtime == "docker" else "host",
            "fast": True,
        }
        answers: list[dict[str, Any]] = []

        def hit() -> None:
            answers.append(daemon.run(body))

        def quiet() -> None:  # the pool full and the engine idle, as for the anchor
            daemon.wait_available(args.pool_size, quiet=True)

        timed(warmup, hit, quiet)
        answers.clear()
        hits = timed(n, hit, quiet)
        sources = [a["pool"] for a in answers]
        exec_ms = sorted(a["duration_ms"] / 1e3 for a in answers)
        server_ms = sorted(a.get("total_ms", 0.0) / 1e3 for a in answers)
        answers.clear()
        busy = timed(n, hit, lambda: daemon.wait_available(1))
        busy_sources = [a["pool"] for a in answers]
        cold = timed(max(5, n // 4), lambda: daemon.run({**body, "fast": False}), quiet)
        stats = daemon.pool()
    finally:
        daemon.close()
        engine.close()

    rows = [
        summary("anchor: Docker SDK create+start+exec_run+remove", anchor),
        summary(
            "berthd POST /v1/run fast (pool hit, engine quiet)",
            hits,
            hits=sources.count("hit"),
            misses=sources.count("miss"),
        ),
        summary("  of which: server time (total_ms)", server_ms),
        summary("  of which: runtime exec (duration_ms)", exec_ms),
        summary(
            "context: berthd hit while the pool refills/removes",
            busy,
            hits=busy_sources.count("hit"),
            misses=busy_sources.count("miss"),
        ),
        summary("context: Docker SDK exec_run on a running container", exec_floor),
        summary("context: berthd POST /v1/run fast=false (cold)", cold),
    ]
    ratio = rows[0]["p50_ms"] / rows[1]["p50_ms"] if rows[1]["p50_ms"] else 0.0
    print(
        format_table(
            ["", "n", "p50 ms", "p95 ms", "p99 ms"],
            [
                [
                    r["label"],
                    str(r["n"]),
                    f"{r['p50_ms']:.1f}",
                    f"{r['p95_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    target = rows[1]["p50_ms"] <= 30.0
    print(
        f"\nanchor p50 {rows[0]['p50_ms']:.1f} ms, berthd hit p50 {rows[1]['p50_ms']:.1f} ms: "
        f"berthd is {ratio:.1f}x faster; hits {sources.count('hit')}/{len(sources)}; "
        f"target p50 <= 30 ms: {'met' if target else 'MISSED'}"
    )
    print(f"pool: {json.dumps({k: v for k, v in stats.items() if k != 'keys'})}")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "acquire",
                "n": n,
                "rows": rows,
                "ratio_p50": ratio,
                "target_met": target,
                "pool": stats,
                "environment": environment(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
