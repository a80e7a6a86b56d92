"""Who is asking: API keys (Bearer or X-API-Key) checked against their stored hashes.

Only SHA-256 hashes of keys are kept (the keys view, fed by ``ApiKeyCreated`` events, and
the hash of ``BERTHD_ADMIN_KEY`` when set); comparison is constant-time. The unix socket
is trusted as admin: its 0660 mode in a 0700 directory is the access control.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from berthd.actors.context import CommandContext
from berthd.events.readmodels import KeysView

__all__ = ["Authenticator", "Principal", "hash_key", "SOCKET_PRINCIPAL"]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: str  # "admin" | "user"
    name: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def context(self, correlation_id: str | None, request_id: str | None) -> CommandContext:
        return CommandContext(
            principal=self.key_id, owner="admin" if self.is_admin else self.key_id,
            is_admin=self.is_admin, correlation_id=correlation_id, request_id=request_id,
        )


SOCKET_PRINCIPAL = Principal(key_id="socket", role="admin", name="unix socket")


class Authenticator:
    def __init__(self, keys: KeysView, extra_admin_hashes: tuple[str, ...] = ()) -> None:
        self.keys = keys
        self.extra_admin_hashes = extra_admin_hashes

    def verify(self, secret: str | None) -> Principal | None:
        if not secret:
            return None
        digest = hash_key(secret)
        for known in self.extra_admin_hashes:
            if hmac.compare_digest(known, digest):
                return Principal(key_id="admin", role="admin", name="BERTHD_ADMIN_KEY")
        record = self.keys.by_hash.get(digest)
        if record is None or record.revoked or not hmac.compare_digest(record.key_hash, digest):
            return None
        return Principal(key_id=record.key_id, role=record.role, name=record.name)

    @staticmethod
    def secret_from_headers(authorization: str | None, api_key: str | None) -> str | None:
        if api_key:
            return api_key.strip()
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return None
