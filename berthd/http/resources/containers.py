"""/v1/containers: create, list, inspect, lifecycle, exec, logs, files."""

from __future__ import annotations

import time

import falcon
import msgspec

from berthd.actors import ExecOutcome
from berthd.actors.container import map_runtime_error
from berthd.domain import container as c
from berthd.domain.base import Command
from berthd.domain.errors import Conflict, PayloadTooLarge, ValidationError
from berthd.http.deps import Deps
from berthd.http.resources._common import (
    context_of,
    find_container,
    fresh_container,
    outcome,
    owned_page,
)
from berthd.http.views import ContainerList, ExecView, RemovedView, container_view
from berthd.http.wire import decode_body, query_int, read_body, send_json
from berthd.runtime import base as rt

__all__ = ["ContainerCollection", "ContainerItem", "ContainerAction", "ContainerExec",
           "ContainerLogs", "ContainerFiles", "check_profile", "check_security"]

STATUSES = ("creating", "created", "running", "stopping", "exited", "removed", "lost")


class ContainerCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        cmd = decode_body(req, c.CreateContainer, self.deps.limits.max_body_bytes)
        check_security(self.deps, cmd)
        ctx = context_of(req)
        # a shared directory wherever a kernel can join the container later (detached execs)
        runtime = self.deps.runtimes.get(cmd.runtime or self.deps.default_runtime)
        berth_dir = runtime is not None and runtime.detached_execs
        reply = outcome(self.deps, self.deps.supervisor.create_container(
            cmd, ctx, output_cap=self.deps.limits.output_cap_bytes, berth_dir=berth_dir))
        send_json(resp, container_view(fresh_container(self.deps, reply)), falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit", 50, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        status = req.get_param("status")
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}", field="status")
        labels: list[tuple[str, str | None]] = []
        for raw in req.get_param_as_list("label") or []:
            key, sep, value = raw.partition("=")
            if not key:
                raise ValidationError("label filters look like key or key=value", field="label")
            labels.append((key, value if sep else None))
        ctx = context_of(req)
        page, total = owned_page(
            self.deps.containers.all(), ctx,
            lambda s: (s.status == status if status else s.status not in c.FINAL)
            and all(k in s.labels and (v is None or s.labels[k] == v) for k, v in labels),
            limit, offset)
        send_json(resp, ContainerList([container_view(s) for s in page], total, limit, offset))


class ContainerItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        state = find_container(self.deps, id, context_of(req))
        resp.set_header("ETag", f'"{state.version}"')
        send_json(resp, container_view(state))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        force = req.get_param_as_bool("force", default=False)
        ctx = context_of(req)
        state = find_container(self.deps, id, ctx)
        reply = outcome(self.deps, self.deps.supervisor.container_command(
            state.id, c.RemoveContainer(force=bool(force)), ctx))
        fresh = fresh_container(self.deps, reply)
        send_json(resp, RemovedView(id=fresh.id, status=fresh.status))


_ACTIONS: dict[str, type[Command]] = {
    "start": c.StartContainer,
    "stop": c.StopContainer,
    "restart": c.RestartContainer,
    "kill": c.KillContainer,
}


class ContainerAction:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str, action: str) -> None:
        kind = _ACTIONS.get(action)
        if kind is None:
            raise falcon.HTTPNotFound()
        cmd = decode_body(req, kind, self.deps.limits.max_body_bytes, empty_ok=True)
        ctx = context_of(req)
        state = find_container(self.deps, id, ctx)
        reply = outcome(self.deps, self.deps.supervisor.container_command(state.id, cmd, ctx))
        send_json(resp, container_view(fresh_container(self.deps, reply)))


class ContainerExec:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        cmd = decode_body(req, c.ExecInContainer, self.deps.limits.max_body_bytes)
        # a request thread waits for the exec: never longer than a command may take
        cap = self.deps.limits.command_timeout
        if cmd.timeout is None or cmd.timeout > cap:
            cmd = msgspec.structs.replace(cmd, timeout=cap)
        ctx = context_of(req)
        state = find_container(self.deps, id, ctx)
        reply = outcome(self.deps, self.deps.supervisor.container_command(
            state.id, cmd, ctx, output_cap=self.deps.limits.output_cap_bytes))
        out: ExecOutcome = reply.result
        r = out.result
        send_json(resp, ExecView(
            exec_id=out.exec_id, exit_code=r.exit_code, stdout=r.stdout.decode("utf-8", "replace"),
            stderr=r.stderr.decode("utf-8", "replace"), duration_ms=round(r.duration_ms, 3),
            truncated=r.truncated, timed_out=r.timed_out,
        ))


