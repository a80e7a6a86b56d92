"""``Daemon``: start in order, stop in reverse, in ``finally``, with a backstop.

Boot = lock the data dir → open the store → projections (checkpoints, then the tail) → runtimes and their
watchers → reconcile the log with the runtimes → admin key → listeners → endpoints.json.
Stop = the other way, then ``ActorRegistry.stop_all()`` for anything left.

The data dir is private (docs/security.md): it is made, or tightened if it exists, 0700,
and what the daemon keeps there is 0600 whatever the umask: the SQLite log (created 0600
before SQLite opens it, so its -wal and -shm, which SQLite gives the database's mode, are
too), idempotency.db, the checkpoints, admin.key, node-id, endpoints.json. Files left
group/world readable by an older version are tightened at start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import pykka

import berthd
from berthd.actors import (
    SYSTEM,
    Clock,
    ImageService,
    Supervisor,
    append_retrying,
    rfc3339,
    system_clock,
)
from berthd.actors.kernel import KernelSupervisor
from berthd.actors.pool import PoolKey, WarmPool
from berthd.actors.session import SessionSupervisor
from berthd.daemon.config import Config, parse_listen
from berthd.domain import EVENT_TYPES
from berthd.domain.node import ApiKeyCreated, NodeStarted, NodeStopped
from berthd.events import open_store
from berthd.events.projection import CheckpointDir, ProjectionRunner
from berthd.events.readmodels import (
    AuditView,
    ContainersView,
    ImagesView,
    KernelsView,
    KeysView,
    ResultsView,
    SessionsView,
)
from berthd.events.store import EventStore
from berthd.http.app import create_app
from berthd.http.auth import Authenticator, hash_key
from berthd.http.deps import Deps, Limits
from berthd.http.idempotency import IdempotencyStore
from berthd.http.keypolicy import KeyDefaults
from berthd.http.server import HttpServers, ServerLimits
from berthd.http.ws import WebSocketServer
from berthd.kernel.exec_agent import exec_agents
from berthd.runtime.base import Runtime, RuntimeError_
from berthd.runtime.security import configure_security

__all__ = ["Daemon", "DaemonError", "store_url"]

log = logging.getLogger("berthd")

DEFAULT_KERNEL_IMAGES = {"docker": "python:3.11-slim", "local": "host"}
"""A kernel's sandbox image unless the request or ``kernel_image`` says otherwise."""


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def store_url(config: Config) -> str:
    if config.store == "sqlite":
        return str(pathlib.Path(config.data_dir) / "berthd.db")
    return config.store


