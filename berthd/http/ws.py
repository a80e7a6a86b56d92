"""The WebSocket listener: event subscriptions, interactive exec, followed logs.

waitress cannot upgrade a connection, so WebSockets get a listener of their own (TCP
and/or a unix socket), served by websockets' asyncio server on a background thread with
its own event loop (DESIGN.md, "Facts measured"). It talks to the same actors and
projections as the HTTP API, through the same ``Deps``.

Endpoints (API.md, "Streaming"; frame formats in each helper module's docstring):

- ``/v1/events?after=N&type=&kind=&entity=`` (``berthd.http._ws_events``): catch-up from
  ``after``, then live; ``after`` omitted = live only, from the head at connection time;
  ``type``, ``kind``, ``entity`` take comma-separated (or repeated) values. It negotiates
  no permessage-deflate (the other endpoints do): each event's frame is written, as the
  same bytes, to every subscriber.
- ``/v1/containers/{id_or_name}/exec`` (``berthd.http._ws_exec``).
- ``/v1/kernels/{id_or_name}/execute`` (``berthd.http._ws_kernel``).
- ``/v1/sessions/{id_or_name}/execute`` (``berthd.http._ws_session``).
- ``/v1/containers/{id_or_name}/logs?follow=&tail=`` (``berthd.http._ws_logs``).

Everything a client can get wrong in the URL is answered before the upgrade, as HTTP
with the API's JSON error body: 401 (no or wrong key — ``Authorization: Bearer KEY``,
``X-API-Key: KEY``, or ``?api_key=KEY`` since browsers cannot set headers on a
WebSocket), 404 (unknown path), 400 (bad query). What needs the entity (unknown
container, not running, ...) is answered after it, as an error frame, which browsers
can read (they see no HTTP status). Connections on the unix socket are admin: its 0660
mode, in a private directory, is the access control.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import errno
import logging
import os
import re
import secrets
import socket
import stat
import threading
import weakref
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from berthd.domain.errors import BerthdError, NotFound, Unauthorized
from berthd.http._ws_common import (
    BerthConnection,
    FrameCache,
    Handshake,
    Shared,
    as_error,
    encode,
    fail,
)
from berthd.http._ws_events import parse_events_query, serve_events
from berthd.http._ws_exec import serve_exec
from berthd.http._ws_kernel import serve_kernel
from berthd.http._ws_logs import parse_logs_query, serve_logs
from berthd.http._ws_session import serve_session
from berthd.http.auth import SOCKET_PRINCIPAL, Authenticator, Principal
from berthd.http.deps import Deps
from berthd.http.ratelimit import Budget, limit_headers, refusal

__all__ = ["WebSocketServer"]

log = logging.getLogger("berthd.http.ws")

_CONTAINER_PATH = re.compile(r"^/v1/containers/(?P<ref>[^/]+)/(?P<endpoint>exec|logs)$")
_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")  # as the HTTP API accepts correlation ids

_Handler = Callable[[Shared, ServerConnection, Handshake], Awaitable[None]]
_LIMIT_HEADERS: weakref.WeakKeyDictionary[ServerConnection, list[tuple[str, str]]] = weakref.WeakKeyDictionary()
"""The ``X-RateLimit-*`` pairs of a limited key's handshake, from ``process_request`` to
``process_response``: every answer to the handshake carries them (101 and refusals alike)."""
_KERNEL_PATH = re.compile(r"^/v1/kernels/(?P<ref>[^/]+)/execute$")
_SESSION_PATH = re.compile(r"^/v1/sessions/(?P<ref>[^/]+)/execute$")
_HANDLERS: dict[str, _Handler] = {"events": serve_events, "exec": serve_exec, "logs": serve_logs,
                                  "kernel": serve_kernel, "session": serve_session}


class WebSocketServer:
    """The WebSocket listener of one daemon.

    ``port`` enables TCP on ``host`` (default 127.0.0.1; port 0 picks a free port, see
    ``tcp_address``); ``unix_path`` enables a unix socket, created in an existing
    (private) directory and chmod 0660. ``start()`` returns once everything is bound (or
    raises what the bind raised); ``stop()`` closes open connections with 1001, waits for
    their handlers (an exec is killed and recorded), and joins the thread. Both may be
    called again: a stopped server can be started anew.
    """

    def __init__(
        self,
        deps: Deps,
        host: str | None,
        port: int | None,
        unix_path: str | None,
        *,
        close_timeout: float = 5.0,
        io_workers: int = 32,
    ) -> None:
        if port is None and not unix_path:
            raise ValueError("give a TCP port, a unix socket path, or both")
        self.deps = deps
        self.host = host or "127.0.0.1"
        self.port = port
        self.unix_path = os.path.abspath(unix_path) if unix_path else None
        self.close_timeout = close_timeout
        self.io_workers = io_workers
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self._tcp_address: tuple[str, int] | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """(host, port) actually bound, or None (not started, or no TCP listener)."""
        return self._tcp_address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve on a background thread; returns once listening."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the WebSocket server is already started")
            ready = threading.Event()
            self._startup_error = None
            self._io = concurrent.futures.ThreadPoolExecutor(self.io_workers, thread_name_prefix="berthd-ws-io")
            thread = threading.Thread(target=self._run, args=(ready,), name="berthd-ws", daemon=True)
            self._thread = thread
            thread.start()
            ready.wait()
            if self._startup_error is not None:
                error, self._startup_error = self._startup_error, None
                thread.join()
                self._thread = None
                self._io.shutdown(wait=False)
                self._io = None
                raise error

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection (1001), wait for their handlers, join the thread.
        Idempotent; safe to call from any thread but the server's own."""
        with self._lock:
            thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
            if thread is None:
                return
            if loop is not None and stop_requested is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    loop.call_soon_threadsafe(stop_requested.set)
            thread.join(timeout)
            if thread.is_alive():
                log.error("the WebSocket server did not stop within %.0f s", timeout)
            if self._io is not None:
                self._io.shutdown(wait=False, cancel_futures=True)
            self._thread = self._loop = self._stop_requested = self._io = None
            self._tcp_address = None

    def __enter__(self) -> WebSocketServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop thread

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, ready))
        except BaseException as exc:
            if ready.is_set():
                log.exception("the WebSocket server failed")
            else:
                self._startup_error = exc
        finally:
            try:
                _cancel_leftovers(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                ready.set()

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        assert self._io is not None
        shared = Shared(self.deps, loop, self._io, FrameCache())
        self._stop_requested = asyncio.Event()
        servers: list[Server] = []
        try:
            options: dict[str, Any] = {
                "process_response": _process_response,
                "create_connection": BerthConnection,
                "max_size": self.deps.limits.ws_max_message_bytes,
                "close_timeout": self.close_timeout,
                "server_header": f"berthd/{self.deps.version}",
            }
            handler = _handler(shared)
            if self.port is not None:
                server = await serve(handler, self.host, self.port,
                                     process_request=_process_request(shared, trusted=False),
                                     **options)
                servers.append(server)
                self._tcp_address = _address(server)
            if self.unix_path is not None:
                _prepare_unix_path(self.unix_path)
                server = await unix_serve(handler, self.unix_path,
                                          process_request=_process_request(shared, trusted=True),
                                          **options)
                servers.append(server)
                os.chmod(self.unix_path, 0o660)
                st = os.stat(self.unix_path)
                self._unix_inode = (st.st_dev, st.st_ino)
            self._loop = loop
            ready.set()
            log.info("WebSocket listener on %s", self._describe())
            await self._stop_requested.wait()
        finally:
            for server in servers:
                server.close()  # 1001 to open connections; handlers end (execs killed)
            if servers:
                closing = asyncio.gather(*(s.wait_closed() for s in servers))
                try:
                    await asyncio.wait_for(closing, timeout=self.close_timeout + 15.0)
                except TimeoutError:
                    log.warning("WebSocket connections still open at shutdown; cancelling them")
            self._remove_unix_socket()

    def _describe(self) -> str:
        where = []
        if self._tcp_address is not None:
            where.append("%s:%d" % self._tcp_address)  # noqa: UP031 - a (host, port) tuple
        if self.unix_path is not None:
            where.append(self.unix_path)
        return ", ".join(where)

    def _remove_unix_socket(self) -> None:
        if self.unix_path is None or self._unix_inode is None:
            return
        try:
            st = os.stat(self.unix_path)
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self.unix_path)
        except FileNotFoundError:
            pass
        self._unix_inode = None


