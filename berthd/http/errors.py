"""The one place errors become responses: every ``BerthdError`` in the API's error shape,
Falcon's own errors (unknown route, wrong method, bad header) translated to it, and
anything unexpected logged and answered 500 ``INTERNAL_ERROR`` without details."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import falcon
import msgspec

from berthd.domain.errors import BerthdError

__all__ = ["register_error_handlers", "error_body"]

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_PARAM = re.compile(r'"([^"]{1,100})" parameter')

_FALCON_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    411: "LENGTH_REQUIRED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return _encode({"error": {"code": code, "message": message, "details": details or {}}})


def _send(resp: falcon.Response, status: int, body: bytes) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = body


def _berthd_error(req: falcon.Request, resp: falcon.Response, ex: BerthdError, params: Any) -> None:
    _send(resp, ex.status, error_body(ex.code, ex.message, ex.details))
    if ex.status == 429 and "retry_after" in ex.details:
        resp.set_header("Retry-After", str(ex.details["retry_after"]))


def _falcon_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: Any) -> None:
    status = ex.status_code
    code = _FALCON_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    message = ex.description or ex.title or "request refused"
    if status == 404:
        message = f"no such endpoint: {req.method} {req.path}"
    elif status == 405:
        message = f"{req.method} is not allowed on {req.path}"
    details: dict[str, Any] = {}
    param = _PARAM.search(message)
    if status == 400 and param:
        details["field"] = param.group(1)  # falcon's own query-parameter errors
    _send(resp, status, error_body(code, message, details))
    headers = ex.headers or {}
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        resp.set_header(name, value)


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: Any) -> None:
    log.exception("unexpected error on %s %s", req.method, req.path)
    _send(resp, 500, error_body("INTERNAL_ERROR", "an unexpected error occurred; it has been logged",
                                {"request_id": req.context.get("request_id")}))


def register_error_handlers(app: falcon.App[Any, Any]) -> None:
    # Falcon picks the most specific handler registered for an exception's class
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(falcon.HTTPError, _falcon_error)
    app.add_error_handler(BerthdError, _berthd_error)
