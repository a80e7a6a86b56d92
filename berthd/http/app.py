"""``create_app(deps)``: the Falcon application. No module globals: everything it uses
comes in ``deps``, so tests build as many apps as they like."""

from __future__ import annotations

from typing import Any

import falcon

from berthd.http.deps import Deps
from berthd.http.errors import register_error_handlers
from berthd.http.middleware import AuthMiddleware, RequestIds
from berthd.http.openapi import DocsAsset, DocsResource, OpenAPIResource
from berthd.http.resources import containers, events, images, kernels, run, sessions, system

__all__ = ["create_app"]


def create_app(deps: Deps) -> falcon.App[Any, Any]:
    middleware: list[Any] = [RequestIds(), AuthMiddleware(deps.auth)]
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
    return app
