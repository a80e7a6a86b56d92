"""Bodies over the limits, and requests waitress refuses before the app sees them, answer in
the API's JSON error shape on a real daemon (raw sockets: a dropped connection fails)."""

from __future__ import annotations

import json
import socket
from typing import Any

import requests

from tests.daemon_process import DaemonProcess

API_CAP = 16 << 20  # limits.max_body_bytes default
SERVER_CAP = 2 * API_CAP + (1 << 20)  # waitress's max_request_body_size, as lifecycle sets it


def _connect(d: DaemonProcess) -> socket.socket:
    host, port = d.http.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), the Content-Length body. Fails if
    the connection ends (EOF or reset) before a complete answer."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed without an answer (got {buf!r})"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version in ("HTTP/1.0", "HTTP/1.1"), status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" in headers, headers
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed in the body (got {body!r})"
        body += chunk
    return int(status), headers, body[:length]


def _error(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    assert headers.get("x-request-id"), headers
    err: dict[str, Any] = json.loads(body)["error"]
    assert set(err) == {"code", "message", "details"} and err["message"], err
    return err


def _head(d: DaemonProcess, path: str, length: int, extra: str = "") -> bytes:
    host = d.http.removeprefix("http://")
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {d.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def _still_serves(d: DaemonProcess) -> None:
    assert d.get("/v1/health").status_code == 200


def test_body_over_the_servers_cap_is_a_json_413_from_the_header(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    with _connect(d) as s:
        s.sendall(_head(d, "/v1/containers", 40_000_000) + b'{"image": "' + b"x" * 4000)
        status, headers, body = _read_response(s)
        assert status == 413, (headers, body)
        err = _error(status, headers, body)
        assert err["code"] == "PAYLOAD_TOO_LARGE"
        # the API's cap once lifecycle passes it (ServerLimits.max_body_bytes), else waitress's
        assert err["details"]["size"] == 40_000_000 and err["details"]["limit"] == API_CAP
        assert headers["connection"] == "close"
        # answered, then closed: FIN (the rest of the body is not waited for forever)
        s.settimeout(15)
        assert s.recv(1024) == b""
    _still_serves(d)


def test_body_over_the_servers_cap_sent_in_full_still_reads_the_answer(local_daemon: DaemonProcess) -> None:
    """A client that sends the whole body before reading gets the 413, not a reset: the
    server drains the body it refused before closing (without that, 5 of 5 were reset)."""
    d = local_daemon
    size = 40_000_000
    for _ in range(3):
        with _connect(d) as s:
            s.sendall(_head(d, "/v1/containers", size) + b"x" * size)
            status, headers, body = _read_response(s)
            assert status == 413 and _error(status, headers, body)["code"] == "PAYLOAD_TOO_LARGE"
    r = requests.post(d.url("/v1/containers"), data=b"x" * size, timeout=60,
                      headers={**d.headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", r.text
    _still_serves(d)


def test_body_between_the_caps_is_the_same_json_413(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    size = 17 << 20
    with _connect(d) as s:
        s.sendall(_head(d, "/v1/containers", size) + b"x" * size)
        status, headers, body = _read_response(s)
        assert status == 413, (headers, body)
        err = _error(status, headers, body)
        assert err["code"] == "PAYLOAD_TOO_LARGE" and err["details"]["limit"] == API_CAP
    _still_serves(d)


def test_headers_too_large_is_a_json_431(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    with _connect(d) as s:
        s.sendall(_head(d, "/v1/containers", 2, extra=f"X-Filler: {'a' * (80 << 10)}\r\n") + b"{}")
        status, headers, body = _read_response(s)
        assert status == 431, (headers, body)
        assert _error(status, headers, body)["code"] == "BAD_REQUEST"
    _still_serves(d)


def test_malformed_request_is_a_json_400(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    with _connect(d) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        status, headers, body = _read_response(s)
        assert status == 400, (headers, body)
        assert _error(status, headers, body)["code"] == "VALIDATION_ERROR"
    _still_serves(d)
