"""Benchmark 8 of issue 5: read throughput.

Requests per second of ``GET /v1/containers/{id}`` (authenticated, answered from the
containers read model) on a real ``berthd serve`` subprocess, against the anchor: a bare
Falcon app whose one route answers ``{"hello": "world"}``, served by waitress in its own
subprocess with the same worker threads, connection limit and channel timeout as berthd.
Both on loopback, driven by the same client: ``--clients`` threads, each with one
keep-alive ``http.client`` connection, for ``--seconds`` per side, in alternating rounds.

    .venv/bin/python -m ops.bench.reads --json reads.json
    .venv/bin/python -m ops.bench.reads --quick

On 2 cores the client and the server share the CPUs; the client's cost is the same for
both sides, which compresses the ratio towards 1 rather than flattering berthd.
Target (issue 5): berthd >= 70 % of the anchor's requests/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench._common import environment, format_table, percentile, write_json

TARGET = 0.70
THREADS = 16  # berthd's default ServerLimits.threads
CONNECTION_LIMIT, CHANNEL_TIMEOUT = 200, 120


def serve_hello(port_file: str, threads: int) -> int:
    """``--serve-hello``: the anchor server (a subprocess of the bench)."""
    import falcon
    import waitress

    class Hello:
        def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
            resp.media = {"hello": "world"}

    app = falcon.App()
    app.add_route("/hello", Hello())
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=threads,
                                    connection_limit=CONNECTION_LIMIT, channel_timeout=CHANNEL_TIMEOUT,
                                    ident="hello")
    Path(port_file).write_text(str(server.socket.getsockname()[1]))
    server.run()
    return 0


class Server:
    """A subprocess serving HTTP on loopback: ``base`` once up."""

    def __init__(self, cmd: list[str], env: dict[str, str], wait_for: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not wait_for.exists() or not wait_for.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {log}")
            time.sleep(0.02)
        text = wait_for.read_text()
        self.base = "127.0.0.1:" + text.strip() if text.strip().isdigit() else json.loads(text)["http"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_berthd(work: Path) -> tuple[Server, str, str]:
    """A daemon with one running container; (server, path to GET, auth header value)."""
    data = work / "data"
    data.mkdir(mode=0o700)
    cmd = [sys.executable, "-m", "berthd", "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
           "--ws-listen", "127.0.0.1:0", "--runtime", "local", "--log-level", "warning"]
    env = {**os.environ, "BERTHD_POOL_SIZE": "0"}
    env.pop("BERTHD_ADMIN_KEY", None)
    server = Server(cmd, env, data / "endpoints.json", work / "berthd.log")
    key = (data / "admin.key").read_text().strip()
    host, port = server.base.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"image": "host", "command": ["sleep", "3600"], "name": "bench-read"})
    conn.request("POST", "/v1/containers", body=body,
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    created = json.loads(resp.read())
    if resp.status >= 300:
        raise RuntimeError(f"cannot create the container: {resp.status} {created}")
    conn.close()
    return server, f"/v1/containers/{created['id']}", f"Bearer {key}"


def start_hello(work: Path) -> Server:
    port_file = work / "hello.port"
    cmd = [sys.executable, "-m", "ops.bench.reads", "--serve-hello", str(port_file),
           "--threads", str(THREADS)]
    return Server(cmd, dict(os.environ), port_file, work / "hello.log")


def hammer(base: str, path: str, headers: dict[str, str], clients: int, seconds: float,
           warmup: float) -> dict[str, Any]:
    """``clients`` keep-alive connections GETting ``path`` as fast as answered."""
    host, port = base.rsplit(":", 1)
    stop_at = [0.0, 0.0]  # counting from, stop at
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        mine = lat[i]
        clock = time.perf_counter
        barrier.wait()
        count_from, stop = stop_at
        while True:
            began = clock()
            if began >= stop:
                break
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            ended = clock()
            if not ok:
                errors[i] += 1
            elif began >= count_from and ended <= stop:
                mine.append(ended - began)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    stop_at[0], stop_at[1] = now + warmup, now + warmup + seconds
    barrier.wait()
    for t in threads:
        t.join()
    merged = sorted(x for per in lat for x in per)
    return {"n": len(merged), "seconds": seconds, "errors": sum(errors), "latencies": merged}


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged = sorted(x for r in runs for x in r["latencies"])
    seconds = sum(r["seconds"] for r in runs)
    return {"label": label, "unit": "ms", "n": len(merged),
            "p50": round(percentile(merged, 50) * 1e3, 3), "p95": round(percentile(merged, 95) * 1e3, 3),
            "p99": round(percentile(merged, 99) * 1e3, 3),
            "mean": round(sum(merged) / len(merged) * 1e3, 3) if merged else 0.0,
            "rate": round(len(merged) / seconds, 1) if seconds else 0.0,
            "errors": sum(r["errors"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.reads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, help="measured seconds per side (default 9; quick 1)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3; quick 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients (default 8)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--serve-hello", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_hello:
        return serve_hello(args.serve_hello, args.threads)
    seconds = args.seconds or (1.0 if args.quick else 9.0)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 0.3 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="berthd-bench-reads-"))
    runs: dict[str, list[dict[str, Any]]] = {"anchor": [], "berthd": []}
    servers: list[Server] = []
    try:
        hello = start_hello(work)
        servers.append(hello)
        daemon, path, auth = start_berthd(work)
        servers.append(daemon)
        sides = {"anchor": (hello.base, "/hello", {}), "berthd": (daemon.base, path, {"Authorization": auth})}
        for n in range(rounds):
            order = ["anchor", "berthd"] if n % 2 == 0 else ["berthd", "anchor"]
            for side in order:
                base, p, headers = sides[side]
                runs[side].append(hammer(base, p, headers, args.clients, seconds / rounds, warmup))
    finally:
        for s in servers:
            s.stop()
    shutil.rmtree(work, ignore_errors=True)
    anchor = summarise("bare Falcon+waitress hello", runs["anchor"])
    ours = summarise("berthd GET /v1/containers/{id}", runs["berthd"])
    ratio = ours["rate"] / anchor["rate"] if anchor["rate"] else 0.0
    met = ratio >= TARGET
    print()
    print(f"Read throughput: {args.clients} keep-alive clients, {THREADS} server threads, loopback")
    print()
    print(format_table(["side", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
                       [[m["label"], f"{m['rate']:,.0f}", f"{m['p50']:.2f}", f"{m['p95']:.2f}",
                         f"{m['p99']:.2f}", str(m["errors"])] for m in (anchor, ours)]))
    print()
    print(f"target: berthd >= {TARGET:.0%} of the anchor: {ratio:.0%} -> {'met' if met else 'NOT met'}")
    if args.json:
        write_json(args.json, {
            "name": "reads",
            "command": " ".join([Path(sys.executable).name, "-m", "ops.bench.reads", *sys.argv[1:]]),
            "environment": environment(),
            "clients": args.clients, "server_threads": THREADS, "seconds_per_side": seconds, "rounds": rounds,
            "results": [anchor, ours,
                        {"label": "anchor requests/s", "unit": "req/s", "value": anchor["rate"]},
                        {"label": "berthd requests/s", "unit": "req/s", "value": ours["rate"]}],
            "ratios": {"berthd_over_anchor": round(ratio, 3)},
            "summary": [{"measure": "GET one entity (req/s)", "anchor": anchor["rate"], "berthd": ours["rate"],
                         "ratio": round(ratio, 2), "target": f">= {TARGET:.2f}x", "met": met}],
        })
    errors = anchor["errors"] + ours["errors"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
