"""JSON in and out with msgspec: strict, bounded body decoding that names the bad field,
and reused encoders (no per-request schema work)."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import falcon
import msgspec

from berthd.domain.errors import PayloadTooLarge, ValidationError

__all__ = ["decode_body", "read_body", "send_json", "query_int"]

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
_PATH = re.compile(r"at `\$(?P<path>[^`]*)`")


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes (checked before and while reading).
    A body already read by a middleware (``req.context.raw_body``) is served from there."""
    cached: bytes | None = req.context.get("raw_body")
    if cached is not None:
        if len(cached) > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes", limit=limit)
        return cached
    length = req.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}", limit=limit)
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the body is over the limit of {limit} bytes", limit=limit)
    return data


def decode_body(req: falcon.Request, kind: type[T], limit: int, empty_ok: bool = False) -> T:
    """Decode a JSON body into a command Struct; 400 naming the field on any mismatch."""
    data = read_body(req, limit)
    if not data.strip():
        if empty_ok:
            data = b"{}"
        else:
            raise ValidationError("a JSON body is required", field="$")
    # The body is JSON whatever Content-Type says: `curl -d` labels it form-urlencoded, and
    # refusing that would only make the first try fail. A non-JSON body is a 400 below.
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH.search(text)
        # msgspec shows a bad dict value as `$.env[...]`: the field is `env`
        field = m.group("path").lstrip(".").replace("[...]", "") if m else ""
        if not field and "missing required field" in text:
            field = text.split("`")[1] if "`" in text else ""
        if not field and "unknown field" in text.lower():
            field = text.split("`")[1] if "`" in text else ""
        raise ValidationError(f"invalid request body: {text}", field=field or "$") from exc
    except msgspec.DecodeError as exc:
        raise ValidationError(f"malformed JSON: {exc}", field="$") from exc


def send_json(resp: falcon.Response, obj: Any, status: int | str = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _encoder.encode(obj)


def query_int(req: falcon.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.get_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"query parameter {name} must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise ValidationError(f"query parameter {name} must be between {lo} and {hi}", field=name)
    return value
