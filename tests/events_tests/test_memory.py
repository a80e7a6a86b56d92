"""The event store contract on the in-memory backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from berthd.events import EventStore, MemoryEventStore, open_store
from tests.events_tests.contract import EventStoreContract
from tests.events_tests.sample import REGISTRY


class TestMemoryStore(EventStoreContract):
    def new_store(self, registry: Mapping[str, type[Any]]) -> EventStore:
        return open_store("memory", registry)


def test_memory_url_forms() -> None:
    for url in ("memory", "memory://"):
        store = open_store(url, REGISTRY)
        assert isinstance(store, MemoryEventStore)
        store.close()
