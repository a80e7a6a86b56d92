"""Errors waitress answers itself, in berthd's error shape.

Some requests never reach the Falcon app: waitress's parser refuses them first — a body
whose ``Content-Length`` reaches ``max_request_body_size`` (413, refused from the header,
before the body is read; a chunked body once that much has arrived), headers over ``max_request_header_size`` (431),
a malformed request line or header (400), a ``Transfer-Encoding`` it does not implement
(501) — and an exception escaping a task ends in a 500. waitress renders all of these
through the channel's ``error_task_class`` (``waitress.task.ErrorTask``) as plain text.
:class:`JsonErrorTask` is that class for berthd's channel: the same statuses, but the body
is ``{"error": {"code", "message", "details"}}`` with ``Content-Type: application/json``,
a ``Content-Length`` and an ``X-Request-ID``, like every other error berthd answers.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from waitress.task import ErrorTask
from waitress.utilities import RequestEntityTooLarge

from berthd.http.errors import error_body

__all__ = ["JsonErrorTask", "error_code"]

log = logging.getLogger(__name__)

# the codes berthd.http.errors gives the same statuses when Falcon raises them
_CODES = {400: "VALIDATION_ERROR", 413: "PAYLOAD_TOO_LARGE"}
_INTERNAL = "an unexpected error occurred; it has been logged"


def error_code(status: int) -> str:
    """The API error code for a status waitress answers on its own."""
    return _CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


class JsonErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's error task, answering in berthd's JSON error shape. The connection is
    still closed after the answer (the request's framing cannot be trusted), but only once
    the body the client is still sending has been drained (``_guard``'s lingering close),
    so that the client reads the answer instead of a reset."""

    def execute(self) -> None:
        error = self.request.error
        status = int(error.code)
        request_id = secrets.token_hex(8)
        details: dict[str, Any] = {}
        if isinstance(error, RequestEntityTooLarge):
            limit = getattr(self.channel.server, "body_limit", None) or self.channel.adj.max_request_body_size
            size = self.request.content_length
            if size:
                message = f"the body is {size} bytes; the limit is {limit}"
                details["size"] = size
            else:
                message = f"the body is over the limit of {limit} bytes"
            details["limit"] = limit
        elif status >= 500:
            message = _INTERNAL
            details["request_id"] = request_id
        else:
            message = f"{error.reason}: {error.body}"
        log.debug("http %s answered by waitress: %r (request %s)", status, error.body, request_id)
        body = error_body(error_code(status), message, details)
        self.status = f"{status} {error.reason}"
        self.response_headers.extend([
            ("Content-Type", "application/json"),
            ("X-Request-ID", request_id),
        ])
        self.set_close_on_finish()
        self.channel.linger = True  # berthd's channel drains the unsent body before closing
        self.content_length = len(body)
        self.write(body)
