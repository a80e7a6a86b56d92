"""Slow clients: slowloris connections are cut and cannot lock other clients out.

The attacker connects from 127.0.0.2 (still loopback) so that the per-client cap is what
stops it, while the honest client on 127.0.0.1 keeps being served.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import requests

from tests.daemon_process import DaemonProcess

TOML = """
[server]
header_timeout = 2.0
request_timeout = 4.0
per_client_connections = 40
connection_limit = 200
"""


def _connect(d: DaemonProcess, source: str = "127.0.0.2") -> socket.socket | None:
    host, port = d.http.removeprefix("http://").rsplit(":", 1)
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((source, 0))
        s.connect((host, int(port)))
    except OSError:
        s.close()
        return None
    return s


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset: cut as well


def test_slowloris_headers_are_cut_and_others_are_served(daemon_with: Callable[..., DaemonProcess],
                                                         figures: Callable[[str], None]) -> None:
    d = daemon_with(TOML)
    attackers = [s for s in (_connect(d) for _ in range(150)) if s is not None]
    stop = threading.Event()
    for s in attackers:
        try:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: berthd\r\n")
        except OSError:
            pass

    def trickle() -> None:  # one header byte per connection every 0.3 s: never idle
        while not stop.is_set():
            for s in attackers:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            stop.wait(0.3)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        served = 0
        worst = 0.0
        end = time.monotonic() + 6
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = requests.get(d.url("/v1/health"), timeout=10)
            worst = max(worst, time.monotonic() - t0)
            assert r.status_code == 200
            served += 1
            time.sleep(0.02)
        stop.set()
        t.join()
        still_open = [s for s in attackers if not _closed_by_peer(s, 0.5)]
        figures(f"slowloris: {len(attackers)} trickling connections from 127.0.0.2; "
              f"{len(attackers) - len(still_open)} cut within 6.5 s, {len(still_open)} left; "
              f"honest client: {served} requests served, slowest {worst * 1000:.0f} ms")
        assert not still_open, f"{len(still_open)} slowloris connections were never cut"
        assert served > 10
    finally:
        stop.set()
        for s in attackers:
            s.close()


def test_a_trickled_body_is_cut_at_the_request_deadline(daemon_with: Callable[..., DaemonProcess],
                                                        figures: Callable[[str], None]) -> None:
    d = daemon_with(TOML)
    s = _connect(d, "127.0.0.1")
    assert s is not None
    try:
        s.sendall(b"POST /v1/containers HTTP/1.1\r\nHost: berthd\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + d.key.encode() + b"\r\nContent-Length: 100000\r\n\r\n{")
        started = time.monotonic()
        cut = False
        while time.monotonic() - started < 15:
            try:
                s.send(b" ")
            except OSError:
                cut = True
                break
            if _closed_by_peer(s, 0.3):
                cut = True
                break
        took = time.monotonic() - started
        figures(f"trickled body: cut after {took:.1f} s (request_timeout 4 s)")
        assert cut, "a body trickled for 15 s was never cut"
        assert requests.get(d.url("/v1/health"), timeout=10).status_code == 200
    finally:
        s.close()


def test_one_address_cannot_take_every_connection(daemon_with: Callable[..., DaemonProcess],
                                                  figures: Callable[[str], None]) -> None:
    d = daemon_with(TOML)
    held = [s for s in (_connect(d) for _ in range(60)) if s is not None]
    try:
        time.sleep(0.5)
        refused = sum(1 for s in held if _closed_by_peer(s, 0.2))
        figures(f"per-client cap 40: of {len(held)} idle connections from one address, {refused} closed at once")
        assert refused >= len(held) - 40
        assert requests.get(d.url("/v1/health"), timeout=10).status_code == 200
    finally:
        for s in held:
            s.close()
