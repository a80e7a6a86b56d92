"""What every resource does the same way: who asks, waiting for an actor's outcome, and
read-your-writes (answer from the projection once it has reached the write)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import falcon

from berthd.actors import CommandContext, Reply
from berthd.domain import container as c
from berthd.domain.errors import BerthdError, ContainerNotFound, RuntimeUnavailable
from berthd.http.auth import Principal
from berthd.http.deps import Deps

T = TypeVar("T")

__all__ = ["context_of", "outcome", "fresh_container", "find_container"]


def context_of(req: falcon.Request) -> CommandContext:
    principal: Principal = req.context.principal
    ctx = principal.context(req.context.get("correlation_id"), req.context.get("request_id"))
    # set by IfMatchMiddleware on routes that address one entity: its actor checks it again
    if_match = req.context.get("if_match")
    return ctx if if_match is None else dataclasses.replace(ctx, if_match=if_match)


def outcome(deps: Deps, future: Future[Reply], timeout: float | None = None) -> Reply:
    """Wait for an actor's outcome; its ``BerthdError`` goes to the client as it is."""
    try:
        return future.result(timeout=timeout or deps.limits.command_timeout)
    except FutureTimeout:
        raise RuntimeUnavailable("the runtime did not answer in time; the operation goes on "
                                 "and its outcome will appear on the event stream") from None
    except BerthdError:
        raise


def find_container(deps: Deps, id_or_name: str, ctx: CommandContext) -> c.ContainerState:
    """The container by id or name, as the projection has it; others' containers are
    invisible to a non-admin key (404, never 403: existence does not leak)."""
    state = deps.containers.get(id_or_name)
    if state is None or (not ctx.is_admin and state.owner != ctx.owner):
        raise ContainerNotFound(f"no container '{id_or_name}'", id=id_or_name)
    return state


def fresh_container(deps: Deps, reply: Reply) -> c.ContainerState:
    """The container as the projection shows it once it has caught up with ``reply``
    (read-your-writes); the actor's own state if the projection is slow."""
    state: c.ContainerState = reply.state
    if deps.runner.wait_for(reply.position, deps.limits.read_your_writes_timeout):
        view = deps.containers.get(state.id)
        if view is not None and view.version >= state.version:
            return view
    return state


def owned_page(rows: Iterable[T], ctx: CommandContext, keep: Callable[[T], bool],
               limit: int, offset: int) -> tuple[list[T], int]:
    """One page of a list endpoint: what the caller may see (its own, or everything for an
    admin) and ``keep`` accepts, oldest first; and how many there are in all."""
    owned: Any = [r for r in rows if (ctx.is_admin or getattr(r, "owner", None) == ctx.owner) and keep(r)]
    owned.sort(key=lambda r: (r.created_at, r.id))
    return owned[offset:offset + limit], len(owned)
