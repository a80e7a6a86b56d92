"""The row format: round trips, old payloads, rows this version cannot decode."""

from __future__ import annotations

import logging

import msgspec
import pytest

from berthd.domain.base import Meta
from berthd.events import CorruptEvent, EventCodec, UndecodedEvent
from tests.events_tests.sample import (
    REGISTRY,
    NoteAdded,
    ThingCreated,
    ThingRenamed,
    Unregistered,
    meta,
)


@pytest.fixture
def codec() -> EventCodec:
    return EventCodec(REGISTRY, Meta)


def test_round_trip(codec: EventCodec) -> None:
    m = meta(principal="admin", correlation_id="c1", request_id="r1", node_id="n1")
    for event in (
        ThingCreated(name="web", size=2),
        ThingRenamed(name="api", reason="typo"),
        NoteAdded(text="héllo ✓", tags=("a", "b")),
    ):
        topic, state = codec.encode(event, m)
        assert topic == type(event).__name__
        assert codec.decode(topic, state) == (type(event).kind, m, event)


def test_stored_shape(codec: EventCodec) -> None:
    """The documented envelope, and metadata without its unset fields."""
    topic, state = codec.encode(ThingCreated(name="web"), meta(principal="admin"))
    assert topic == "ThingCreated"
    assert state == (
        b'{"kind":"thing","meta":{"timestamp":"2026-11-22T10:00:00Z","principal":"admin"},'
        b'"data":{"name":"web","size":0}}'
    )
    assert list(msgspec.json.decode(state)) == ["kind", "meta", "data"]


# One payload per event type as an older berthd stored it. Never edit these: they are
# what is on disk in existing logs. Add one when an event type is added.
OLD_PAYLOADS = {
    "ThingCreated": (
        b'{"kind":"thing","meta":{"timestamp":"2025-01-02T03:04:05Z"},"data":{"name":"web"}}',
        ThingCreated(name="web", size=0),
    ),
    # Written before ThingRenamed had "reason".
    "ThingRenamed": (
        b'{"kind":"thing","meta":{"timestamp":"2025-01-02T03:04:05Z","principal":"k1"},'
        b'"data":{"name":"api"}}',
        ThingRenamed(name="api", reason=""),
    ),
    "NoteAdded": (
        b'{"kind":"note","meta":{"timestamp":"2025-01-02T03:04:05Z"},"data":{"text":"x"}}',
        NoteAdded(text="x"),
    ),
}


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
def test_old_payloads_still_decode(codec: EventCodec, type_name: str) -> None:
    state, expected = OLD_PAYLOADS[type_name]
    kind, m, event = codec.decode(type_name, state)
    assert event == expected
    assert kind == type(expected).kind
    assert m.timestamp == "2025-01-02T03:04:05Z"


def test_unknown_type_becomes_undecoded_and_is_logged_once(
    codec: EventCodec, caplog: pytest.LogCaptureFixture
) -> None:
    state = b'{"kind":"thing","meta":{"timestamp":"2026-01-01T00:00:00Z"},"data":{"why":"x"}}'
    with caplog.at_level(logging.DEBUG, logger="berthd.events.codec"):
        for _ in range(3):
            kind, m, event = codec.decode("ThingArchived", state)
            assert kind == "thing" and m == Meta(timestamp="2026-01-01T00:00:00Z")
            assert event == UndecodedEvent(
                type_name="ThingArchived", data={"why": "x"}, error="unknown event type"
            )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ThingArchived" in warnings[0].getMessage()


def test_data_that_no_longer_fits_becomes_undecoded(codec: EventCodec) -> None:
    state = b'{"kind":"thing","meta":{"timestamp":"2026-01-01T00:00:00Z"},"data":{"size":1}}'
    _, _, event = codec.decode("ThingCreated", state)
    assert isinstance(event, UndecodedEvent)
    assert event.type_name == "ThingCreated" and event.data == {"size": 1}
    assert "name" in event.error


@pytest.mark.parametrize(
    "state",
    [
        b"not json",
        b'{"kind":"thing","data":{"name":"x"}}',  # no meta
        b'{"kind":"thing","meta":{"principal":"x"},"data":{"name":"x"}}',  # no timestamp
    ],
)
def test_unreadable_envelope_is_corrupt(codec: EventCodec, state: bytes) -> None:
    for topic in ("ThingCreated", "SomethingUnknown"):
        with pytest.raises(CorruptEvent):
            codec.decode(topic, state)


def test_unregistered_types_cannot_be_encoded(codec: EventCodec) -> None:
    with pytest.raises(TypeError, match="registry"):
        codec.encode(Unregistered(), meta())

    class ThingCreated(Unregistered, frozen=True, kw_only=True):  # same name, other class
        pass

    with pytest.raises(TypeError, match="registry"):
        codec.encode(ThingCreated(), meta())