class ContainerLogs:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        state = find_container(self.deps, id, context_of(req))
        tail = query_int(req, "tail", -1, -1, 1 << 24)
        runtime = _runtime_of(self.deps, state)
        # the last `cap` bytes (of the last `tail` lines), read without holding more
        cap = self.deps.limits.output_cap_bytes * 8
        try:
            data = runtime.logs_capped(state.id, None if tail < 0 else tail, cap)
        except rt.SandboxNotFound:
            raise Conflict(f"container {state.name} is {state.status}; it has no logs any more") from None
        except rt.RuntimeError_ as exc:
            raise map_runtime_error(exc) from exc
        send_json(resp, {"logs": data[-cap:].decode("utf-8", "replace")})


class ContainerFiles:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def _path(self, req: falcon.Request) -> str:
        path = req.get_param("path")
        if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
            raise ValidationError("path must be an absolute path inside the container", field="path")
        return path

    def on_put(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        path = self._path(req)
        ctx = context_of(req)
        state = find_container(self.deps, id, ctx)
        data = read_body(req, self.deps.limits.max_body_bytes)
        reply = outcome(self.deps, self.deps.supervisor.container_command(
            state.id, c.WriteFile(path=path, size=len(data)), ctx, data=data))
        send_json(resp, {"path": path, "size": len(data), "position": reply.position}, falcon.HTTP_201)

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: str) -> None:
        path = self._path(req)
        state = find_container(self.deps, id, context_of(req))
        runtime = _runtime_of(self.deps, state)
        started = time.monotonic()
        # a download is capped like an upload: a bigger file is refused (413), never read
        cap = self.deps.limits.max_body_bytes
        try:
            data = runtime.get_file_capped(state.id, path, cap)
        except rt.SandboxNotFound:
            raise Conflict(f"container {state.name} is {state.status}") from None
        except rt.FileTooLarge as exc:
            raise PayloadTooLarge(str(exc), **exc.details) from None
        except rt.RuntimeError_ as exc:
            raise map_runtime_error(exc) from exc
        resp.content_type = "application/octet-stream"
        resp.set_header("X-Duration-Ms", f"{(time.monotonic() - started) * 1000:.1f}")
        resp.data = data


def check_profile(deps: Deps, runtime_name: str | None, profile: str) -> None:
    """400 (field ``profile``) for a profile the runtime does not know, before anything is
    appended: for the resources that create sandboxes later (kernels, sessions, runs)."""
    runtime = deps.runtimes.get(runtime_name or deps.default_runtime)
    if runtime is not None:
        try:
            runtime.security.profile(profile)
        except rt.RuntimeError_ as exc:
            raise map_runtime_error(exc) from exc


def check_security(deps: Deps, cmd: c.CreateContainer) -> None:
    """Refuse an unknown profile, a mount outside the mount roots, or ports without a
    network before anything is appended (the runtime checks the mounts again at create and
    before every start: the log records the request, the runtime what it resolved to)."""
    runtime = deps.runtimes.get(cmd.runtime or deps.default_runtime)
    if runtime is None:
        return  # the supervisor refuses an unknown runtime with its own message
    try:
        profile = runtime.security.profile(cmd.profile)
        runtime.security.resolve_mounts(rt.Mount(m.host_path, m.container_path, m.mode) for m in cmd.mounts)
    except rt.RuntimeError_ as exc:
        raise map_runtime_error(exc) from exc
    if runtime.name == "local" and not cmd.command:
        raise ValidationError("the local runtime's 'host' image has no default command: give 'command'",
                              field="command")
    if cmd.ports and not profile.network:
        raise ValidationError(
            f"ports need a network; profile {profile.name!r} has none (use 'networked')", field="ports")


def _runtime_of(deps: Deps, state: c.ContainerState) -> rt.Runtime:
    runtime = deps.runtimes.get(state.runtime)
    if runtime is None:
        raise ValidationError(f"runtime {state.runtime} is not enabled on this node", field="runtime")
    return runtime


