"""The ``berthd`` command: ``serve``, ``replay``, ``audit``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence

import berthd
from berthd.daemon.config import Config, ConfigError, load_config
from berthd.daemon.lifecycle import Daemon, DaemonError, store_url
from berthd.events.store import EventStore

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berthd", description="Sandboxes, kernels and sessions for agents.")
    p.add_argument("--version", action="version", version=f"berthd {berthd.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--data-dir", help="data directory (default $BERTHD_HOME or ~/.local/share/berthd)")
    serve.add_argument("--listen", help="HTTP HOST:PORT (default 127.0.0.1:8080; port 0 = any free)")
    serve.add_argument("--ws-listen", help="WebSocket HOST:PORT (default 127.0.0.1:8081)")
    serve.add_argument("--runtime", choices=["auto", "docker", "local"], help="default runtime")
    serve.add_argument("--store", help="sqlite (default), memory, or postgresql://user:pass@host:port/db")
    serve.add_argument("--config", help="TOML config file (default DATA_DIR/berthd.toml if present)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    for name, helptext in (("replay", "rebuild every projection from the log and print counts"),
                           ("audit", "print who did what, when")):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--data-dir")
        cmd.add_argument("--store")
        cmd.add_argument("--config")
        if name == "audit":
            cmd.add_argument("--entity", help="an entity id (or a container name)")
            cmd.add_argument("--since", help="RFC 3339 time, e.g. 2026-11-22T10:00:00Z")
            cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items()
             if k in ("data_dir", "listen", "ws_listen", "runtime", "store", "config", "log_level")}
    try:
        config = load_config(flags)
    except ConfigError as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level != "debug":
        # one line per WebSocket connection is noise at info level
        logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.command == "serve":
        return _serve(config)
    if args.command == "replay":
        return _replay(config)
    return _audit(config, args.entity, args.since, args.json)


def _serve(config: Config) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()  # signals only set an event; the main thread stops the daemon

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(config, out=sys.stdout)
    try:
        daemon.start()
    except DaemonError as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        return 1
    print(f"berthd ready: http {daemon.endpoints.get('http', '-')}, ws {daemon.endpoints.get('ws', '-')}, "
          f"socket {daemon.endpoints.get('socket', '-')}", flush=True)
    daemon.serve_until(stop)
    return 0


def _open(config: Config) -> EventStore:
    from berthd.domain import EVENT_TYPES
    from berthd.events import open_store

    return open_store(store_url(config), EVENT_TYPES)


def _replay(config: Config) -> int:
    from berthd.events.projection import ProjectionRunner
    from berthd.events.readmodels import AuditView, ContainersView, ImagesView, KeysView

    store = _open(config)
    try:
        containers, images, audit, keys = ContainersView(), ImagesView(), AuditView(), KeysView()
        runner = ProjectionRunner(store, [containers, images, audit, keys])
        runner.rebuild()
        types = Counter(e.type for e in audit.entries)
        print(f"log: {runner.position} events, {len(audit.by_entity)} streams")
        print(f"containers: {len(containers.by_id)} " + _fmt_counts(containers.counts()))
        print(f"images: {len(images.by_ref)} " + _fmt_counts(Counter(i.status for i in images.by_ref.values())))
        print(f"keys: {len(keys.by_id)}")
        print(f"audit entries: {len(audit.entries)}")
        for name, n in sorted(types.items()):
            print(f"  {name}: {n}")
    finally:
        store.close()
    return 0


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


def _audit(config: Config, entity: str | None, since: str | None, as_json: bool) -> int:
    import msgspec

    from berthd.events.readmodels import ContainersView

    store = _open(config)
    try:
        if entity is not None:
            names = ContainersView()
            position = 0
            while batch := store.read_all(after=position, limit=1000):
                for rec in batch:
                    names.apply(rec)
                position = batch[-1].position
            found = names.get(entity) or next((s for s in names.by_id.values() if s.name == entity), None)
            if found is not None:
                entity = found.id
        position = 0
        while batch := store.read_all(after=position, limit=1000):
            for rec in batch:
                if entity is not None and rec.stream_id != entity:
                    continue
                if since is not None and rec.meta.timestamp < since:
                    continue
                if as_json:
                    sys.stdout.write(msgspec.json.encode(rec.as_served()).decode() + "\n")
                else:
                    m = rec.meta
                    print(f"{m.timestamp}  {m.principal or '-':<10} {rec.kind}/{rec.stream_id}  {rec.type}"
                          f"  pos={rec.position}" + (f"  corr={m.correlation_id}" if m.correlation_id else ""))
            position = batch[-1].position
    finally:
        store.close()
    return 0
