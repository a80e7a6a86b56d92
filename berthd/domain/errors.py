"""The one tree of errors a client can be answered with.

Every refusal berthd gives is a ``BerthdError`` with a stable ``code`` (API.md) and the
HTTP ``status`` it maps to; ``berthd.http.errors`` turns them into the one error shape.
Messages say what to do next. Nothing is appended to the log for a refused command.

    BerthdError                     500 INTERNAL_ERROR
    ├── ValidationError             400 VALIDATION_ERROR (details.field names the field)
    │   ├── InvalidPath             400 INVALID_PATH (relative, '..', a directory, unreachable)
    │   └── WorkdirNotFound         400 WORKDIR_NOT_FOUND
    ├── Unauthorized                401 UNAUTHORIZED
    ├── Forbidden                   403 FORBIDDEN
    │   ├── PolicyDenied            403 POLICY_DENIED
    │   ├── QuotaExceeded           403 QUOTA_EXCEEDED (a key holds as many live entities as it may)
    │   └── PathForbidden           403 PATH_FORBIDDEN (a symlink out of its jail, a control path)
    │       └── MountForbidden      403 MOUNT_FORBIDDEN (outside the mount roots)
    ├── NotFound                    404 NOT_FOUND
    │   ├── ContainerNotFound       404 CONTAINER_NOT_FOUND
    │   ├── ImageNotFound           404 IMAGE_NOT_FOUND
    │   ├── SessionNotFound         404 SESSION_NOT_FOUND
    │   ├── KernelNotFound          404 KERNEL_NOT_FOUND
    │   ├── ResultNotFound          404 RESULT_NOT_FOUND
    │   ├── KeyNotFound             404 KEY_NOT_FOUND
    │   └── PathNotFound            404 PATH_NOT_FOUND (a file in a container, a host path)
    ├── MethodNotAllowed            405 METHOD_NOT_ALLOWED
    ├── Conflict                    409 CONFLICT (wrong state, name taken, concurrent write)
    │   ├── DeadKernel              409 KERNEL_DEAD (the interpreter died; restart the kernel)
    │   ├── ExpiredSession          409 SESSION_EXPIRED (past its TTL; open a new session)
    │   └── IdempotencyInProgress   409 IDEMPOTENCY_IN_PROGRESS (the first request is still running)
    ├── PreconditionFailed          412 PRECONDITION_FAILED (If-Match names another version)
    ├── PayloadTooLarge             413 PAYLOAD_TOO_LARGE
    ├── UnsupportedMediaType        415 UNSUPPORTED_MEDIA_TYPE
    ├── Unprocessable               422 UNPROCESSABLE (domain refusal)
    │   └── IdempotencyKeyReused    422 IDEMPOTENCY_KEY_REUSED (same key, another request)
    ├── RateLimited                 429 RATE_LIMITED
    ├── Busy                        503 BUSY (an actor did not take the command in time)
    ├── RuntimeUnavailable          503 RUNTIME_UNAVAILABLE
    ├── StoreUnavailable            503 STORE_UNAVAILABLE
    └── RuntimeFailed               502 RUNTIME_FAILED (the engine refused an operation)

``for_code`` turns a runtime refusal that carries one of these codes (the runtime layer
stays free of this module) into the client error.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BerthdError",
    "Busy",
    "Conflict",
    "ContainerNotFound",
    "DeadKernel",
    "ExpiredSession",
    "Forbidden",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "ImageNotFound",
    "InvalidPath",
    "MountForbidden",
    "PathForbidden",
    "PathNotFound",
    "WorkdirNotFound",
    "for_code",
    "KernelNotFound",
    "KeyNotFound",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PolicyDenied",
    "PreconditionFailed",
    "QuotaExceeded",
    "RateLimited",
    "ResultNotFound",
    "RuntimeFailed",
    "RuntimeUnavailable",
    "SessionNotFound",
    "StoreUnavailable",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "ValidationError",
]


class BerthdError(Exception):
    """Base: an error with a stable code, an HTTP status and details for the client."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ValidationError(BerthdError):
    code, status = "VALIDATION_ERROR", 400


class InvalidPath(ValidationError):
    code = "INVALID_PATH"


class WorkdirNotFound(ValidationError):
    code = "WORKDIR_NOT_FOUND"


class Unauthorized(BerthdError):
    code, status = "UNAUTHORIZED", 401


class Forbidden(BerthdError):
    code, status = "FORBIDDEN", 403


class PolicyDenied(Forbidden):
    code = "POLICY_DENIED"


class QuotaExceeded(Forbidden):
    code = "QUOTA_EXCEEDED"


class PathForbidden(Forbidden):
    code = "PATH_FORBIDDEN"


class MountForbidden(PathForbidden):
    code = "MOUNT_FORBIDDEN"


class NotFound(BerthdError):
    code, status = "NOT_FOUND", 404


class ContainerNotFound(NotFound):
    code = "CONTAINER_NOT_FOUND"


class ImageNotFound(NotFound):
    code = "IMAGE_NOT_FOUND"


class SessionNotFound(NotFound):
    code = "SESSION_NOT_FOUND"


class KernelNotFound(NotFound):
    code = "KERNEL_NOT_FOUND"


class ResultNotFound(NotFound):
    code = "RESULT_NOT_FOUND"


class KeyNotFound(NotFound):
    code = "KEY_NOT_FOUND"


class PathNotFound(NotFound):
    code = "PATH_NOT_FOUND"


class MethodNotAllowed(BerthdError):
    code, status = "METHOD_NOT_ALLOWED", 405


class Conflict(BerthdError):
    code, status = "CONFLICT", 409


class DeadKernel(Conflict):
    code = "KERNEL_DEAD"


class ExpiredSession(Conflict):
    code = "SESSION_EXPIRED"


class IdempotencyInProgress(Conflict):
    code = "IDEMPOTENCY_IN_PROGRESS"


class PreconditionFailed(BerthdError):
    code, status = "PRECONDITION_FAILED", 412


class PayloadTooLarge(BerthdError):
    code, status = "PAYLOAD_TOO_LARGE", 413


class UnsupportedMediaType(BerthdError):
    code, status = "UNSUPPORTED_MEDIA_TYPE", 415


class Unprocessable(BerthdError):
    code, status = "UNPROCESSABLE", 422


class IdempotencyKeyReused(Unprocessable):
    code = "IDEMPOTENCY_KEY_REUSED"


class RateLimited(BerthdError):
    code, status = "RATE_LIMITED", 429


class RuntimeFailed(BerthdError):
    code, status = "RUNTIME_FAILED", 502


class Busy(BerthdError):
    code, status = "BUSY", 503


class RuntimeUnavailable(BerthdError):
    code, status = "RUNTIME_UNAVAILABLE", 503


class StoreUnavailable(BerthdError):
    code, status = "STORE_UNAVAILABLE", 503


_BY_CODE: dict[str, type[BerthdError]] = {
    cls.code: cls
    for cls in (ValidationError, InvalidPath, WorkdirNotFound, PathForbidden, MountForbidden,
                PathNotFound, PayloadTooLarge)
}


def for_code(code: str | None, message: str, **details: Any) -> BerthdError | None:
    """The client error for a refusal tagged with ``code`` (None: not a client error)."""
    cls = _BY_CODE.get(code or "")
    return cls(message, **details) if cls is not None else None
