"""Per-request work done once for every resource: request and correlation ids, and who
is asking (401 before any resource runs)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import falcon

from berthd.domain.errors import Unauthorized
from berthd.http.auth import SOCKET_PRINCIPAL, Authenticator

__all__ = ["AuthMiddleware", "RequestIds", "TRUSTED_ENV", "trusted"]

TRUSTED_ENV = "berthd.trusted"
_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class RequestIds:
    """Every response carries X-Request-ID; an incoming X-Correlation-ID is echoed and
    recorded on the events the request causes (a malformed one is replaced, not trusted)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = secrets.token_hex(8)
        incoming = req.get_header("X-Correlation-ID")
        req.context.correlation_id = incoming if incoming and _ID.match(incoming) else None
        resp.set_header("X-Request-ID", req.context.request_id)
        if req.context.correlation_id:
            resp.set_header("X-Correlation-ID", req.context.correlation_id)


class AuthMiddleware:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        if req.env.get(TRUSTED_ENV):
            req.context.principal = SOCKET_PRINCIPAL
            return
        secret = self.auth.secret_from_headers(req.get_header("Authorization"), req.get_header("X-API-Key"))
        principal = self.auth.verify(secret)
        req.context.principal = principal
        if principal is None and getattr(resource, "auth", True):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")


def trusted(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app as served on the unix socket: requests there are admin."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[TRUSTED_ENV] = True
        return app(environ, start_response)

    return wsgi
