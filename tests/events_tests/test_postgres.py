"""The event store contract on PostgreSQL, plus what only PostgreSQL has: schemas,
LISTEN/NOTIFY wake-ups, a server that goes away."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest

from berthd.events import EventStore, PostgresEventStore, StoreUnavailable, open_store
from tests.events_tests.contract import EventStoreContract, SharedStorageContract
from tests.events_tests.sample import REGISTRY, ThingCreated, ThingRenamed, meta

pytestmark = pytest.mark.integration


class TestPostgresStore(EventStoreContract, SharedStorageContract):
    @pytest.fixture(autouse=True)
    def _schema(self, pg_url: str) -> None:
        self.url = pg_url

    def new_store(self, registry: Mapping[str, type[Any]]) -> EventStore:
        return open_store(self.url, registry)


def test_schema_and_table_are_created(pg_url: str, postgres_url: str) -> None:
    store = open_store(f"{pg_url}&table=my_events&pool_size=2", REGISTRY)
    assert isinstance(store, PostgresEventStore)
    try:
        store.append("s1", 0, [ThingCreated(name="a")], meta())
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = 'my_events'",
                (store.schema,),
            ).fetchone()
            assert row == (1,)
    finally:
        store.close()


def test_bad_url_parameters_are_refused(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="unknown PostgreSQL URL parameter"):
        open_store(f"{postgres_url}?colour=blue", REGISTRY)
    with pytest.raises(ValueError, match="no database"):
        open_store("postgresql://berthd:berthd@127.0.0.1:5432/", REGISTRY)


def test_unreachable_server_is_unavailable() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store("postgresql://berthd:berthd@127.0.0.1:1/berthd_test", REGISTRY)
    assert time.monotonic() - started < 10


def test_wrong_password_is_unavailable(postgres_url: str) -> None:
    url = postgres_url.replace("berthd:berthd@", "berthd:wrong@")
    with pytest.raises(StoreUnavailable):
        open_store(url, REGISTRY)


def test_listen_wakes_another_store_without_polling(pg_url: str) -> None:
    slow = f"{pg_url}&poll_interval=30"
    a, b = open_store(slow, REGISTRY), open_store(slow, REGISTRY)
    try:
        b.wait_for_append(0, timeout=0.3)  # first call polls; the LISTEN is set up by now
        head = b.head()
        time.sleep(0.1)
        woke: list[float] = []
        thread = threading.Thread(
            target=lambda: woke.append(time.monotonic()) if b.wait_for_append(head, 10) else None
        )
        thread.start()
        time.sleep(0.1)
        started = time.monotonic()
        a.append("s1", 0, [ThingCreated(name="a")], meta())
        thread.join(timeout=11)
        assert woke, "not woken within 10 s"
        assert woke[0] - started < 0.5
    finally:
        a.close()
        b.close()


def test_store_survives_killed_connections(pg_url: str, postgres_url: str) -> None:
    """What a server restart does to clients: every connection killed. The next calls
    reconnect instead of failing or stalling, and the LISTEN connections come back."""
    table = f"ev_{uuid.uuid4().hex[:8]}"
    url = f"{pg_url}&table={table}&poll_interval=30"
    a, b = open_store(url, REGISTRY), open_store(url, REGISTRY)
    assert isinstance(a, PostgresEventStore) and isinstance(b, PostgresEventStore)
    listen_query = f'LISTEN "{table}"'

    def listeners(admin: psycopg.Connection[Any]) -> set[int]:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s", (listen_query,)
        ).fetchall()
        return {pid for (pid,) in rows}

    def wait_for_listeners(admin: psycopg.Connection[Any], old: set[int]) -> set[int]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = listeners(admin)
            if len(pids) == 2 and not pids & old:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"LISTEN connections not (re)established: {listeners(admin)}")

    try:
        a.append("s1", 0, [ThingCreated(name="a")], meta())
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            # This test's own backends only: every pooled connection, and the LISTENers.
            pids = wait_for_listeners(admin, set())
            listening = set(pids)
            for store in (a, b):
                with ExitStack() as stack:
                    for _ in range(5):
                        conn = stack.enter_context(store.datastore.get_connection())
                        row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
                        assert row is not None
                        pids.add(row["pid"])
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            started = time.monotonic()
            recs = a.append("s1", 1, [ThingRenamed(name="b")], meta())
            assert [r.version for r in b.read_stream("s1")] == [1, 2]
            assert time.monotonic() - started < 2.5
            wait_for_listeners(admin, listening)

        woke: list[float] = []
        thread = threading.Thread(
            target=lambda: (
                woke.append(time.monotonic()) if b.wait_for_append(recs[-1].position, 10) else None
            )
        )
        thread.start()
        time.sleep(0.1)
        started = time.monotonic()
        a.append("s1", 2, [ThingRenamed(name="c")], meta())
        thread.join(timeout=11)
        assert woke and woke[0] - started < 0.5  # by NOTIFY: the poll is every 30 s
    finally:
        a.close()
        b.close()
