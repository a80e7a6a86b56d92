"""/v1/health, /v1/ready, /v1/info, /metrics."""

from __future__ import annotations

import os
from collections.abc import Iterator

import falcon
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from berthd.domain.errors import Forbidden
from berthd.http.deps import Deps
from berthd.http.resources._common import context_of
from berthd.http.wire import send_json

__all__ = ["Health", "Ready", "Info", "Metrics"]


class Health:
    auth = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, {"status": "ok"})


class Ready:
    auth = False

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        try:
            head = self.deps.store.head()
            checks["store"] = "ok"
        except Exception as exc:
            head = -1
            checks["store"] = f"error: {exc}"
        position = self.deps.runner.position
        checks["projections"] = "ok" if head >= 0 and position >= head else f"catching up ({position}/{head})"
        for name, runtime in self.deps.runtimes.items():
            try:
                runtime.ping()
                checks[f"runtime.{name}"] = "ok"
            except Exception as exc:
                checks[f"runtime.{name}"] = f"error: {exc}"
        checks["runtime"] = "ok" if checks.get(f"runtime.{self.deps.default_runtime}") == "ok" else "error"
        for name, check in self.deps.ready_checks.items():
            try:
                checks[name] = check()
            except Exception as exc:
                checks[name] = f"error: {exc}"
        ready = all(v == "ok" for k, v in checks.items() if not k.startswith("runtime."))
        send_json(resp, {"ready": ready, "checks": checks}, falcon.HTTP_200 if ready else falcon.HTTP_503)


def info(deps: Deps) -> dict[str, object]:
    runtimes = {}
    for name, runtime in deps.runtimes.items():
        try:
            runtime.ping()
            available = True
        except Exception:
            available = False
        runtimes[name] = {"available": available, "isolation": runtime.isolation,
                          "enforced": runtime.enforcement()}
    default = deps.runtimes[deps.default_runtime]
    out: dict[str, object] = {
        "version": deps.version,
        "node_id": deps.node_id,
        "pid": os.getpid(),
        "runtimes": runtimes,
        "default_runtime": deps.default_runtime,
        "isolation": default.isolation,
        "security": default.security.describe(),
        "counts": {
            "containers": deps.containers.counts(),
            "kernels": deps.kernels_view.counts(),
            "kernel_actors": deps.kernels.live_actors if deps.kernels is not None else 0,
            "sessions": deps.sessions_view.counts(),
            "session_actors": deps.sessions.live_actors if deps.sessions is not None else 0,
            "actors": deps.supervisor.live_actors,
            "activations": deps.supervisor.activations,
            "passivations": deps.supervisor.passivations,
        },
        "log_position": deps.store.head(),
        "projection_position": deps.runner.position,
    }
    if default.isolation == "none":
        out["warnings"] = ["isolation: none — local sandboxes are plain processes; install bubblewrap"]
    if deps.pool is not None:
        out["pool"] = deps.pool.stats()
    if deps.info_extra is not None:
        out.update(deps.info_extra())
    return out


class Info:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, info(self.deps))


class _Collector:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("berthd_containers", "Containers by status", labels=["status"])
        for status, n in self.deps.containers.counts().items():
            g.add_metric([status], n)
        yield g
        yield GaugeMetricFamily("berthd_log_position", "Position of the last event in the log",
                                value=self.deps.store.head())
        yield GaugeMetricFamily("berthd_projection_position", "Position the projections have reached",
                                value=self.deps.runner.position)
        yield GaugeMetricFamily("berthd_live_actors", "Entity actors currently active",
                                value=self.deps.supervisor.live_actors)


class Metrics:
    """Node-wide figures (every key's entities counted together): for admin keys. A
    Prometheus scrape sends one with ``authorization: {credentials: KEY}``."""

    def __init__(self, deps: Deps) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(deps))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not context_of(req).is_admin:
            raise Forbidden("the metrics cover every key's entities: they need an admin key")
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = generate_latest(self.registry)
