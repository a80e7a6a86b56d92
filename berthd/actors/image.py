"""Image pulls and removals, recorded on the log.

Images have no actor: a stream per reference has few writers and each write is retried
on a version conflict (``append_retrying``). A pull records its intent, throttled
progress (``ImagePullProgress``, at most one per layer state change and ``progress_every``
seconds) and its outcome, so the event stream shows it as it goes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from berthd.actors.container import map_runtime_error
from berthd.actors.context import Clock, CommandContext
from berthd.actors.supervisor import append_retrying
from berthd.domain import image as im
from berthd.domain.errors import ImageNotFound, ValidationError
from berthd.events.store import EventStore
from berthd.runtime import base as rt

__all__ = ["ImageService"]

log = logging.getLogger(__name__)


class ImageService:
    def __init__(self, *, store: EventStore, runtimes: dict[str, rt.Runtime], default_runtime: str,
                 clock: Clock, node_id: str, progress_every: float = 0.5) -> None:
        self.store = store
        self.runtimes = runtimes
        self.default_runtime = default_runtime
        self.clock = clock
        self.node_id = node_id
        self.progress_every = progress_every

    def runtime(self, name: str | None) -> tuple[str, rt.Runtime]:
        name = name or self.default_runtime
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise ValidationError(f"runtime '{name}' is not available on this node", field="runtime")
        return name, runtime

    def list(self) -> list[rt.ImageInfo]:
        out: list[rt.ImageInfo] = []
        for runtime in self.runtimes.values():
            try:
                out.extend(runtime.images())
            except rt.RuntimeError_ as exc:
                raise map_runtime_error(exc) from exc
        return out

    def pull(self, ref: str, runtime_name: str | None, ctx: CommandContext) -> tuple[int, rt.ImageInfo]:
        name, runtime = self.runtime(runtime_name)
        stream = im.image_stream_id(ref)
        meta = ctx.meta(self.clock, self.node_id)
        append_retrying(self.store, stream, [im.ImagePullRequested(ref=ref, runtime=name)], meta)
        last: dict[str, Any] = {"at": 0.0, "key": None}

        def progress(item: dict[str, Any]) -> None:
            status = str(item.get("status", ""))
            layer = item.get("id")
            detail = item.get("progressDetail") or {}
            key = (layer, status)
            now = time.monotonic()
            if key == last["key"] and now - float(last["at"] or 0.0) < self.progress_every:
                return
            last["at"], last["key"] = now, key
            try:
                append_retrying(self.store, stream, [im.ImagePullProgress(
                    ref=ref, status=status[:200], layer=str(layer) if layer else None,
                    current=_int(detail.get("current")), total=_int(detail.get("total")),
                )], ctx.meta(self.clock, self.node_id))
            except Exception as exc:  # progress is best effort; the outcome is not
                log.warning("pull %s: progress not recorded: %s", ref, exc)

        try:
            info = runtime.pull(ref, progress)
        except rt.RuntimeError_ as exc:
            err = map_runtime_error(exc)
            append_retrying(self.store, stream, [im.ImagePullFailed(ref=ref, reason=err.message)],
                            ctx.meta(self.clock, self.node_id))
            raise err from exc
        position = append_retrying(self.store, stream, [im.ImagePulled(
            ref=ref, image_id=info.id, tags=list(info.tags), size=info.size, runtime=name,
        )], ctx.meta(self.clock, self.node_id))
        return position, info

    def remove(self, ref: str, runtime_name: str | None, force: bool, ctx: CommandContext) -> int:
        name, runtime = self.runtime(runtime_name)
        try:
            runtime.remove_image(ref, force=force)
        except (rt.ImageMissing, rt.SandboxNotFound) as exc:
            raise ImageNotFound(f"no image {ref}", ref=ref) from exc
        except rt.RuntimeError_ as exc:
            raise map_runtime_error(exc) from exc
        return append_retrying(self.store, im.image_stream_id(ref), [im.ImageRemoved(ref=ref, runtime=name)],
                               ctx.meta(self.clock, self.node_id))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