class Daemon:
    def __init__(self, config: Config, *, runtimes: dict[str, Runtime] | None = None,
                 clock: Clock = system_clock, out: TextIO | None = None, session_tick: float = 1.0) -> None:
        self.config = config
        self.clock = clock
        self.session_tick = session_tick  # seconds between looks for expired sessions
        self.out = out
        self._given_runtimes = runtimes
        self.data_dir = pathlib.Path(config.data_dir).expanduser().resolve()
        self._lock_fd: int | None = None
        self._stack: list[tuple[str, Any]] = []
        self.stopped = threading.Event()
        self.deps: Deps | None = None
        self.http: HttpServers | None = None
        self.ws: WebSocketServer | None = None
        self.endpoints: dict[str, str] = {}

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop(reason="failed start")
            raise

    def _start(self) -> None:
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_dir(self.data_dir)  # an existing one too: it holds the log and the admin key
        self._lock_data_dir()
        _tighten(self.data_dir, _OWN_FILES)
        node_id = cfg.node_id or self._node_id()
        self.node_id = node_id

        if cfg.store == "sqlite":
            for suffix in ("", "-wal", "-shm"):  # SQLite makes -wal/-shm with the db's mode
                _private_file(self.data_dir / f"berthd.db{suffix}", create=not suffix)
        store = open_store(store_url(cfg), EVENT_TYPES)
        self._push("store", store.close)
        self.store = store

        containers, images_view, audit, keys = ContainersView(), ImagesView(), AuditView(), KeysView()
        kernels_view, results, sessions_view = KernelsView(), ResultsView(), SessionsView()
        # checkpoints: only the log's tail is replayed at boot (none for a memory store)
        checkpoints = None if cfg.store in ("memory", "memory://") else _PrivateCheckpoints(self.data_dir / "checkpoints")
        runner = ProjectionRunner(store, [containers, images_view, audit, keys, kernels_view, results,
                                          sessions_view], checkpoints=checkpoints)
        runner.restore_checkpoints()
        runner.catch_up()
        runner.start()

        def stop_projections() -> None:
            runner.stop()
            runner.save_checkpoints()

        self._push("projections", stop_projections)

        runtimes, default = self._runtimes(node_id)
        configure_security(runtimes, cfg, str(self.data_dir))  # profiles, mount and host roots
        for name, runtime in runtimes.items():
            self._push(f"runtime {name}", runtime.close)
            # end the exec agents (they would otherwise wait out their heartbeat on Docker)
            self._push(f"exec agents {name}", exec_agents(runtime).close)
        workers = ThreadPoolExecutor(max_workers=256, thread_name_prefix="berthd-worker")
        self._push("workers", lambda: workers.shutdown(wait=False, cancel_futures=True))

        supervisor = Supervisor(
            store=store, runtimes=runtimes, default_runtime=default, workers=workers, clock=self.clock,
            node_id=node_id, name_taken=containers.name_taken, is_known=lambda i: i in containers.by_id,
            passivate_after=cfg.passivate_after,
            ask_timeout=30.0,
        )
        supervisor.start()
        self._push("supervisor", supervisor.stop)
        counts = supervisor.reconcile(containers.all())
        log.info("reconciled %d containers with the runtimes (%d failed, %d orphans reported)",
                 counts["checked"], counts["failed"], counts["orphans"])
        kernels = KernelSupervisor(
            store=store, runtimes=runtimes, default_runtime=default, containers=supervisor, workers=workers,
            clock=self.clock, node_id=node_id,
            kernel_images={name: cfg.kernel_image or DEFAULT_KERNEL_IMAGES.get(name, "host")
                           for name in runtimes},
            find_container=containers.get, name_taken=kernels_view.name_taken,
            kernel_of_container=kernels_view.kernel_of, output_cap=cfg.limits.output_cap_bytes,
            passivate_after=cfg.passivate_after, queue_depth=cfg.queue_depth,
        )
        supervisor.exit_listeners.append(kernels.on_container_exit)
        self._push("kernels", kernels.stop)
        kcounts = kernels.reconcile(kernels_view.all())
        log.info("reconnected %d kernels (%d failed)", kcounts["checked"], kcounts["failed"])
        sessions = SessionSupervisor(
            store=store, kernels=kernels, containers=supervisor, workers=workers, clock=self.clock,
            node_id=node_id, name_taken=sessions_view.name_taken, active=sessions_view.active,
            ended=sessions_view.ended, kernel_view=kernels_view.get,
            passivate_after=cfg.passivate_after,
            output_cap=cfg.limits.output_cap_bytes, tick=self.session_tick,
            queue_depth=cfg.queue_depth,
        )
        self._push("sessions", sessions.stop)
        sessions.start()  # sessions due while the daemon was down expire now; the timer does the rest
        log.info("sessions: %d expired at start", sessions.expired)

        pool_image = cfg.pool_image or ("host" if default == "local" else "busybox:latest")
        pool = WarmPool(supervisor, containers, default_image=pool_image, size=cfg.pool_size,
                        # warm at start what surely exists: the host image, or an image the operator named
                        warm=[PoolKey(default, pool_image)] if cfg.pool_size and (default == "local" or cfg.pool_image)
                        else [])
        pool.start()
        self._push("pool", pool.stop)

        extra_admin: tuple[str, ...] = ()
        env_key = os.environ.get("BERTHD_ADMIN_KEY")
        if env_key:
            extra_admin = (hash_key(env_key),)
        else:
            self._ensure_admin_key(store, keys, runner)
        auth = Authenticator(keys, extra_admin)

        default_rt = runtimes[default]
        append_retrying(store, f"node-{node_id}", [NodeStarted(
            version=berthd.__version__, runtime=default, isolation=default_rt.isolation, pid=os.getpid(),
        )], SYSTEM.meta(self.clock, node_id))
        if default_rt.isolation == "none":
            log.warning("isolation: none — local sandboxes run as plain processes on this host; "
                        "install bubblewrap (apt-get install bubblewrap) for isolation")

        limits = Limits(**{f: getattr(cfg.limits, f) for f in cfg.limits.__struct_fields__})
        for suffix in ("", "-wal", "-shm"):
            _private_file(self.data_dir / f"idempotency.db{suffix}", create=not suffix)
        idempotency = IdempotencyStore(str(self.data_dir / "idempotency.db"), self.clock, cfg.idempotency_ttl)
        self._push("idempotency", idempotency.close)
        self.deps = Deps(
            store=store, runner=runner, containers=containers, images_view=images_view, audit=audit,
            supervisor=supervisor, images=ImageService(store=store, runtimes=runtimes, default_runtime=default,
                                                       clock=self.clock, node_id=node_id),
            runtimes=runtimes, default_runtime=default, auth=auth, clock=self.clock, node_id=node_id,
            version=berthd.__version__, limits=limits,
            kernels=kernels, kernels_view=kernels_view, results=results, pool=pool,
            sessions=sessions, sessions_view=sessions_view,
            keys=keys, idempotency=idempotency, key_defaults=KeyDefaults(
                rate_limits={"general": cfg.rate_limits.general, "executions": cfg.rate_limits.executions,
                             "sessions": cfg.rate_limits.sessions},
                quotas={"containers": cfg.quotas.containers, "kernels": cfg.quotas.kernels,
                        "sessions": cfg.quotas.sessions}),
        )
        self._listen()
        self._write_endpoints()
        log.info("berthd %s ready: node %s, runtime %s (isolation %s), store %s, http %s, ws %s",
                 berthd.__version__, node_id, default, default_rt.isolation, _redact(store_url(cfg)),
                 self.endpoints.get("http", "-"), self.endpoints.get("ws", "-"))

    def _listen(self) -> None:
        assert self.deps is not None
        cfg = self.config
        http_addr = parse_listen(cfg.listen, "--listen")
        ws_addr = parse_listen(cfg.ws_listen, "--ws-listen")
        sock_dir = self.data_dir / "run"
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(sock_dir, 0o700)
        app = create_app(self.deps)
        s = cfg.server
        self.http = HttpServers(
            app, http_addr[0] if http_addr else None, http_addr[1] if http_addr else None,
            str(sock_dir / "berthd.sock") if cfg.socket else None,
            ServerLimits(threads=s.threads, connection_limit=s.connection_limit,
                         channel_timeout=s.channel_timeout, header_timeout=s.header_timeout,
                         request_timeout=s.request_timeout, per_client_connections=s.per_client_connections,
                         max_request_body_size=2 * cfg.limits.max_body_bytes + (1 << 20),
                         max_body_bytes=cfg.limits.max_body_bytes),
        )
        self.http.start()
        self._push("http", self.http.stop)
        self.ws = WebSocketServer(self.deps, ws_addr[0] if ws_addr else None, ws_addr[1] if ws_addr else None,
                                  str(sock_dir / "berthd-ws.sock") if cfg.socket else None)
        self.ws.start()
        self._push("websocket", self.ws.stop)
        # the documented places: links in the data dir to the sockets in the private dir
        for name in ("berthd.sock", "berthd-ws.sock"):
            link = self.data_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            if cfg.socket:
                link.symlink_to(sock_dir / name)
                self._push(f"link {name}", lambda link=link: link.unlink(missing_ok=True))
        endpoints: dict[str, str] = {}
        if self.http.tcp_address:
            endpoints["http"] = _fmt(self.http.tcp_address)
        if self.ws.tcp_address:
            endpoints["ws"] = _fmt(self.ws.tcp_address)
        if cfg.socket:
            endpoints["socket"] = str(self.data_dir / "berthd.sock")
            endpoints["ws_socket"] = str(self.data_dir / "berthd-ws.sock")
        self.endpoints = endpoints

    def _write_endpoints(self) -> None:
        path = self.data_dir / "endpoints.json"
        tmp = path.with_suffix(".tmp")
        _write_private(tmp, json.dumps(self.endpoints, indent=2) + "\n")
        os.replace(tmp, path)
        self._push("endpoints.json", lambda: path.unlink(missing_ok=True))

    # ------------------------------------------------------------------ stop

    def stop(self, reason: str = "signal") -> None:
        """Stop everything started, in reverse; safe to call twice."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        store_closer = next((closer for name, closer in self._stack if name == "store"), None)
        if store_closer is not None and getattr(self, "node_id", None):
            try:
                append_retrying(self.store, f"node-{self.node_id}", [NodeStopped(reason=reason)],
                                SYSTEM.meta(self.clock, self.node_id))
            except Exception as exc:
                log.warning("could not record the stop: %s", exc)
        while self._stack:
            name, closer = self._stack.pop()
            try:
                closer()
            except Exception:
                log.exception("stopping %s", name)
        left = pykka.ActorRegistry.get_all()
        if left:
            log.warning("%d actors still alive at shutdown; stopping them", len(left))
            pykka.ActorRegistry.stop_all(timeout=10)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("berthd stopped (%s)", reason)

    def serve_until(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (signal handlers only set it), then stop."""
        try:
            stop.wait()
        finally:
            self.stop()

    # ------------------------------------------------------------------ pieces

    def _push(self, name: str, closer: Any) -> None:
        self._stack.append((name, closer))

    def _lock_data_dir(self) -> None:
        path = self.data_dir / "berthd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise DaemonError(f"another berthd (pid {other or '?'}) is already serving {self.data_dir}; "
                              "stop it first or use another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _node_id(self) -> str:
        path = self.data_dir / "node-id"
        if path.exists():
            return path.read_text().strip()
        node_id = secrets.token_hex(6)
        _write_private(path, node_id + "\n")
        return node_id

    def _runtimes(self, node_id: str) -> tuple[dict[str, Runtime], str]:
        if self._given_runtimes is not None:
            given = dict(self._given_runtimes)
            return given, self.config.runtime if self.config.runtime in given else next(iter(given))
        from berthd.runtime.docker import DockerRuntime
        from berthd.runtime.local import LocalRuntime

        wanted = self.config.runtime
        runtimes: dict[str, Runtime] = {}
        docker_error = ""
        if wanted in ("auto", "docker"):
            try:
                docker_rt = DockerRuntime(node_id, timeout=self.config.docker_timeout)
                docker_rt.ping()
                runtimes["docker"] = docker_rt
            except (RuntimeError_, Exception) as exc:  # the SDK raises many kinds
                docker_error = str(exc)
                if wanted == "docker":
                    raise DaemonError(f"--runtime docker, but no Docker engine answers: {exc}. "
                                      "Start one, set DOCKER_HOST, or use --runtime local") from None
                log.info("no Docker engine answers (%s): using the local runtime", exc)
        runtimes["local"] = LocalRuntime(self._sandbox_dir(node_id), node_id)
        default = "docker" if "docker" in runtimes and wanted != "local" else "local"
        if docker_error:
            log.debug("docker unavailable: %s", docker_error)
        return runtimes, default

    def _sandbox_dir(self, node_id: str) -> str:
        """Where local sandboxes live. The data dir stays private (0700: it holds the log
        and the admin key), so as root — when sandboxes run as their own uids and must
        traverse every parent — they go under /var/lib/berthd instead."""
        if self.config.sandbox_dir:
            return self.config.sandbox_dir
        if os.geteuid() != 0:
            return str(self.data_dir / "sandboxes")
        base = pathlib.Path("/var/lib/berthd")
        base.mkdir(mode=0o711, exist_ok=True)
        (base / "sandboxes").mkdir(mode=0o711, exist_ok=True)
        return str(base / "sandboxes" / node_id)

    def _ensure_admin_key(self, store: EventStore, keys: KeysView, runner: ProjectionRunner) -> None:
        """Make the admin key on first start: only its hash goes to the log; the secret is
        written once to a 0600 file and printed."""
        path = self.data_dir / "admin.key"
        secret: str | None = None
        if path.exists():
            secret = path.read_text().strip()
            if hash_key(secret) in keys.by_hash:
                return
        elif "admin" in keys.by_id:
            return  # made before; its file was deleted on purpose: nothing to print again
        printed = secret is None
        if secret is None:
            secret = "berthd_" + secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secret + "\n")
        position = append_retrying(store, "key-admin", [ApiKeyCreated(
            key_id="admin", name="admin", role="admin", key_hash=hash_key(secret),
            created_at=rfc3339(self.clock()),
        )], SYSTEM.meta(self.clock, self.node_id))
        runner.wait_for(position, 10.0)
        if printed:
            msg = (f"berthd: admin API key created and saved to {path} (mode 0600):\n"
                   f"  {secret}\n"
                   "  use it as 'Authorization: Bearer KEY'; it is not shown again.\n")
            if self.out is not None:
                self.out.write(msg)
                self.out.flush()


