"""Images: what was pulled or removed, by whom, and how a pull went.

An image's stream id is derived from its reference (``image_stream_id``), so every pull of
``alpine:3.20`` lands in one stream. Progress events are throttled by the caller.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import msgspec

from berthd.domain.base import Command, Event

__all__ = [
    "IMAGE_EVENTS",
    "ImagePullFailed",
    "ImagePullProgress",
    "ImagePullRequested",
    "ImagePulled",
    "ImageRemoved",
    "PullImage",
    "image_stream_id",
]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REF_PATTERN = (
    r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)?"  # registry host[:port]/
    rf"{_COMPONENT}(?:/{_COMPONENT})*"  # repository path, lowercase
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"  # :tag
    r"(?:@sha256:[a-f0-9]{64})?$"  # @digest
)
"""Docker's reference grammar, so a bad reference is a 400 before any engine sees it."""
ImageRef = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=REF_PATTERN)]


class PullImage(Command):
    ref: ImageRef
    runtime: str | None = None


class ImageEvent(Event, frozen=True, kw_only=True):
    kind = "image"


class ImagePullRequested(ImageEvent, frozen=True, kw_only=True):
    ref: str
    runtime: str


class ImagePullProgress(ImageEvent, frozen=True, kw_only=True):
    ref: str
    status: str
    current: int | None = None
    total: int | None = None
    layer: str | None = None


class ImagePulled(ImageEvent, frozen=True, kw_only=True):
    ref: str
    image_id: str
    tags: list[str] = []
    size: int = 0
    runtime: str = "docker"


class ImagePullFailed(ImageEvent, frozen=True, kw_only=True):
    ref: str
    reason: str


class ImageRemoved(ImageEvent, frozen=True, kw_only=True):
    ref: str
    runtime: str = "docker"


IMAGE_EVENTS: tuple[type[Event], ...] = (
    ImagePullRequested, ImagePullProgress, ImagePulled, ImagePullFailed, ImageRemoved,
)


def image_stream_id(ref: str) -> str:
    """A stable stream id for an image reference (refs contain ':' and '/')."""
    return "img-" + hashlib.sha256(ref.encode()).hexdigest()[:16]
