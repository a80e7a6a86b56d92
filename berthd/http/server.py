"""Waitress servers for the Falcon app: one on TCP, one on the unix socket, each on its
own thread (one waitress server cannot listen on both at once).

Limits are set deliberately rather than left at waitress's defaults (which bind every
interface, accept 1 GiB bodies and 100 connections).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from waitress import wasyncore

from berthd.http._guard import SlowClientLimits, guarded_server
from berthd.http.middleware import trusted

__all__ = ["HttpServers", "ServerLimits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    threads: int = 16
    connection_limit: int = 200
    channel_timeout: int = 120  # seconds an idle or slow connection is kept
    max_request_body_size: int = 64 << 20  # waitress refuses a body this big before reading it
    max_body_bytes: int | None = None  # the API's own body cap, the limit a 413 names (None: the above)
    max_request_header_size: int = 64 << 10
    header_timeout: float = 10.0  # slowloris: the headers must arrive within this
    request_timeout: float = 120.0  # ... and the whole request within this
    per_client_connections: int = 100  # TCP connections one client address may hold


class HttpServers:
    def __init__(self, app: Callable[..., Iterable[bytes]], host: str | None, port: int | None,
                 unix_path: str | None, limits: ServerLimits = ServerLimits()) -> None:
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []
        opts = dict(
            threads=limits.threads, connection_limit=limits.connection_limit,
            channel_timeout=limits.channel_timeout, max_request_body_size=limits.max_request_body_size,
            max_request_header_size=limits.max_request_header_size, ident="berthd",
            clear_untrusted_proxy_headers=True, expose_tracebacks=False,
            cleanup_interval=min(2, limits.channel_timeout),  # how often the deadlines are checked
        )
        guard = SlowClientLimits(limits.header_timeout, limits.request_timeout, limits.per_client_connections)
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path = unix_path
        if host is not None and port is not None:
            server = guarded_server(app, guard, limits.max_body_bytes, host=host, port=port, **opts)
            self._servers.append(server)
            addr = server.socket.getsockname()
            self.tcp_address = (addr[0], addr[1])
        if unix_path is not None:
            if os.path.exists(unix_path):
                os.unlink(unix_path)
            server = guarded_server(trusted(app), guard, limits.max_body_bytes, unix_socket=unix_path,
                                    unix_socket_perms="660", **opts)
            self._servers.append(server)

    def start(self) -> None:
        for server in self._servers:
            t = threading.Thread(target=self._run, args=(server,), name="berthd-http", daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _run(server: Any) -> None:
        try:
            server.run()
        except Exception:  # closing the sockets ends run() with an error on some paths
            log.debug("http server loop ended", exc_info=True)

    def stop(self) -> None:
        """Close listeners and every open connection, then let the loops end."""
        for server in self._servers:
            try:
                server.task_dispatcher.shutdown(timeout=5)
            except Exception:
                log.debug("stopping http workers", exc_info=True)
            try:
                wasyncore.close_all(server._map)
            except Exception:
                log.debug("closing http server", exc_info=True)
        for t in self._threads:
            t.join(timeout=5)
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)
