"""The Idempotency-Key store on a real SQLite file, with a hand-moved clock."""

from __future__ import annotations

import os
import pathlib
import stat
from datetime import UTC, datetime, timedelta

from berthd.http.idempotency import Answer, IdempotencyStore, InProgress, Mismatch, Started
from berthd.http.precondition import matches


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


ANSWER = Answer(201, {"Content-Type": "application/json", "ETag": '"3"'}, b'{"id":"c1"}')


def test_first_runs_then_replays_refuses_or_waits(tmp_path: pathlib.Path) -> None:
    store = IdempotencyStore(str(tmp_path / "idem.db"), FakeClock())
    try:
        assert isinstance(store.begin("k1", "abc", "fp1"), Started)
        assert isinstance(store.begin("k1", "abc", "fp1"), InProgress)
        assert isinstance(store.begin("k1", "abc", "fp2"), Mismatch)
        assert isinstance(store.begin("k2", "abc", "fp2"), Started)  # keys are per principal
        store.finish("k1", "abc", ANSWER)
        assert store.begin("k1", "abc", "fp1") == ANSWER
        assert isinstance(store.begin("k1", "abc", "fp2"), Mismatch)
        store.abandon("k2", "abc")  # a 5xx frees the key
        assert isinstance(store.begin("k2", "abc", "fp3"), Started)
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "idem.db").st_mode) == 0o600


def test_answers_survive_a_reopen_and_running_rows_do_not(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "idem.db")
    store = IdempotencyStore(path, FakeClock())
    store.begin("k1", "done", "fp")
    store.finish("k1", "done", ANSWER)
    store.begin("k1", "running", "fp")  # the daemon dies before it answers
    store.close()
    again = IdempotencyStore(path, FakeClock())
    try:
        assert again.begin("k1", "done", "fp") == ANSWER
        assert isinstance(again.begin("k1", "running", "fp"), Started)
    finally:
        again.close()


def test_keys_expire_after_the_ttl(tmp_path: pathlib.Path) -> None:
    clock = FakeClock()
    store = IdempotencyStore(str(tmp_path / "idem.db"), clock, ttl=3600)
    try:
        store.begin("k1", "a", "fp")
        store.finish("k1", "a", ANSWER)
        clock.now += timedelta(minutes=59)
        assert store.begin("k1", "a", "fp") == ANSWER
        clock.now += timedelta(minutes=2)
        assert isinstance(store.begin("k1", "a", "other"), Started)  # expired: a new request
        store.begin("k1", "b", "fp")
        clock.now += timedelta(hours=2)
        assert store.purge() == 2
    finally:
        store.close()


def test_if_match_forms() -> None:
    assert matches('"3"', 3) and matches('W/"3"', 3) and matches("*", 3) and matches('"1", "3"', 3)
    assert matches("3", 3)
    assert not matches('"2"', 3) and not matches('W/"4", "5"', 3)
