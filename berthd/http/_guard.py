"""Slow-client defences for waitress: deadlines for a request to arrive, and a cap on
connections per client address.

waitress reads requests asynchronously, so a slow client costs no worker thread, but it
does hold one of ``connection_limit`` connections for as long as it keeps trickling bytes
(``channel_timeout`` only counts *idle* time). A few hundred slowloris connections would
therefore lock everyone else out. Two rules close that hole:

* a request's headers must arrive within ``header_timeout`` seconds of its first byte, and
  the whole request (body included) within ``request_timeout``; a channel past either
  deadline is closed at the next maintenance pass (every ``cleanup_interval`` seconds);
* one client address holds at most ``per_client_connections`` connections; the next one is
  closed at accept. The unix socket is exempt (its peers are local admins).

The channel also answers waitress's own errors (413, 431, 400, 500) in berthd's JSON shape
(``_waitress_errors``) and, after such an answer, drains the body the client may still be
sending for up to ``LINGER`` seconds before closing, so the client reads the answer rather
than a connection reset.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer, UnixWSGIServer
from waitress.task import ThreadedTaskDispatcher

from berthd.http._waitress_errors import JsonErrorTask

__all__ = ["LINGER", "SlowClientLimits", "guarded_server"]

LINGER = 5.0  # seconds a connection answered with an error keeps draining the request's body


class SlowClientLimits:
    """The deadlines and the per-address cap (seconds, connections)."""

    __slots__ = ("header_timeout", "request_timeout", "per_client_connections")

    def __init__(self, header_timeout: float = 10.0, request_timeout: float = 120.0,
                 per_client_connections: int = 100) -> None:
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        self.per_client_connections = per_client_connections


class _GuardedChannel(HTTPChannel):  # type: ignore[misc]
    """An HTTP channel that remembers when the request it is reading began, and answers the
    errors waitress raises itself (413, 431, 400, ...) in berthd's JSON error shape."""

    error_task_class = JsonErrorTask

    request: Any  # waitress's parser of the request being read (None between requests)
    partial_since: float | None = None
    client: str | None = None
    linger = False  # set by the error task: drain the unread body before closing
    linger_until: float | None = None  # draining since the answer was sent, until then

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Adjustments,
                 map: dict[int, Any] | None = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        guard: _Guard = server
        self.client = guard.admit(self, addr)

    def received(self, data: bytes) -> bool:
        if self.linger_until is not None:  # answered and closing: the rest of the body is dropped
            if time.monotonic() > self.linger_until:
                self.will_close = True
            return True
        started = self.request is None
        result: bool = super().received(data)
        if self.request is None:
            self.partial_since = None  # every request in this chunk completed
        elif started or self.partial_since is None:
            self.partial_since = time.monotonic()
        return result

    def handle_close(self) -> None:
        if self.linger and self.linger_until is None and self.connected and not self.total_outbufs_len:
            # A refused request's body may still be on its way: closing now, with unread
            # bytes, would reset the connection and the client could lose the answer. Send
            # FIN, then read and drop what comes for up to LINGER seconds (the client's FIN
            # or the maintenance pass ends it), as nginx's lingering close does.
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.linger_until = time.monotonic() + LINGER
                self.will_close = False
                if self.request is not None:  # leftover body bytes parsed as a next request
                    self.request.close()
                    self.request = None
                self.partial_since = None
                return
        try:
            super().handle_close()
        finally:
            guard: _Guard = self.server
            guard.release(self)


class _Guard:
    """Mixed into a waitress server: per-client counting and request deadlines."""

    channel_class = _GuardedChannel
    limits: SlowClientLimits
    active_channels: dict[int, Any]
    cut_slow = 0  # channels closed for missing a deadline (for /metrics and tests)
    cut_crowded = 0  # connections refused for the per-client cap
    body_limit: int | None = None  # the API's body cap, named in a waitress 413 (else waitress's own)

    def _setup_guard(self, limits: SlowClientLimits, count_clients: bool) -> None:
        self.limits = limits
        self._count_clients = count_clients
        self._per_client: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def admit(self, channel: _GuardedChannel, addr: Any) -> str | None:
        if not self._count_clients or not isinstance(addr, tuple) or not addr:
            return None
        client = str(addr[0])
        with self._lock:
            if self._per_client[client] >= self.limits.per_client_connections:
                self.cut_crowded += 1
                channel.will_close = True  # closed by the loop before anything is read
                channel.close_when_flushed = True
                return None
            self._per_client[client] += 1
        return client

    def release(self, channel: _GuardedChannel) -> None:
        client, channel.client = channel.client, None
        if client is None:
            return
        with self._lock:
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # type: ignore[misc]
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            linger_until = getattr(channel, "linger_until", None)
            if linger_until is not None and mono > linger_until:
                channel.will_close = True
                continue
            since = getattr(channel, "partial_since", None)
            request = channel.request
            if since is None or request is None:
                continue
            waited = mono - since
            if (not request.headers_finished and waited > self.limits.header_timeout) or \
                    waited > self.limits.request_timeout:
                self.cut_slow += 1
                channel.will_close = True


class _GuardedTcp(_Guard, TcpWSGIServer):  # type: ignore[misc]
    pass


class _GuardedUnix(_Guard, UnixWSGIServer):  # type: ignore[misc]
    pass


def guarded_server(app: Any, limits: SlowClientLimits, body_limit: int | None = None, **kw: Any) -> Any:
    """A waitress server (TCP, or unix with ``unix_socket=``) with the slow-client rules;
    its own errors are JSON, a 413 naming ``body_limit`` as the limit when given."""
    adj = Adjustments(**kw)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    server: _Guard
    if adj.unix_socket:
        server = _GuardedUnix(app, {}, dispatcher=dispatcher, adj=adj,
                              sockinfo=(socket.AF_UNIX, socket.SOCK_STREAM, None, None))
        server._setup_guard(limits, count_clients=False)
        server.body_limit = body_limit
        return server
    if len(adj.listen) != 1:
        raise ValueError("one TCP listen address per server")
    server = _GuardedTcp(app, {}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])
    server._setup_guard(limits, count_clients=True)
    server.body_limit = body_limit
    return server