# ---------------------------------------------------------------------- handshake


def _process_request(shared: Shared, trusted: bool) -> Callable[[ServerConnection, Request],
                                                                 Awaitable[Response | None]]:
    """Authenticate, route and validate the query before the upgrade; what it finds is
    kept on the connection (``BerthConnection.berth``) for the handler.

    A live-only event subscription (no ``after``) takes the log's head here, before the
    101: every event appended once the client's ``connect`` has returned is delivered."""
    deps = shared.deps

    async def process(conn: ServerConnection, request: Request) -> Response | None:
        request_id = secrets.token_hex(8)
        url = urlsplit(request.path)
        query = parse_qs(url.query, keep_blank_values=True)
        principal: Principal | None
        if trusted:
            principal = SOCKET_PRINCIPAL
        else:
            secret = Authenticator.secret_from_headers(
                _header(request.headers, "Authorization"), _header(request.headers, "X-API-Key"))
            if secret is None:
                secret = (query.get("api_key") or [""])[-1].strip() or None
            principal = deps.auth.verify(secret)
            if principal is None:
                return _reject(Unauthorized(
                    "missing or wrong API key: send 'Authorization: Bearer KEY', 'X-API-Key: KEY' "
                    "or ?api_key=KEY"), request_id, [("WWW-Authenticate", "Bearer")])
        endpoint, ref = _route(url.path)
        if not endpoint:
            return _reject(NotFound(f"no such WebSocket endpoint: {url.path}"), request_id)
        if deps.rate_limiter is not None:  # a connection costs what one HTTP request costs
            budget: Budget = "general" if endpoint in ("events", "logs") else "executions"
            verdict = deps.rate_limiter.take(principal.key_id, budget)
            if verdict is not None:
                # all answers to a limited key carry its budget, the 101 too (_process_response)
                _LIMIT_HEADERS[conn] = limit_headers(verdict)
                if not verdict.allowed:
                    return _reject(refusal(principal.key_id, budget, verdict), request_id, limit_headers(verdict))
        try:
            params: Any = None
            if endpoint == "events":
                # no permessage-deflate here: the fan-out writes each event's frame, the
                # same bytes for everyone, straight to the socket (``_ws_events``)
                conn.protocol.available_extensions = None
                params = parse_events_query(query, deps.containers)
                if params.after is None:
                    head = await shared.blocking(deps.store.head)
                    params = dataclasses.replace(params, after=head)
            elif endpoint == "logs":
                params = parse_logs_query(query)
        except Exception as exc:
            return _reject(as_error(exc), request_id)
        incoming = _header(request.headers, "X-Correlation-ID")
        correlation_id = incoming if incoming and _ID.match(incoming) else None
        assert isinstance(conn, BerthConnection)
        conn.berth = Handshake(endpoint, ref, principal, request_id, correlation_id, params)
        return None

    return process


