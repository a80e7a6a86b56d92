"""Benchmark 6 of issue 5: event fan-out.

``--subscribers`` WebSocket clients on ``/v1/events`` (live, admin key) while events are
appended at ``--rate`` events/s for ``--seconds``; per delivered event the latency from
the moment its append was called (so it includes the durable commit) to its arrival at
the subscriber, and the events lost (an appended position a subscriber never got; must be
0). A subscriber closed for being slow (1013 ``resume after=N``) resumes from N, as
API.md tells clients to; the resumes are counted.

The daemon runs in this process (a real ``Daemon`` on loopback, SQLite store, local
runtime) so the appends can go straight to its store from paced threads; the subscribers
are one asyncio process of their own. Both sides read ``time.time()`` of the same
machine. There is no anchor: the target is absolute (issue 5: p99 <= 20 ms, lost 0).

The subscribers read with ``RawSubscriber``, a lean frame reader (``--client websockets``
uses websockets' asyncio client instead: at ~7 µs of CPU per message, 100,000 messages/s
saturate the subscribers' process and its queueing, not the daemon, sets the latency);
``--procs N`` spreads them over N processes. The table also gives the latency counted
from the moment the append returned (the commit acknowledged), i.e. the fan-out's share.

    .venv/bin/python -m ops.bench.fanout --json fanout.json
    .venv/bin/python -m ops.bench.fanout --quick
    .venv/bin/python -m ops.bench.fanout --client websockets --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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

TARGET_P99_MS = 20.0


# ------------------------------------------------------------------ the subscribers


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PREFIX = b'{"position":'


class RawSubscriber(asyncio.Protocol):
    """A lean WebSocket client for the subscriber side, so that 100 of them in one
    Python process can keep up with 100,000 frames/s: websockets' asyncio client spends
    ~7 µs of CPU per message, and at that rate it, not the daemon, sets the latency. It
    does the RFC 6455 handshake (checking Sec-WebSocket-Accept), parses the unmasked server
    frames as they are read (text frames must start with ``{"position":``), answers
    pings, and stops at a close frame, keeping its code and reason. The arrival time of a
    frame is the time its bytes were handed over by the socket."""

    def __init__(self, key: str, path: str, host: str, mine: list[tuple[int, float]],
                 stop_at: list[int]) -> None:
        import base64

        self._key, self._path, self._host = key, path, host
        self._nonce = base64.b64encode(os.urandom(16))
        self._mine, self._stop_at = mine, stop_at
        self._buf = b""
        self._open = False
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[bool] = loop.create_future()  # True: stop_at reached
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def open(cls, url: str, key: str, mine: list[tuple[int, float]],
                   stop_at: list[int]) -> RawSubscriber:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(key, path, parts.netloc, mine, stop_at),
                                                parts.hostname or "127.0.0.1", parts.port or 80)
        await proto.opened
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(f"GET {self._path} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._nonce.decode()}\r\n"
                        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {self._key}\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if self.close_code is None:
            self.close_code = 1006
        if not self.ended.done():
            self.ended.set_result(False)

    def _end(self, reached: bool) -> None:
        if not self.ended.done():
            self.ended.set_result(reached)

    def data_received(self, data: bytes) -> None:
        at = time.time()
        buf = self._buf + data if self._buf else data
        if not self._open:
            import base64
            import hashlib

            cut = buf.find(b"\r\n\r\n")
            if cut < 0:
                self._buf = buf
                return
            head, buf = buf[:cut + 4], buf[cut + 4:]
            accept = base64.b64encode(hashlib.sha1(self._nonce + _GUID).digest()).lower()
            if not head.startswith(b"HTTP/1.1 101 ") or b"sec-websocket-accept: " + accept not in head.lower():
                self.opened.set_exception(RuntimeError(f"handshake refused: {head[:300]!r}"))
                assert self._transport is not None
                self._transport.close()
                return
            self._open = True
            self.opened.set_result(None)
        mine, stop_at = self._mine, self._stop_at
        i, n = 0, len(buf)
        while n - i >= 2 and not self.ended.done():
            b0, b1 = buf[i], buf[i + 1]
            if b1 & 0x80:
                raise RuntimeError("a masked frame from the server")
            length, h = b1 & 0x7F, 2
            if length == 126:
                if n - i < 4:
                    break
                length, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif length == 127:
                if n - i < 10:
                    break
                length, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            end = i + h + length
            if end > n:
                break
            opcode, body = b0 & 0x0F, i + h
            if opcode == 1 and b0 & 0x80 and not b0 & 0x70:
                if not buf.startswith(_PREFIX, body):
                    raise RuntimeError(f"not an event frame: {buf[body:body + 80]!r}")
                first = body + len(_PREFIX)
                pos = int(buf[first:buf.index(b",", first)])
                mine.append((pos, at))
                if stop_at and pos >= stop_at[0]:
                    self._end(True)
            elif opcode == 8:
                payload = buf[body:end]
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.close_reason = payload[2:].decode()
                self._end(False)
            elif opcode == 9:  # a ping: pong, masked with a zero key (payload unchanged)
                assert self._transport is not None
                self._transport.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + buf[body:end])
            elif opcode != 10:
                raise RuntimeError(f"unexpected frame: opcode {opcode}, first byte {b0:#x}")
            i = end
        self._buf = buf[i:]

    async def read(self) -> bool:
        """True once ``stop_at`` is reached; False when the server closed (``close_code``,
        ``close_reason``) or the connection dropped."""
        return await self.ended

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _subscribe(url: str, key: str, n: int, out: Path, client: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    received: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    closes: list[str] = []
    stop_at: list[int] = []
    resumes = [0]
    finished: list[bool] = []
    raw = client == "raw"

    async def open_one(i: int, query: str = "") -> Any:
        target = f"{url}?{query}" if query else url
        if raw:
            return await RawSubscriber.open(target, key, received[i], stop_at)
        return await connect(target, additional_headers={"Authorization": f"Bearer {key}"}, max_queue=None)

    conns = [await open_one(i) for i in range(n)]
    print("ready", flush=True)

    async def read_websockets(ws: Any, mine: list[tuple[int, float]]) -> bool:
        now = time.time
        try:
            async for msg in ws:
                text = msg if isinstance(msg, str) else msg.decode()
                # {"position":N,...}: the position without parsing the whole frame
                start = text.index(":") + 1
                pos = int(text[start : text.index(",", start)])
                mine.append((pos, now()))
                if stop_at and pos >= stop_at[0]:
                    return True
        except ConnectionClosed:
            pass
        return False

    async def read(i: int) -> None:
        mine = received[i]
        while True:
            ws = conns[i]
            try:
                if await (ws.read() if raw else read_websockets(ws, mine)):
                    return
            except Exception as exc:
                if not finished:
                    closes.append(f"{i}: {exc!r}")
                return
            if finished:
                return  # closed by us, at the end
            # closed by the server: a slow consumer is told where to resume (1013)
            code, reason = ws.close_code, ws.close_reason or ""
            if code != 1013 or not reason.startswith("resume after="):
                closes.append(f"{i}: closed {code} {reason}")
                return
            resumes[0] += 1
            conns[i] = await open_one(i, reason.split()[-1])

    async def watch_stdin() -> None:
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        stop_at.append(int(line.split()[1]))  # "done LAST"

    readers = [asyncio.create_task(read(i)) for i in range(n)]
    await watch_stdin()
    last = stop_at[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            r.done() or (received[i] and received[i][-1][0] >= last) for i, r in enumerate(readers)):
        await asyncio.sleep(0.05)
    finished.append(True)
    for ws in conns:
        await ws.close()
    for r in readers:
        r.cancel()
    out.write_text(json.dumps({"received": received, "closes": closes, "resumes": resumes[0]}))


def subscribe_main(url: str, key: str, n: int, out: str, client: str) -> int:
    asyncio.run(_subscribe(url, key, n, Path(out), client))
    return 0


# ------------------------------------------------------------------ the daemon and the appends


def start_daemon(data: Path) -> Any:
    from berthd.daemon.config import load_config
    from berthd.daemon.lifecycle import Daemon

    os.environ["BERTHD_POOL_SIZE"] = "0"
    cfg = load_config({"data_dir": str(data), "listen": "127.0.0.1:0", "ws_listen": "127.0.0.1:0",
                       "runtime": "local", "log_level": "warning"})
    daemon = Daemon(cfg)
    daemon.start()
    return daemon


def append_paced(store: Any, rate: float, seconds: float,
                 threads: int) -> tuple[dict[int, float], dict[int, float]]:
    """Append one event per call at ``rate`` events/s in all, from ``threads`` paced
    threads (each on streams of its own); position -> time.time() the append was called,
    and position -> time.time() it returned (the commit acknowledged)."""
    from berthd.domain import container as c
    from berthd.domain.base import Meta

    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    lock = threading.Lock()
    begin = time.monotonic() + 0.2
    per_thread = rate / threads
    errors: list[BaseException] = []

    def run(t: int) -> None:
        stream, version, k = f"fanout-{t}", 0, 0
        meta = Meta(timestamp="2026-11-22T10:00:00.000Z", node_id="bench", principal="admin")
        while True:
            due = begin + k / per_thread
            if due - begin >= seconds:
                return
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            at = time.time()
            try:
                (rec,) = store.append(stream, version, [c.ExecFinished(
                    exec_id=f"x{t}-{k}", exit_code=0, duration_ms=0.5)], meta)
            except BaseException as exc:
                errors.append(exc)
                return
            done = time.time()
            version += 1
            k += 1
            with lock:
                sent[rec.position] = at
                acked[rec.position] = done

    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"{len(errors)} appender(s) failed: {errors[0]!r}")
    return sent, acked


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 subscribers, 200 events/s, 2 s")
    parser.add_argument("--subscribers", type=int, help="default 100 (quick 20)")
    parser.add_argument("--rate", type=float, help="events/s appended (default 1000; quick 200)")
    parser.add_argument("--seconds", type=float, help="default 10 (quick 2)")
    parser.add_argument("--procs", type=int, default=1,
                        help="subscriber processes sharing the subscribers (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--client", choices=("raw", "websockets"), default="raw",
                        help="the subscribers' WebSocket client: a lean frame reader (default), or "
                             "websockets' asyncio client (~7 µs of CPU per message, which then bounds the "
                             "latency at 100,000 frames/s on one core)")
    parser.add_argument("--subscribe", nargs=4, metavar=("URL", "KEY", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscribe:
        url, key, n, out = args.subscribe
        return subscribe_main(url, key, int(n), out, args.client)
    subscribers = args.subscribers or (20 if args.quick else 100)
    rate = args.rate or (200.0 if args.quick else 1000.0)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    procs = max(1, min(args.procs, subscribers))
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="berthd-bench-fanout-"))
    data = work / "data"
    daemon = start_daemon(data)
    try:
        key = (data / "admin.key").read_text().strip()
        url = f"ws://{daemon.endpoints['ws']}/v1/events"
        shares = [subscribers // procs + (1 if i < subscribers % procs else 0) for i in range(procs)]
        children = [(subprocess.Popen(
            [sys.executable, "-m", "ops.bench.fanout", "--client", args.client, "--subscribe", url, key,
             str(share), str(work / f"received-{i}.json")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), work / f"received-{i}.json")
            for i, share in enumerate(shares) if share]
        for child, _ in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the subscribers did not connect")
        time.sleep(0.3)
        began = time.monotonic()
        cpu0, ccpu0 = time.process_time(), sum(_cpu_of(child.pid) for child, _ in children)
        sent, acked = append_paced(daemon.store, rate, seconds, threads=16)
        took = time.monotonic() - began - 0.2
        server_cpu = time.process_time() - cpu0
        client_cpu = sum(_cpu_of(child.pid) for child, _ in children) - ccpu0
        for child, _ in children:
            assert child.stdin is not None
            child.stdin.write(f"done {max(sent)}\n")
            child.stdin.flush()
        result: dict[str, Any] = {"received": [], "closes": [], "resumes": 0}
        for child, out in children:
            child.wait(120)
            part = json.loads(out.read_text())
            result["received"] += part["received"]
            result["closes"] += part["closes"]
            result["resumes"] += part["resumes"]
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    latencies: list[float] = []
    after_ack: list[float] = []
    lost = 0
    per_sub_p99: list[float] = []
    for got in result["received"]:
        seen = {pos: at for pos, at in got}
        mine = sorted(at - sent[pos] for pos, at in seen.items() if pos in sent)
        latencies.extend(mine)
        after_ack.extend(at - acked[pos] for pos, at in seen.items() if pos in acked)
        lost += sum(1 for pos in sent if pos not in seen)
        per_sub_p99.append(percentile(mine, 99) * 1e3)
    latencies.sort()
    after_ack.sort()
    p50, p95, p99 = (percentile(latencies, p) * 1e3 for p in (50, 95, 99))
    a50, a95, a99 = (percentile(after_ack, p) * 1e3 for p in (50, 95, 99))
    mean = sum(latencies) / len(latencies) * 1e3 if latencies else 0.0
    achieved = len(sent) / took if took > 0 else 0.0
    met = p99 <= TARGET_P99_MS and lost == 0
    print()
    print(f"Event fan-out: {subscribers} WebSocket subscribers, {len(sent):,} events appended at "
          f"{achieved:,.0f}/s ({len(latencies):,} deliveries)")
    print()
    print(format_table(["append -> delivered", "p50 ms", "p95 ms", "p99 ms", "max ms", "lost", "closed",
                        "resumed (1013)"],
                       [["all subscribers", f"{p50:.2f}", f"{p95:.2f}", f"{p99:.2f}",
                         f"{latencies[-1] * 1e3 if latencies else 0:.1f}", str(lost),
                         str(len(result["closes"])), str(result.get("resumes", 0))],
                        ["  of which after the commit", f"{a50:.2f}", f"{a95:.2f}", f"{a99:.2f}",
                         f"{after_ack[-1] * 1e3 if after_ack else 0:.1f}", "", "", ""]]))
    print()
    print(f"CPU while appending: daemon (appends + fan-out) {server_cpu:.1f} s, subscribers {client_cpu:.1f} s "
          f"({procs} process{'es' if procs > 1 else ''}, {args.client} client) in {took:.1f} s on {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"target: p99 <= {TARGET_P99_MS:.0f} ms and 0 lost: {p99:.1f} ms, {lost} lost -> "
          f"{'met' if met else 'NOT met'}")
    if args.json:
        write_json(args.json, {
            "name": "fanout",
            "command": " ".join([Path(sys.executable).name, "-m", "ops.bench.fanout", *sys.argv[1:]]),
            "environment": environment(),
            "subscribers": subscribers, "subscriber_processes": procs, "client": args.client, "rate": rate, "achieved_rate": round(achieved, 1),
            "seconds": seconds, "events": len(sent), "closes": result["closes"][:10],
            "resumes": result.get("resumes", 0), "client_cpu_s": round(client_cpu, 2),
            "server_cpu_s": round(server_cpu, 2),
            "results": [
                {"label": "append -> delivered", "unit": "ms", "p50": round(p50, 3), "p95": round(p95, 3),
                 "p99": round(p99, 3), "mean": round(mean, 3), "n": len(latencies)},
                {"label": "commit acknowledged -> delivered", "unit": "ms", "p50": round(a50, 3),
                 "p95": round(a95, 3), "p99": round(a99, 3), "n": len(after_ack)},
                {"label": "events lost", "unit": "events", "value": lost},
                {"label": "worst subscriber's p99", "unit": "ms", "value": round(max(per_sub_p99, default=0), 3)},
            ],
            "ratios": {},
            "summary": [
                {"measure": "delivery p99 (ms)", "anchor": None, "berthd": round(p99, 2), "ratio": None,
                 "target": f"<= {TARGET_P99_MS:.0f} ms", "met": p99 <= TARGET_P99_MS},
                {"measure": "events lost", "anchor": None, "berthd": lost, "ratio": None,
                 "target": "0", "met": lost == 0},
            ],
        })
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
