"""Benchmark 2 of issue 5: sandbox acquire.

Latency of a one-shot ``true`` in a fresh sandbox, one request at a time:

- the anchor: a cold Docker create + start + exec + remove through the Docker SDK
  directly (``containers.create``, ``start``, ``exec_run``, ``remove(force=True)``);
- berthd: ``POST /v1/run {"command": ["true"], "fast": true}`` over HTTP with keep-alive,
  answered from the warm pool (a hit). Before each timed request the bench waits (untimed)
  until the pool has a sandbox ready, so what is measured is a hit; any miss is counted
  and reported apart.

The image has python3 (``--image``, default the python test image): the pool starts each
sandbox's exec agent while warming it, so a hit runs its command as a round trip on a held
stream instead of a Docker exec (``berthd.kernel.exec_agent``). With an image without
python3 (``--image berthd-test/busybox:latest``) a hit pays a Docker exec.

For context it also times ``fast: false`` (berthd's cold path) and a bare ``exec_run`` of
``true`` on a container that is already running (the engine's exec floor). Both sides run
in the same run on the same engine, one after the other; berthd is a daemon of its own (a
subprocess on loopback) started and stopped here.

    DOCKER_HOST=unix:///run/berthd-ci/docker.sock .venv/bin/python -m ops.bench.acquire
    .venv/bin/python -m ops.bench.acquire --quick --json acquire.json   # ~30 s, CI smoke

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
from ops.bench._common import bench_record, format_table, latency_result, write_json

# An image with python3: a pool sandbox then runs its command through its exec agent
# (berthd.kernel.exec_agent); with busybox (no python3) a hit pays a Docker exec.
DEFAULT_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")


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
            args.image, ["sleep", "infinity"], labels={"berthd-bench": "acquire"},
            network_mode="none",  # as berthd's default profile (no network)
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
        args.image, ["sleep", "infinity"], labels={"berthd-bench": "acquire"}, network_mode="none"
    )
    try:
        floor_box.start()
        exec_floor = timed(n, lambda: floor_box.exec_run(["true"]))
    finally:
        floor_box.remove(force=True)

    pool_image = args.image if args.runtime == "docker" else "host"  # local runs only the host
    daemon = DaemonRun(args.runtime, pool_image, args.pool_size)
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
        ("anchor: Docker SDK create+start+exec_run+remove", anchor, True),
        ("berthd POST /v1/run fast (pool hit, engine quiet)", hits, True),
        ("  of which: server time (total_ms)", server_ms, False),
        ("  of which: the exec (duration_ms)", exec_ms, False),
        ("context: berthd hit while the pool refills/removes", busy, True),
        ("context: Docker SDK exec_run on a running container", exec_floor, False),
        ("context: berthd POST /v1/run fast=false (cold)", cold, False),
    ]
    results = [latency_result(label, lat, samples=plot) for label, lat, plot in rows]
    results[1]["hits"], results[1]["misses"] = sources.count("hit"), sources.count("miss")
    results[4]["hits"], results[4]["misses"] = busy_sources.count("hit"), busy_sources.count("miss")
    anchor_p50, hit_p50 = results[0]["p50"], results[1]["p50"]
    ratio = anchor_p50 / hit_p50 if hit_p50 else 0.0
    print(f"anchor image {args.image}; berthd runtime {args.runtime}, pool image {pool_image}; n {n}")
    print(
        format_table(
            ["", "n", "p50 ms", "p95 ms", "p99 ms", "mean ms"],
            [[r["label"], str(r["n"]), f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['p99']:.1f}",
              f"{r['mean']:.1f}"] for r in results],
        )
    )
    target = hit_p50 <= 30.0
    print(
        f"\nanchor p50 {anchor_p50:.1f} ms, berthd hit p50 {hit_p50:.1f} ms: "
        f"berthd is {ratio:.1f}x faster; hits {sources.count('hit')}/{len(sources)}; "
        f"target p50 <= 30 ms: {'met' if target else 'MISSED'}"
    )
    print(f"pool: {json.dumps({k: v for k, v in stats.items() if k != 'keys'})}")
    if args.json:
        write_json(args.json, bench_record(
            "acquire", results,
            {"anchor_p50_over_hit_p50": ratio,
             "anchor_p99_over_hit_p99": results[0]["p99"] / results[1]["p99"] if results[1]["p99"] else 0.0},
            summary=[{"measure": "one-shot `true` in a fresh sandbox, p50 ms", "anchor": anchor_p50,
                      "berthd": hit_p50, "ratio": round(ratio, 2), "target": "pool hit p50 <= 30 ms",
                      "met": target}],
            image=args.image, runtime=args.runtime, pool_image=pool_image, pool=stats,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
