"""The OpenAPI 3.1 document, generated once at start from the msgspec types that the
resources really decode and send, and the Swagger UI at /docs (swagger-ui-bundle)."""

from __future__ import annotations

import mimetypes
import pathlib
from typing import Any

import falcon
import msgspec
import swagger_ui_bundle

from berthd.domain import container as c
from berthd.domain import image as im
from berthd.domain import kernel as k
from berthd.domain import session as se
from berthd.http import views as v
from berthd.http.resources import sessions as sv

__all__ = ["build_openapi", "OpenAPIResource", "DocsResource", "DocsAsset"]

_ERR = {"$ref": "#/components/schemas/ErrorBody"}


def _ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: int, ok_schema: dict[str, Any] | None, body: type | None = None,
        params: list[dict[str, Any]] | None = None, errors: tuple[int, ...] = (400, 401, 404, 409, 503),
        auth: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        str(ok): {"description": "OK", **(_json(ok_schema) if ok_schema else {})}}}
    for status in errors:
        op["responses"][str(status)] = {"description": "error", **_json(_ERR)}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(_ref(body))}
    if params:
        op["parameters"] = params
    if not auth:
        op["security"] = []
    return op


def _q(name: str, kind: str = "string", desc: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}, "description": desc}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
       "description": "container id or name"}
_KID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "kernel id or name"}
_SID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "session id or name"}
_LIST = [_q("limit", "integer"), _q("offset", "integer")]


