"""/v1/run: a one-shot command in a fresh sandbox (agentkernel's ``/run``).

The sandbox comes from the warm pool when ``fast`` (the default), or is created cold; the
command runs through the container's actor like any exec (so it is on the log with the
caller's principal), and the sandbox is removed afterwards, whatever the command did.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import falcon
import msgspec

from berthd.actors.pool import PoolKey, WarmPool
from berthd.domain import container as c
from berthd.domain.errors import ValidationError
from berthd.domain.image import ImageRef
from berthd.http.deps import Deps
from berthd.http.resources._common import context_of
from berthd.http.resources.containers import check_profile
from berthd.http.wire import decode_body, send_json

__all__ = ["RunRequest", "RunResource", "RunView"]

Profile = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class RunRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    command: Annotated[list[c.NoNul], msgspec.Meta(min_length=1, max_length=4096)]
    image: ImageRef | None = None
    profile: Profile = "default"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] | None = None
    stdin: Annotated[str, msgspec.Meta(max_length=16 << 20)] | None = None
    fast: bool = True
    runtime: Literal["docker", "local"] | None = None  # extension: default the daemon's


class RunView(msgspec.Struct, kw_only=True):
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool
    container_id: str
    pool: Literal["hit", "miss", "cold"]  # extension: where the sandbox came from
    total_ms: float  # extension: the whole run, sandbox included


class RunResource:
    def __init__(self, deps: Deps, pool: WarmPool) -> None:
        self.deps = deps
        self.pool = pool

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        started = time.monotonic()
        body = decode_body(req, RunRequest, self.deps.limits.max_body_bytes)
        # a request thread waits for the command: never longer than a command may take
        cap = self.deps.limits.command_timeout
        timeout = cap if body.timeout is None or body.timeout > cap else body.timeout
        ctx = context_of(req)
        command = c.ExecInContainer(command=body.command, stdin=body.stdin, timeout=timeout)
        lease, out = self.pool.run(
            self._key(body), command, ctx, fast=body.fast,
            output_cap=self.deps.limits.output_cap_bytes, wait=cap + 30.0)
        r = out.result
        send_json(resp, RunView(
            exit_code=r.exit_code, stdout=r.stdout.decode("utf-8", "replace"),
            stderr=r.stderr.decode("utf-8", "replace"), duration_ms=round(r.duration_ms, 3),
            truncated=r.truncated, timed_out=r.timed_out, container_id=lease.container_id,
            pool=lease.source, total_ms=round((time.monotonic() - started) * 1000, 3),
        ))

    def _key(self, body: RunRequest) -> PoolKey:
        runtime = body.runtime or self.deps.default_runtime
        if runtime not in self.deps.runtimes:
            raise ValidationError(f"runtime '{runtime}' is not available on this node", field="runtime")
        check_profile(self.deps, runtime, body.profile)
        fallback = "host" if runtime == "local" else "busybox:latest"
        image = body.image or (self.pool.default_image if runtime == self.deps.default_runtime else fallback)
        return self.pool.key(image, body.profile, runtime)
