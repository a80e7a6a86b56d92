"""/v1/images: list, pull, remove.

Any key may list and pull images. Removing one is for admin keys only (a ``user`` key gets
403 ``FORBIDDEN``, as for ``/v1/keys`` and ``/v1/audit``): images are the node's, shared by
every key's containers, kernels and sessions, not owned by the key that pulled them."""

from __future__ import annotations

import re

import falcon

from berthd.domain import image as im
from berthd.domain.errors import Forbidden, ValidationError
from berthd.http.deps import Deps
from berthd.http.resources._common import context_of
from berthd.http.views import ImageList, ImageView
from berthd.http.wire import decode_body, query_int, send_json
from berthd.runtime import base as rt

__all__ = ["ImageCollection", "ImagePull", "ImageItem"]


def _view(i: rt.ImageInfo) -> ImageView:
    return ImageView(id=i.id, tags=list(i.tags), size=i.size, created=i.created, runtime=i.runtime)


class ImageCollection:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = query_int(req, "limit", 50, 1, 1000)
        offset = query_int(req, "offset", 0, 0, 1 << 31)
        runtime = req.get_param("runtime")
        items = [i for i in self.deps.images.list() if runtime is None or i.runtime == runtime]
        items.sort(key=lambda i: (i.runtime, i.tags[0] if i.tags else i.id))
        send_json(resp, ImageList([_view(i) for i in items[offset:offset + limit]], len(items), limit, offset))


class ImagePull:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        cmd = decode_body(req, im.PullImage, self.deps.limits.max_body_bytes)
        position, info = self.deps.images.pull(cmd.ref, cmd.runtime, context_of(req))
        self.deps.runner.wait_for(position, self.deps.limits.read_your_writes_timeout)
        send_json(resp, _view(info))


class ImageItem:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def on_delete(self, req: falcon.Request, resp: falcon.Response, ref: str) -> None:
        if not context_of(req).is_admin:
            raise Forbidden("removing images needs an admin key (images are shared by every key on the node)")
        if len(ref) > 512 or not re.fullmatch(im.REF_PATTERN, ref):
            raise ValidationError("not an image reference (like busybox:latest or host:5000/repo:tag)",
                                  field="ref")
        force = bool(req.get_param_as_bool("force", default=False))
        position = self.deps.images.remove(ref, req.get_param("runtime"), force, context_of(req))
        self.deps.runner.wait_for(position, self.deps.limits.read_your_writes_timeout)
        send_json(resp, {"ref": ref, "status": "removed"})