def build_openapi(version: str) -> dict[str, Any]:
    types: list[type] = [
        c.CreateContainer, c.StartContainer, c.StopContainer, c.RestartContainer, c.KillContainer,
        c.ExecInContainer, im.PullImage, v.ContainerView, v.ContainerList, v.ExecView, v.ImageView,
        v.ImageList, v.EventView, v.EventList, v.RemovedView, v.ErrorBody,
        k.CreateKernel, k.ExecuteCode, v.KernelView, v.KernelList, v.ResultView,
        se.CreateSession, se.ExecuteInSession, se.ExecuteWithRetry, sv.SessionView, sv.SessionList,
        sv.SessionResultView, sv.RetryResultView,
    ]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    obj = {"type": "object"}
    paths: dict[str, Any] = {
        "/v1/health": {"get": _op("Liveness", 200, obj, errors=(), auth=False)},
        "/v1/ready": {"get": _op("Readiness: store, projections, runtimes", 200, obj, errors=(503,), auth=False)},
        "/v1/info": {"get": _op("Version, node, runtimes, isolation, counts, log position", 200, obj, errors=(401,))},
        "/v1/images": {"get": _op("List images of every runtime", 200, _ref(v.ImageList),
                                  params=[*_LIST, _q("runtime")], errors=(400, 401, 503))},
        "/v1/images/pull": {"post": _op("Pull an image (progress on the event stream)", 200,
                                        _ref(v.ImageView), im.PullImage, errors=(400, 401, 404, 502, 503))},
        "/v1/images/{ref}": {"delete": _op("Remove an image", 200, obj, params=[
            {"name": "ref", "in": "path", "required": True, "schema": {"type": "string"}}, _q("force", "boolean")])},
        "/v1/containers": {
            "post": _op("Create (and by default start) a container", 201, _ref(v.ContainerView), c.CreateContainer,
                        errors=(400, 401, 404, 409, 413, 502, 503)),
            "get": _op("List containers", 200, _ref(v.ContainerList),
                       params=[*_LIST, _q("status"), _q("label", desc="key or key=value")], errors=(400, 401)),
        },
        "/v1/containers/{id}": {
            "get": _op("Inspect a container", 200, _ref(v.ContainerView), params=[_ID]),
            "delete": _op("Remove a container", 200, _ref(v.RemovedView), params=[_ID, _q("force", "boolean")]),
        },
        "/v1/containers/{id}/start": {"post": _op("Start", 200, _ref(v.ContainerView), c.StartContainer, [_ID])},
        "/v1/containers/{id}/stop": {"post": _op("Stop (TERM, then KILL after timeout)", 200,
                                                 _ref(v.ContainerView), c.StopContainer, [_ID])},
        "/v1/containers/{id}/restart": {"post": _op("Restart", 200, _ref(v.ContainerView), c.RestartContainer, [_ID])},
        "/v1/containers/{id}/kill": {"post": _op("Send a signal", 200, _ref(v.ContainerView), c.KillContainer, [_ID])},
        "/v1/containers/{id}/exec": {"post": _op("Run a command in a running container", 200,
                                                 _ref(v.ExecView), c.ExecInContainer, [_ID])},
        "/v1/containers/{id}/logs": {"get": _op("The container's output", 200, obj, params=[_ID, _q("tail", "integer")])},
        "/v1/containers/{id}/files": {
            "get": _op("Download a file", 200, None, params=[_ID, _q("path")]),
            "put": {**_op("Upload a file (raw body)", 201, obj, params=[_ID, _q("path")]),
                    "requestBody": {"required": True, "content": {"application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"}}}}},
        },
        "/v1/kernels": {
            "post": _op("Create a kernel (python or bash) in a sandbox of its own or a container", 201,
                        _ref(v.KernelView), k.CreateKernel, errors=(400, 401, 404, 409, 422, 502, 503)),
            "get": _op("List kernels", 200, _ref(v.KernelList), params=[*_LIST, _q("status")],
                       errors=(400, 401)),
        },
        "/v1/kernels/{id}": {
            "get": _op("Inspect a kernel", 200, _ref(v.KernelView), params=[_KID]),
            "delete": _op("Destroy a kernel (and its own sandbox)", 200, _ref(v.KernelView), params=[_KID]),
        },
        "/v1/kernels/{id}/execute": {"post": _op(
            "Run code; 409 KERNEL_DEAD if the kernel died", 200, _ref(v.ResultView), k.ExecuteCode, [_KID])},
        "/v1/kernels/{id}/restart": {"post": _op("Restart (clears state)", 200, _ref(v.KernelView),
                                                 params=[_KID])},
        "/v1/kernels/{id}/interrupt": {"post": _op("Interrupt the running execution", 200, obj,
                                                   params=[_KID])},
        "/v1/results/{id}": {"get": _op("An execution's stored result", 200, _ref(v.ResultView), params=[
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "result id"}], errors=(401, 404))},
        "/v1/sessions": {
            "post": _op("Open a session (its kernel opens at the first execute)", 201, _ref(sv.SessionView),
                        se.CreateSession, errors=(400, 401, 409, 503)),
            "get": _op("List sessions", 200, _ref(sv.SessionList), params=[*_LIST, _q("status")],
                       errors=(400, 401)),
        },
        "/v1/sessions/{id}": {
            "get": _op("Inspect a session", 200, _ref(sv.SessionView), params=[_SID]),
            "delete": _op("Close a session (its kernel and sandbox are destroyed)", 200, _ref(sv.SessionView),
                          params=[_SID]),
        },
        "/v1/sessions/{id}/execute": {"post": _op(
            "Run code in the session's kernel or a command in its sandbox; 403 POLICY_DENIED for a "
            "command outside the policy, 409 SESSION_EXPIRED past its TTL", 200, _ref(sv.SessionResultView),
            se.ExecuteInSession, [_SID], errors=(400, 401, 403, 404, 409, 503))},
        "/v1/sessions/{id}/execute_with_retry": {"post": _op(
            "Run code; on error run on_error_code and retry, up to max_attempts", 200,
            _ref(sv.RetryResultView), se.ExecuteWithRetry, [_SID], errors=(400, 401, 404, 409, 503))},
        "/v1/events": {"get": _op("The event log from a position", 200, _ref(v.EventList), params=[
            _q("after", "integer"), _q("limit", "integer"), _q("type"), _q("kind"), _q("entity")],
            errors=(400, 401))},
        "/v1/audit": {"get": _op("Who did what, when", 200, obj, params=[
            *_LIST, _q("entity"), _q("since"), _q("principal")], errors=(400, 401))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "berthd", "version": version,
                 "description": "Sandboxes, kernels and sessions for AI agents and REST automation."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


class OpenAPIResource:
    auth = False

    def __init__(self, version: str) -> None:
        self.body = msgspec.json.encode(build_openapi(version))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body


_ASSETS = pathlib.Path(swagger_ui_bundle.swagger_ui_path)
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>berthd API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


class DocsResource:
    auth = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = _PAGE


class DocsAsset:
    auth = False

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        path = _ASSETS / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise falcon.HTTPNotFound()
        resp.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        resp.data = path.read_bytes()
