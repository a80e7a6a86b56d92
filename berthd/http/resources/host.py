"""/v1/host/directories: list a host directory (Kai's host-directory picker), jailed.

Only under the configured host roots (``host_roots``; default: the mount roots, else the
daemon user's home), resolved by ``berthd.runtime.hostpath.HostJail`` without following a
symlink out of its root; host control paths are neither listed nor named. Names, types,
sizes and times only, never contents. An admin-only endpoint (API.md, Admin): a ``user``
key gets 403.
"""

from __future__ import annotations

from datetime import UTC, datetime

import falcon
import msgspec

from berthd.actors.container import map_runtime_error
from berthd.domain.errors import Forbidden
from berthd.http.deps import Deps
from berthd.http.resources._common import context_of
from berthd.http.wire import decode_body, send_json
from berthd.runtime import base as rt

__all__ = ["HostDirectories", "ListHostDirectory"]

_MAX_ENTRIES = 10000


class ListHostDirectory(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str | None = None  # absolute; default: the first host root


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class HostDirectories:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = decode_body(req, ListHostDirectory, self.deps.limits.max_body_bytes, empty_ok=True)
        if not context_of(req).is_admin:
            raise Forbidden("browsing host directories needs an admin key")
        jail = self.deps.runtimes[self.deps.default_runtime].security.browse
        try:
            resolved, entries, truncated = jail.list_directory(body.path, limit=_MAX_ENTRIES)
        except rt.RuntimeError_ as exc:
            raise map_runtime_error(exc) from exc
        parent = resolved.path.rsplit("/", 1)[0] or "/"
        send_json(resp, {
            "path": resolved.path,
            "root": resolved.root,
            "roots": list(jail.roots),
            "parent": parent if resolved.path != resolved.root else None,
            "directories": [
                {"name": e.name, "path": e.path, "modified": _time(e.modified)}
                for e in entries if e.type == "directory"
            ],
            "files": [
                {"name": e.name, "path": e.path, "type": e.type, "size": e.size, "modified": _time(e.modified)}
                for e in entries if e.type != "directory"
            ],
            "truncated": truncated,
        })
