"""Events are evolvable: payloads written by earlier versions must always decode.

``fixtures/events-0.1.json`` holds the minimal payload of every event type as version
0.1 wrote it. Never edit a fixture to make a test pass: a failure here means a change
broke old logs (a renamed class, a changed type, a new field without a default).
"""

from __future__ import annotations

import json
import pathlib

import msgspec
import pytest

from berthd.domain import EVENT_TYPES

FIXTURES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "events-0.1.json").read_text())


def test_every_event_type_has_an_old_payload_fixture() -> None:
    missing = sorted(set(EVENT_TYPES) - set(FIXTURES))
    assert not missing, f"add a payload fixture for {missing} (a new file for a new version)"


@pytest.mark.parametrize("type_name", sorted(FIXTURES))
def test_old_payload_decodes(type_name: str) -> None:
    assert type_name in EVENT_TYPES, f"event type {type_name} was renamed or removed"
    payload = json.dumps(FIXTURES[type_name]).encode()
    event = msgspec.json.decode(payload, type=EVENT_TYPES[type_name])
    assert type(event).__name__ == type_name


def test_no_event_field_shadows_the_entity_kind() -> None:
    """``kind`` is each event class's entity kind; a field of that name would replace it."""
    for name, cls in EVENT_TYPES.items():
        assert "kind" not in cls.__struct_fields__, name
        assert cls.kind, f"{name} has no entity kind"