def _process_response(conn: ServerConnection, request: Request, response: Response) -> None:
    """The upgrade carries X-Request-ID and echoes the correlation id, as HTTP does; an
    answer to a rate-limited key carries its ``X-RateLimit-*`` headers, as HTTP does."""
    hs = getattr(conn, "berth", None)
    if hs is not None:
        response.headers["X-Request-ID"] = hs.request_id
        if hs.correlation_id:
            response.headers["X-Correlation-ID"] = hs.correlation_id
    for name, value in _LIMIT_HEADERS.pop(conn, ()):
        if name not in response.headers:  # a refusal made by _reject has them already
            response.headers[name] = value


def _route(path: str) -> tuple[str, str]:
    """("events" | "exec" | "logs", container ref), ("kernel", kernel ref), ("session",
    session ref) or ("", "") for an unknown path."""
    if path == "/v1/events":
        return "events", ""
    for endpoint, pattern in (("kernel", _KERNEL_PATH), ("session", _SESSION_PATH)):
        found = pattern.match(path)
        if found is not None:
            ref = unquote(found.group("ref"))
            return (endpoint, ref) if ref else ("", "")
    match = _CONTAINER_PATH.match(path)
    if match is None:
        return "", ""
    ref = unquote(match.group("ref"))
    return (match.group("endpoint"), ref) if ref else ("", "")


def _header(headers: Headers, name: str) -> str | None:
    """The first value of a header (``Headers.get`` raises when it is repeated)."""
    values = headers.get_all(name)
    return values[0] if values else None


def _reject(err: BerthdError, request_id: str,
            extra: list[tuple[str, str]] | None = None) -> Response:
    """An HTTP answer instead of the upgrade, with the API's JSON error body."""
    body = encode(err.as_dict())
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", "application/json"),
        ("X-Request-ID", request_id),
        *(extra or []),
    ])
    return Response(err.status, HTTPStatus(err.status).phrase, headers, body)


# ---------------------------------------------------------------------- connections


def _handler(shared: Shared) -> Callable[[ServerConnection], Awaitable[None]]:
    async def handle(ws: ServerConnection) -> None:
        hs = getattr(ws, "berth", None)
        if hs is None:  # cannot happen: process_request accepted it
            await ws.close(1011, "INTERNAL_ERROR")
            return
        try:
            await _HANDLERS[hs.endpoint](shared, ws, hs)
        except ConnectionClosed:
            pass  # the client left; each handler already cleaned up
        except Exception as exc:
            await fail(ws, as_error(exc))

    return handle


def _address(server: Server) -> tuple[str, int] | None:
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            name = sock.getsockname()
            return str(name[0]), int(name[1])
    return None


def _prepare_unix_path(path: str) -> None:
    """Refuse a missing directory (it must exist, private, made by the daemon) and a
    socket another process still listens on; remove a stale one left by a crash."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, "the directory for the WebSocket unix socket does not exist", parent)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "not a socket; will not replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale socket
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process listens on this socket", path)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await whatever still runs on the loop (as ``asyncio.run`` does)."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
