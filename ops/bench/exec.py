"""Benchmark 4 of issue 5: exec.

Latency of ``true`` run in a container that is already running, one call at a time, on
the same container for both sides:

- the anchor: the Docker SDK's ``container.exec_run(["true"])`` (an engine exec per call:
  create, start, attach, inspect);
- berthd: ``POST /v1/containers/{id}/exec {"command": ["true"]}`` over HTTP with
  keep-alive. In an image with python3 the command runs through the container's exec
  agent on a held stream (``berthd.kernel.exec_agent``; started by the first exec); in an
  image without (busybox) it is a Docker exec like the anchor's.

Both images are measured (the python test image and busybox). For context, the same
``true`` is also timed from the bench process without HTTP, actors or the log (an exec
agent of its own, or berthd's Docker runtime exec): the difference is what berthd's exec
path (request, auth, the actor, two durable appends) costs on top. The sides alternate in
rounds of 5 calls, so load that drifts during the run weighs on both alike; the container
is created through berthd and found in the engine by its ``berth.id`` label. berthd is a
daemon of its own (a subprocess on loopback, no warm pool) started and stopped here.

    DOCKER_HOST=unix:///run/berthd-ci/docker.sock .venv/bin/python -m ops.bench.exec
    .venv/bin/python -m ops.bench.exec --quick --json exec.json      # ~20 s, CI smoke

Targets (issue 5): with python3, berthd >= 5x faster than exec_run (p50); without,
berthd <= 1.10x exec_run's p50.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from berthd.kernel.exec_agent import ExecAgent
from berthd.runtime.base import ExecSpec, RuntimeFailure
from berthd.runtime.docker import DockerRuntime
from ops.bench._common import bench_record, format_table, latency_result, write_json
from ops.bench.acquire import DaemonRun

PYTHON_IMAGE = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")
BUSYBOX_IMAGE = os.environ.get("BERTHD_TEST_IMAGE", "berthd-test/busybox:latest")
ROUND = 5  # calls per side before switching


def alternate(n: int, sides: list[Callable[[], Any]]) -> list[list[float]]:
    """``n`` timed calls of each side, taking turns in rounds of ``ROUND``."""
    out: list[list[float]] = [[] for _ in sides]
    clock = time.perf_counter
    while len(out[0]) < n:
        for op, lat in zip(sides, out, strict=True):
            for _ in range(min(ROUND, n - len(lat))):
                t0 = clock()
                op()
                lat.append(clock() - t0)
    return [sorted(x) for x in out]


def measure(daemon: DaemonRun, engine: Any, image: str, n: int, warmup: int) -> dict[str, Any]:
    r = daemon.session.post(daemon.base + "/v1/containers", json={
        "image": image, "command": ["sleep", "infinity"], "labels": {"berthd-bench": "exec"}}, timeout=120)
    if r.status_code not in (200, 201):
        raise SystemExit(f"creating the container answered {r.status_code}: {r.text}")
    berth_id = r.json()["id"]
    try:
        (box,) = engine.containers.list(filters={"label": f"berth.id={berth_id}"})
        url = f"{daemon.base}/v1/containers/{berth_id}/exec"

        def ours() -> None:
            answer = daemon.session.post(url, json={"command": ["true"]}, timeout=60)
            if answer.status_code != 200 or answer.json()["exit_code"] != 0:
                raise SystemExit(f"exec answered {answer.status_code}: {answer.text}")

        def anchor() -> None:
            code, _ = box.exec_run(["true"])
            assert code == 0

        ours()  # the first exec starts the agent (where there is a python3) ...
        time.sleep(1.0)  # ... in the background
        for _ in range(warmup):
            ours()
            anchor()
        docker_lat, berthd_lat = alternate(n, [anchor, ours])
        # context: the same exec from this process, without HTTP, actors or the log: what
        # berthd's exec path costs on top (an agent of our own, or the runtime exec)
        runtime = DockerRuntime("bench-exec")
        agent: ExecAgent | None = None
        try:
            agent = ExecAgent.start(runtime, berth_id)
        except RuntimeFailure:
            pass  # no python3
        spec = ExecSpec(("true",))
        bare_op: Callable[[], Any] = (lambda: agent.run(spec)) if agent else (lambda: runtime.exec(berth_id, spec))
        for _ in range(warmup):
            bare_op()
        (bare,) = alternate(n, [bare_op])
        if agent is not None:
            agent.close()
        runtime.close()
    finally:
        daemon.session.delete(f"{daemon.base}/v1/containers/{berth_id}?force=true", timeout=120)
    return {"anchor": docker_lat, "berthd": berthd_lat, "bare": bare, "bare_kind": "agent" if agent else "runtime"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (CI smoke)")
    parser.add_argument("-n", type=int, default=0, help="calls per side and image (default 200, quick 30)")
    parser.add_argument("--python-image", default=PYTHON_IMAGE)
    parser.add_argument("--busybox-image", default=BUSYBOX_IMAGE)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    n = args.n or (30 if args.quick else 200)
    warmup = 3 if args.quick else 10

    import docker

    engine = docker.from_env(timeout=120)
    engine.ping()
    images = {"python3": args.python_image, "busybox": args.busybox_image}
    for image in images.values():
        engine.images.get(image)

    daemon = DaemonRun("docker", args.busybox_image, 0)
    try:
        measured = {name: measure(daemon, engine, image, n, warmup) for name, image in images.items()}
    finally:
        daemon.close()
        engine.close()

    results: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    summary: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}  # p50 ms of berthd's exec path on top of the bare exec
    for name, image in images.items():
        anchor = latency_result(f"{name} ({image}): anchor Docker SDK exec_run", measured[name]["anchor"],
                                samples=True)
        ours = latency_result(f"{name} ({image}): berthd POST /v1/containers/{{id}}/exec", measured[name]["berthd"],
                              samples=True)
        bare_label = ("the exec agent's round trip (ExecAgent.run)" if measured[name]["bare_kind"] == "agent"
                      else "berthd's Docker runtime exec (DockerRuntime.exec)")
        bare = latency_result(f"{name}: context: {bare_label}, no HTTP/actor/log", measured[name]["bare"])
        results += [anchor, ours, bare]
        overhead[name] = round(ours["p50"] - bare["p50"], 3)
        speedup = anchor["p50"] / ours["p50"] if ours["p50"] else 0.0
        if name == "python3":
            ratios["python3_exec_run_p50_over_berthd_p50"] = speedup
            summary.append({"measure": f"exec `true`, image with python3 ({image}), p50 ms",
                            "anchor": anchor["p50"], "berthd": ours["p50"], "ratio": round(speedup, 2),
                            "target": "berthd >= 5x faster", "met": speedup >= 5.0})
        else:
            slowdown = ours["p50"] / anchor["p50"] if anchor["p50"] else 0.0
            ratios["busybox_berthd_p50_over_exec_run_p50"] = slowdown
            summary.append({"measure": f"exec `true`, image without python3 ({image}), p50 ms",
                            "anchor": anchor["p50"], "berthd": ours["p50"], "ratio": round(slowdown, 2),
                            "target": "berthd <= 1.10x exec_run", "met": slowdown <= 1.10})
    print(f"n {n} per side and image, alternating in rounds of {ROUND}")
    print(format_table(
        ["", "n", "p50 ms", "p95 ms", "p99 ms", "mean ms"],
        [[r["label"], str(r["n"]), f"{r['p50']:.2f}", f"{r['p95']:.2f}", f"{r['p99']:.2f}", f"{r['mean']:.2f}"]
         for r in results],
    ))
    print("berthd's exec path (HTTP, auth, actor, two durable appends) on top of the bare exec, "
          "p50: " + ", ".join(f"{k} {v:.2f} ms" for k, v in overhead.items()))
    for row in summary:
        print(f"{row['measure']}: anchor {row['anchor']:.2f}, berthd {row['berthd']:.2f}, "
              f"ratio {row['ratio']:.2f} (target {row['target']}: {'met' if row['met'] else 'MISSED'})")
    if args.json:
        write_json(args.json, bench_record("exec", results, ratios, summary=summary,
                                           images=images, n=n, berthd_overhead_p50_ms=overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
