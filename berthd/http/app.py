"""``create_app(deps)``: the Falcon application. No module globals: everything it uses
comes in ``deps``, so tests build as many apps as they like."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from berthd.domain import container as c
from berthd.domain import kernel as kd
from berthd.http.deps import Deps
from berthd.http.errors import register_error_handlers
from berthd.http.idempotency import IdempotencyMiddleware
from berthd.http.keypolicy import KeyPolicy, QuotaKind
from berthd.http.middleware import AuthMiddleware, RequestIds
from berthd.http.openapi import DocsAsset, DocsResource, OpenAPIResource
from berthd.http.precondition import IfMatchMiddleware, Versioned
from berthd.http.quota import QuotaMiddleware
from berthd.http.ratelimit import RateLimiter, RateLimitMiddleware
from berthd.http.resources import (
    containers,
    events,
    host,
    images,
    kernels,
    keys,
    run,
    sessions,
    system,
)

__all__ = ["create_app"]


def create_app(deps: Deps) -> falcon.App[Any, Any]:
    """Middleware in order: ids → who asks (401) → rate limit (429) → Idempotency-Key
    (replay, 409, 422) → quotas (403) → If-Match (412) → the resource."""
    policy = KeyPolicy(deps.keys, deps.key_defaults)
    if deps.rate_limiter is None:
        deps.rate_limiter = RateLimiter(policy.limits_of)
    middleware: list[Any] = [RequestIds(), AuthMiddleware(deps.auth), RateLimitMiddleware(deps.rate_limiter, deps.auth)]
    if deps.idempotency is not None:
        middleware.append(IdempotencyMiddleware(deps.idempotency, deps.limits.max_body_bytes))
    middleware.append(QuotaMiddleware(policy, lambda owner, kind: _live(deps, owner, kind)))
    middleware.append(IfMatchMiddleware(_finders(deps)))
    app: falcon.App[Any, Any] = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.auto_parse_qs_csv = True
    register_error_handlers(app)

    app.add_route("/v1/health", system.Health())
    app.add_route("/v1/ready", system.Ready(deps))
    app.add_route("/v1/info", system.Info(deps))
    app.add_route("/metrics", system.Metrics(deps))
    app.add_route("/openapi.json", OpenAPIResource(deps.version))
    app.add_route("/docs", DocsResource())
    app.add_route("/docs/{name}", DocsAsset())

    app.add_route("/v1/images", images.ImageCollection(deps))
    app.add_route("/v1/images/pull", images.ImagePull(deps))
    app.add_route("/v1/images/{ref:path}", images.ImageItem(deps))

    app.add_route("/v1/containers", containers.ContainerCollection(deps))
    app.add_route("/v1/containers/{id}", containers.ContainerItem(deps))
    app.add_route("/v1/containers/{id}/exec", containers.ContainerExec(deps))
    app.add_route("/v1/containers/{id}/logs", containers.ContainerLogs(deps))
    app.add_route("/v1/containers/{id}/files", containers.ContainerFiles(deps))
    app.add_route("/v1/containers/{id}/{action}", containers.ContainerAction(deps))

    if deps.pool is not None:
        app.add_route("/v1/run", run.RunResource(deps, deps.pool))
    app.add_route("/v1/kernels", kernels.KernelCollection(deps))
    app.add_route("/v1/kernels/{id}", kernels.KernelItem(deps))
    app.add_route("/v1/kernels/{id}/{action}", kernels.KernelAction(deps))
    app.add_route("/v1/results/{id}", kernels.ResultItem(deps))
    app.add_route("/v1/sessions", sessions.SessionCollection(deps))
    app.add_route("/v1/sessions/{id}", sessions.SessionItem(deps))
    app.add_route("/v1/sessions/{id}/{action}", sessions.SessionAction(deps))

    app.add_route("/v1/events", events.EventCollection(deps))
    app.add_route("/v1/audit", events.AuditCollection(deps))
    app.add_route("/v1/host/directories", host.HostDirectories(deps))
    app.add_route("/v1/keys", keys.KeyCollection(deps))
    app.add_route("/v1/keys/{id}", keys.KeyItem(deps))
    return app


def _live(deps: Deps, owner: str, kind: QuotaKind) -> int:
    """An owner's live entities of one kind, as the read models have them."""
    if kind == "containers":
        return sum(1 for s in deps.containers.all() if s.owner == owner and s.status not in c.FINAL)
    if kind == "kernels":
        return sum(1 for k in deps.kernels_view.all() if k.owner == owner and k.status not in kd.FINAL)
    return sum(1 for s in deps.sessions_view.active() if s.owner == owner)


def _finders(deps: Deps) -> dict[str, Callable[[str], Versioned | None]]:
    """If-Match: the routes that mutate one entity, and how to find it by its {id}."""
    out: dict[str, Callable[[str], Versioned | None]] = {}
    for template in ("/v1/containers/{id}", "/v1/containers/{id}/exec", "/v1/containers/{id}/files",
                     "/v1/containers/{id}/{action}"):
        out[template] = deps.containers.get
    for template in ("/v1/kernels/{id}", "/v1/kernels/{id}/{action}"):
        out[template] = deps.kernels_view.get
    for template in ("/v1/sessions/{id}", "/v1/sessions/{id}/{action}"):
        out[template] = deps.sessions_view.get
    return out
