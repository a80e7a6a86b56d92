"""``ETag`` and ``If-Match``: an entity's version as its entity tag, and mutations that
refuse to act on another version than the client saw.

``GET`` of a container, kernel or session carries ``ETag: "V"`` (V = the entity's version,
the number of events in its stream). A ``POST`` action, ``PUT`` or ``DELETE`` on it with
``If-Match`` answers 412 ``PRECONDITION_FAILED`` (details: the current ``etag``) unless one
of the listed tags is the current one (``*`` matches any version; weak tags ``W/"V"`` are
compared by their value). The check is made twice: here against the read model (a cheap
early answer; read-your-writes means a client's own earlier writes are in it), and again
on the entity's actor when the command arrives (``check_if_match``), so that concurrent
commands sent with the same tag cannot all pass. An entity the key cannot see is left to the resource (404, not 412: a
precondition must not reveal that someone else's entity exists).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import falcon

from berthd.actors.context import etag_of, matches
from berthd.domain.errors import PreconditionFailed
from berthd.http.auth import Principal

__all__ = ["IfMatchMiddleware", "etag_of", "set_etag", "matches", "Versioned"]


class Versioned(Protocol):
    @property
    def owner(self) -> str: ...

    @property
    def version(self) -> int: ...


V = TypeVar("V", bound=Versioned)


def set_etag(resp: falcon.Response, entity: V) -> V:
    """The one-liner resources call on GET: sets ``ETag`` and hands the entity back."""
    resp.set_header("ETag", etag_of(entity.version))
    return entity


_METHODS = ("POST", "PUT", "DELETE")


class IfMatchMiddleware:
    """``finders`` maps a route template to the read model lookup of its ``{id}``."""

    def __init__(self, finders: dict[str, Callable[[str], Versioned | None]]) -> None:
        self.finders = finders

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        if_match = req.get_header("If-Match")
        if if_match is None or req.method not in _METHODS:
            return
        find = self.finders.get(req.uri_template or "")
        principal: Principal | None = req.context.get("principal")
        if find is None or principal is None or "id" not in params:
            return
        entity = find(params["id"])
        if entity is None or (not principal.is_admin and entity.owner != principal.key_id):
            return
        if not matches(if_match, entity.version):
            raise PreconditionFailed(
                f"If-Match {if_match} does not match the current version {etag_of(entity.version)}: "
                "GET it again and decide on what it is now", etag=etag_of(entity.version))
        req.context.if_match = if_match  # checked again by the entity's actor (context_of)
