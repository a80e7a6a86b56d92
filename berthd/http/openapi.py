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
from berthd.domain import node as n
from berthd.domain import session as se
from berthd.http import views as v
from berthd.http.resources import host
from berthd.http.resources import keys as kv
from berthd.http.resources import run as rv
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
_KEY = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "key id"}
_LIST = [_q("limit", "integer"), _q("offset", "integer")]

_INT_HEADER = {"schema": {"type": "integer"}}
_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "the budget's requests per minute (limited keys only)", **_INT_HEADER},
    "X-RateLimit-Remaining": {"description": "requests left in the budget now", **_INT_HEADER},
    "X-RateLimit-Reset": {"description": "seconds until the budget is full again", **_INT_HEADER},
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    "description": "a retry with the same key and body replays the first answer (24 h, per key); "
                   "another body: 422 IDEMPOTENCY_KEY_REUSED; while the first runs: 409 IDEMPOTENCY_IN_PROGRESS",
}
_IF_MATCH = {
    "name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "the ETag of the entity as last seen: another version answers 412 PRECONDITION_FAILED",
}
_VERSIONED = ("/v1/containers/{id}", "/v1/kernels/{id}", "/v1/sessions/{id}")
"""Entities served with an ETag, whose mutations honour If-Match (sub-paths included)."""

ERROR_CODES = (
    "VALIDATION_ERROR 400, UNAUTHORIZED 401, FORBIDDEN 403, POLICY_DENIED 403, QUOTA_EXCEEDED 403, "
    "NOT_FOUND 404 (and CONTAINER_, KERNEL_, SESSION_, RESULT_, KEY_NOT_FOUND), CONFLICT 409, "
    "IDEMPOTENCY_IN_PROGRESS 409, PRECONDITION_FAILED 412, PAYLOAD_TOO_LARGE 413, UNPROCESSABLE 422, "
    "IDEMPOTENCY_KEY_REUSED 422, RATE_LIMITED 429 (with Retry-After), RUNTIME_UNAVAILABLE 503, "
    "PATH_NOT_FOUND 404, INVALID_PATH 400, WORKDIR_NOT_FOUND 400, PATH_FORBIDDEN 403, MOUNT_FORBIDDEN 403, "
    "INTERNAL_ERROR 500"
)


def _add_safety(paths: dict[str, Any]) -> None:
    """What every operation shares: rate-limit headers and 429 on authenticated ones,
    Idempotency-Key (409, 422) on POST, ETag on versioned GETs, If-Match (412) on their
    mutations."""
    for path, item in paths.items():
        versioned = any(path == p or path.startswith(p + "/") for p in _VERSIONED)
        for method, op in item.items():
            responses = op["responses"]
            if op.get("security") == []:
                continue
            for status, answer in responses.items():
                if status.startswith("2"):
                    answer["headers"] = dict(_RATE_HEADERS)
                    if versioned and method == "get" and path in _VERSIONED:
                        answer["headers"]["ETag"] = {"description": "the entity's version, for If-Match",
                                                     "schema": {"type": "string"}}
            responses["429"] = {"description": "RATE_LIMITED", "headers": {
                "Retry-After": {"description": "seconds until the budget has a request again", **_INT_HEADER},
                **_RATE_HEADERS}, **_json(_ERR)}
            params = list(op.get("parameters", []))
            if method == "post":
                params.append(_IDEMPOTENCY_KEY)
                for status, code in (("409", "CONFLICT"), ("422", "UNPROCESSABLE")):
                    responses.setdefault(status, {"description": code, **_json(_ERR)})
            if versioned and method in ("post", "put", "delete"):
                params.append(_IF_MATCH)
                responses["412"] = {"description": "PRECONDITION_FAILED", **_json(_ERR)}
            if method in ("post", "put") and "requestBody" in op:
                responses.setdefault("413", {"description": "PAYLOAD_TOO_LARGE", **_json(_ERR)})
            if method == "post" and path in ("/v1/containers", "/v1/kernels", "/v1/sessions"):
                responses.setdefault("403", {"description": "QUOTA_EXCEEDED", **_json(_ERR)})
            if params:
                op["parameters"] = params


def build_openapi(version: str) -> dict[str, Any]:
    types: list[type] = [
        c.CreateContainer, c.StartContainer, c.StopContainer, c.RestartContainer, c.KillContainer,
        c.ExecInContainer, im.PullImage, v.ContainerView, v.ContainerList, v.ExecView, v.ImageView,
        v.ImageList, v.EventView, v.EventList, v.RemovedView, v.ErrorBody,
        k.CreateKernel, k.ExecuteCode, v.KernelView, v.KernelList, v.ResultView,
        se.CreateSession, se.ExecuteInSession, se.ExecuteWithRetry, sv.SessionView, sv.SessionList,
        sv.SessionResultView, sv.RetryResultView, n.CreateApiKey, kv.KeyView, kv.KeyCreatedView, kv.KeyList,
        rv.RunRequest, rv.RunView, host.ListHostDirectory,
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
            *_LIST, _q("entity"), _q("since"), _q("principal")], errors=(400, 401, 403))},
        "/v1/run": {"post": _op("Run one command in a fresh sandbox (from the warm pool when fast)", 200,
                                _ref(rv.RunView), rv.RunRequest, errors=(400, 401, 404, 502, 503))},
        "/v1/keys": {
            "post": _op("Create an API key (admin only); the secret is in this answer only", 201,
                        _ref(kv.KeyCreatedView), n.CreateApiKey, errors=(400, 401, 403, 409)),
            "get": _op("List API keys, without secrets (admin only)", 200, _ref(kv.KeyList),
                       params=[*_LIST, _q("revoked", "boolean", "include revoked keys")], errors=(400, 401, 403)),
        },
        "/v1/host/directories": {"post": _op(
            "List a host directory under the configured host roots (admin only; never outside them)",
            200, obj, host.ListHostDirectory, errors=(400, 401, 403, 404))},
        "/v1/keys/{id}": {
            "get": _op("Inspect an API key (admin only)", 200, _ref(kv.KeyView), params=[_KEY],
                       errors=(401, 403, 404)),
            "delete": _op("Revoke an API key (admin only): it gets 401 from this answer on", 200,
                          _ref(kv.KeyView), params=[_KEY], errors=(401, 403, 404, 409)),
        },
    }
    _add_safety(paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": "berthd", "version": version,
                 "description": "Sandboxes, kernels and sessions for AI agents and REST automation. "
                                "Errors: {\"error\": {\"code\", \"message\", \"details\"}}; codes: "
                                + ERROR_CODES + "."},
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
