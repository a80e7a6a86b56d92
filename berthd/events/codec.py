"""How an event sits in a row of the log.

One row is eventsourcing's ``StoredEvent``: ``originator_id`` is the stream id,
``originator_version`` the version, ``topic`` the event type name (the class name) and
``state`` the msgspec JSON of an envelope::

    {"kind": "container", "meta": {...Meta...}, "data": {...the event's fields...}}

The type name lives in the topic column rather than only in the JSON so that the log can
be filtered by type in SQL (``read_all(types=...)``) without decoding anything.

Decoding must never stop a reader of the log: the daemon, the projections and every
WebSocket follower read the same rows. A row whose type is not in the registry (written
by a newer berthd, or of a type since retired) or whose data no longer fits its class
decodes into an ``UndecodedEvent`` holding the raw data; that is logged once per type and
the reader keeps going. Only a row whose envelope itself is unreadable (corruption, not
evolution) raises ``CorruptEvent``.

Encoders and decoders are built once per codec and reused: msgspec's per-call setup is
most of its cost for small messages, and they are safe to share between threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from berthd.events.store import StoreError

__all__ = ["CorruptEvent", "EventCodec", "UndecodedEvent"]

log = logging.getLogger(__name__)

M = TypeVar("M")
E = TypeVar("E")


class CorruptEvent(StoreError):
    """A row of the log cannot be read at all (its envelope is not valid)."""


class UndecodedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Stand-in for an event this process cannot decode into its class.

    ``type_name`` is the stored type, ``data`` the event's fields as plain JSON values
    and ``error`` why it was not decoded ("unknown event type" or msgspec's message).
    Projections ignore it like any event type they do not handle.
    """

    kind: ClassVar[str] = ""

    type_name: str
    data: Any = None
    error: str = ""


class _Envelope(msgspec.Struct, Generic[M, E], frozen=True):
    """The stored JSON object: entity kind, metadata, event fields."""

    kind: str
    meta: M
    data: E


class EventCodec:
    """Turns (event, meta) into (topic, state bytes) and back.

    ``registry`` maps each event type name to its msgspec Struct class (see
    ``berthd.domain.registry_of``); ``meta_type`` is the metadata Struct class. Both are
    injected so that this package depends on nothing else of berthd's.
    """

    def __init__(self, registry: Mapping[str, type[Any]], meta_type: type[Any]) -> None:
        self._registry = dict(registry)
        self._meta_type = meta_type
        self._encoder = msgspec.json.Encoder()
        self._decoders: dict[str, msgspec.json.Decoder[_Envelope[Any, Any]]] = {
            name: msgspec.json.Decoder(_Envelope[meta_type, cls])  # type: ignore[valid-type]
            for name, cls in self._registry.items()
        }
        # Same envelope, data left as plain JSON values: the fallback for rows whose
        # type is unknown here or whose data no longer matches its class.
        self._generic = msgspec.json.Decoder(_Envelope[meta_type, Any])  # type: ignore[valid-type]
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    @property
    def registry(self) -> Mapping[str, type[Any]]:
        return self._registry

    def topic_of(self, event: Any) -> str:
        """The type name ``event`` is stored under; refuses types not in the registry,
        because a row its own readers cannot decode is a programming error."""
        name = type(event).__name__
        if self._registry.get(name) is not type(event):
            raise TypeError(
                f"event type {type(event).__module__}.{name} is not in the store's "
                "registry; add it to the registry passed to open_store()"
            )
        return name

    def encode(self, event: Any, meta: Any) -> tuple[str, bytes]:
        """(topic, state) for one event."""
        topic = self.topic_of(event)
        kind = getattr(type(event), "kind", "")
        return topic, self._encoder.encode(_Envelope(kind=kind, meta=meta, data=event))

    def decode(self, topic: str, state: bytes) -> tuple[str, Any, Any]:
        """(kind, meta, event) for one stored row; see the module docstring for what
        happens to rows that do not fit."""
        decoder = self._decoders.get(topic)
        if decoder is not None:
            try:
                env = decoder.decode(state)
            except msgspec.ValidationError as exc:
                return self._undecoded(topic, state, f"{exc}")
            except msgspec.DecodeError as exc:
                raise CorruptEvent(f"stored {topic} is not valid JSON: {exc}") from exc
            return env.kind, env.meta, env.data
        return self._undecoded(topic, state, "unknown event type")

    def _undecoded(self, topic: str, state: bytes, error: str) -> tuple[str, Any, Any]:
        try:
            env = self._generic.decode(state)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise CorruptEvent(f"stored {topic} has no readable envelope: {exc}") from exc
        self._note(topic, error)
        return env.kind, env.meta, UndecodedEvent(type_name=topic, data=env.data, error=error)

    def _note(self, topic: str, error: str) -> None:
        """Warn once per type (a log with thousands of them must not flood the log)."""
        with self._warned_lock:
            first = topic not in self._warned
            self._warned.add(topic)
        if first:
            log.warning(
                "events of type %s cannot be decoded (%s); passing them on as "
                "UndecodedEvent. Further occurrences are logged at debug level.",
                topic,
                error,
            )
        else:
            log.debug("undecoded event of type %s: %s", topic, error)