class _PrivateCheckpoints(CheckpointDir):
    """Checkpoints written 0600 in a 0700 directory (``CheckpointDir`` follows the umask)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if self.path.is_dir() and not self.path.is_symlink():
            os.chmod(self.path, 0o700)
            _tighten(self.path)

    def write(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.file(name)
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # a .tmp left by a crash kept its old mode
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)


def _private_file(path: pathlib.Path, *, create: bool) -> None:
    """``path`` 0600: made empty if missing and ``create``, tightened if it exists."""
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _write_private(path: pathlib.Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


_OWN_FILES = frozenset({
    "berthd.db", "berthd.db-wal", "berthd.db-shm", "idempotency.db", "idempotency.db-wal",
    "idempotency.db-shm", "admin.key", "node-id", "endpoints.json", "berthd.lock",
})
"""What berthd keeps directly in its data dir (only these are tightened: the directory may
be one the operator shares with other files)."""


def _private_dir(directory: pathlib.Path) -> None:
    """0700 when this user owns it; another owner's directory is left as it is, said once."""
    st = directory.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 == 0:
        return
    try:
        os.chmod(directory, stat.S_IMODE(st.st_mode) & 0o700)
    except PermissionError:
        log.warning("data dir %s is open to others (mode %o) and not ours to tighten",
                    directory, stat.S_IMODE(st.st_mode))


def _tighten(directory: pathlib.Path, names: frozenset[str] | None = None) -> None:
    """Take group and world access off the regular files directly in ``directory`` (only
    those in ``names``, if given)."""
    for entry in os.scandir(directory):
        if names is not None and entry.name not in names:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.chmod(entry.path, stat.S_IMODE(st.st_mode) & 0o700)
        except FileNotFoundError:
            continue


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact(url: str) -> str:
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


