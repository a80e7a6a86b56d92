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

__all__ = ["SlowClientLimits", "guarded_server"]


class SlowClientLimits:
    """The deadlines and the per-address cap (seconds, connections)."""

    __slots__ = ("header_timeout", "request_timeout", "per_client_connections")

    def __init__(self, header_timeout: float = 10.0, request_timeout: float = 120.0,
                 per_client_connections: int = 100) -> None:
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        self.per_client_connections = per_client_connections


class _GuardedChannel(HTTPChannel):  # type: ignore[misc]
    """An HTTP channel that remembers when the request it is reading began."""

    partial_since: float | None = None
    client: str | None = None

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Adjustments,
                 map: dict[int, Any] | None = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        guard: _Guard = server
        self.client = guard.admit(self, addr)

    def received(self, data: bytes) -> bool:
        started = self.request is None
        result: bool = super().received(data)
        if self.request is None:
            self.partial_since = None  # every request in this chunk completed
        elif started or self.partial_since is None:
            self.partial_since = time.monotonic()
        return result

    def handle_close(self) -> None:
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


def guarded_server(app: Any, limits: SlowClientLimits, **kw: Any) -> Any:
    """A waitress server (TCP, or unix with ``unix_socket=``) with the slow-client rules."""
    adj = Adjustments(**kw)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    server: _Guard
    if adj.unix_socket:
        server = _GuardedUnix(app, {}, dispatcher=dispatcher, adj=adj,
                              sockinfo=(socket.AF_UNIX, socket.SOCK_STREAM, None, None))
        server._setup_guard(limits, count_clients=False)
        return server
    if len(adj.listen) != 1:
        raise ValueError("one TCP listen address per server")
    server = _GuardedTcp(app, {}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0])
    server._setup_guard(limits, count_clients=True)
    return server
