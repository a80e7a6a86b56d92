"""Projection checkpoints: a view restored from a checkpoint and fed the tail equals the
same view fed the whole log; a checkpoint that is corrupt, of another schema or of
another log is ignored and the view replayed in full. Real SQLite files throughout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from berthd.domain import EVENT_TYPES
from berthd.domain import container as c
from berthd.domain import image as im
from berthd.domain import node as n
from berthd.domain.base import Meta
from berthd.events import EventStore, Projection, Recorded, open_store
from berthd.events.projection import CheckpointDir, ProjectionRunner
from berthd.events.readmodels import (
    AuditView,
    ContainersView,
    ImagesView,
    KernelsView,
    KeysView,
    ResultsView,
    SessionsView,
)


def views() -> list[Projection]:
    return [ContainersView(), ImagesView(), AuditView(), KeysView(), KernelsView(), ResultsView(),
            SessionsView()]


def meta(i: int, principal: str | None = "admin") -> Meta:
    return Meta(timestamp=f"2026-11-22T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z", node_id="n1",
                principal=principal, correlation_id=f"corr-{i}" if i % 3 else None,
                request_id=f"req-{i}" if i % 2 else None)


def write_containers(store: EventStore, first: int, count: int) -> None:
    """``count`` containers, each created, started, exec'd; every other one removed."""
    for i in range(first, first + count):
        bid = f"c{i:04d}"
        events: list[Any] = [
            c.ContainerCreateRequested(id=bid, name=f"box-{i}", image="busybox", runtime="local",
                                       labels={"i": str(i)}, created_at="2026-11-22T10:00:00.000Z"),
            c.ContainerCreated(runtime_ref=f"ref{i}"),
            c.ContainerStarted(started_at="2026-11-22T10:00:01.000Z"),
            c.ExecStarted(exec_id=f"x{i}", command=["true"]),
            c.ExecFinished(exec_id=f"x{i}", exit_code=0, duration_ms=1.5),
        ]
        if i % 2:
            events += [c.ContainerExited(exit_code=0, reason="stopped"), c.ContainerRemoveRequested(),
                       c.ContainerRemoved()]
        store.append(bid, 0, events, meta(i, principal=None if i % 5 == 0 else f"key{i % 3}"))


def write_others(store: EventStore, tag: str) -> None:
    store.append(f"key-{tag}", 0, [n.ApiKeyCreated(key_id=tag, name=tag, role="user", key_hash=f"h{tag}",
                                                   created_at="2026-11-22T10:00:00.000Z")], meta(1))
    store.append(f"image-{tag}", 0, [im.ImagePulled(ref=f"img:{tag}", image_id=f"sha256:{tag}",
                                                    runtime="local")], meta(2))


def state_of(view: Projection) -> bytes:
    """Everything a view holds, as bytes to compare (its checkpoint state, encoded)."""
    return msgspec.msgpack.encode(view.checkpoint_state())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = open_store(str(tmp_path / "log.db"), EVENT_TYPES)
    yield s
    s.close()


def full_replay(store: EventStore) -> list[Projection]:
    fresh = views()
    ProjectionRunner(store, fresh).catch_up()
    return fresh


def checkpointed_at_half(store: EventStore, ckpt: CheckpointDir) -> int:
    """Half the log, a checkpoint of every view, then the other half (the tail)."""
    write_containers(store, 0, 40)
    write_others(store, "a")
    first = ProjectionRunner(store, views(), checkpoints=ckpt)
    first.catch_up()
    assert first.save_checkpoints() == 7
    write_containers(store, 40, 40)
    store.append("c0000", 5, [c.ContainerStopRequested()], meta(99))  # an old stream moves on
    write_others(store, "b")
    store.append("key-a", 1, [n.ApiKeyRevoked(key_id="a")], meta(100))
    return first.position


def test_restored_plus_tail_equals_full_replay(store: EventStore, tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    at = checkpointed_at_half(store, ckpt)
    restored = views()
    runner = ProjectionRunner(store, restored, checkpoints=ckpt)
    assert runner.restore_checkpoints() == {v.name: at for v in restored}
    assert runner.position == at
    applied = runner.catch_up()
    assert applied == store.head() - at  # only the tail was replayed
    for mine, theirs in zip(restored, full_replay(store), strict=True):
        assert state_of(mine) == state_of(theirs), mine.name
    audit = restored[2]
    assert isinstance(audit, AuditView)
    expected = full_replay(store)[2]
    assert isinstance(expected, AuditView)
    for query in ({}, {"entity": "c0000"}, {"principal": "key1"}, {"since": "2026-11-22T10:00:30.000Z"},
                  {"limit": 7, "offset": 11}, {"entity": "nope"}, {"principal": "nobody"}):
        assert audit.query(**query) == expected.query(**query), query
    assert audit.query(entity="c0000")[1] == 6
    keys = restored[3]
    assert isinstance(keys, KeysView)
    assert keys.by_id["a"].revoked and "ha" not in keys.by_hash and "hb" in keys.by_hash


def test_views_checkpointed_at_different_positions_catch_up_each_from_its_own(
    store: EventStore, tmp_path: Path
) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    checkpointed_at_half(store, ckpt)
    ckpt.remove("containers")  # this one must be replayed from the start, the others not
    restored = views()
    runner = ProjectionRunner(store, restored, checkpoints=ckpt)
    positions = runner.restore_checkpoints()
    assert positions["containers"] == 0 and positions["audit"] > 0
    assert runner.position == 0
    runner.catch_up()
    for mine, theirs in zip(restored, full_replay(store), strict=True):
        assert state_of(mine) == state_of(theirs), mine.name  # audit has no duplicates
    assert runner.save_checkpoints() == 7  # and now all are saved at the head


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty"])
def test_a_corrupt_checkpoint_means_a_full_replay(store: EventStore, tmp_path: Path, damage: str) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    checkpointed_at_half(store, ckpt)
    path = ckpt.file("audit")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # the state still decodes, but the checksum does not match
        i = len(data) - 40
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    elif damage == "garbage":
        path.write_bytes(b"\x93not a checkpoint")
    else:
        path.write_bytes(b"")
    restored = views()
    runner = ProjectionRunner(store, restored, checkpoints=ckpt)
    positions = runner.restore_checkpoints()
    assert positions["audit"] == 0 and positions["containers"] > 0
    runner.catch_up()
    for mine, theirs in zip(restored, full_replay(store), strict=True):
        assert state_of(mine) == state_of(theirs), mine.name


def test_a_checkpoint_whose_columns_disagree_is_ignored(store: EventStore, tmp_path: Path) -> None:
    """Intact bytes but inconsistent content (as a buggy writer could leave) are refused too."""
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    write_containers(store, 0, 3)
    audit = AuditView()
    runner = ProjectionRunner(store, [audit], checkpoints=ckpt)
    runner.catch_up()
    audit.timestamps.pop()  # one column a row short
    runner.save_checkpoints()
    again = AuditView()
    fresh = ProjectionRunner(store, [again], checkpoints=ckpt)
    assert fresh.restore_checkpoints() == {"audit": 0}
    fresh.catch_up()
    assert len(again.positions) == store.head()


class ContainersV2(ContainersView):
    """The same view after a change in what ``apply`` makes of events."""

    checkpoint_version: ClassVar[int] = 2


class NamesOnly(Projection):
    """A view whose checkpointed fields differ from ContainersView's (another schema)."""

    name = "containers"
    checkpoint_fields: ClassVar[dict[str, Any]] = {"by_name": dict[str, str]}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_name: dict[str, str] = {}

    def apply(self, rec: Recorded) -> None:
        if isinstance(rec.event, c.ContainerCreateRequested):
            self.by_name[rec.event.name] = rec.stream_id


@pytest.mark.parametrize("newer", [ContainersV2, NamesOnly])
def test_a_checkpoint_of_another_version_is_ignored(
    store: EventStore, tmp_path: Path, newer: type[Projection]
) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    checkpointed_at_half(store, ckpt)
    view = newer()
    runner = ProjectionRunner(store, [view], checkpoints=ckpt)
    assert runner.restore_checkpoints() == {"containers": 0}
    runner.catch_up()
    names = view.by_name  # type: ignore[attr-defined]
    assert "box-0" in names and "box-78" in names  # replayed from the very first event


def test_a_checkpoint_of_another_log_is_ignored(store: EventStore, tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    checkpointed_at_half(store, ckpt)
    other = open_store(str(tmp_path / "other.db"), EVENT_TYPES)
    try:
        write_containers(other, 500, 50)  # as long as the first log, other streams
        restored = views()
        runner = ProjectionRunner(other, restored, checkpoints=ckpt)
        assert set(runner.restore_checkpoints().values()) == {0}
        runner.catch_up()
        containers = restored[0]
        assert isinstance(containers, ContainersView)
        assert sorted(containers.by_id)[0] == "c0500"
    finally:
        other.close()


def test_a_checkpoint_beyond_the_log_is_ignored(tmp_path: Path) -> None:
    """The log was restored from an older backup: the checkpoint is ahead of it."""
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    big = open_store(str(tmp_path / "big.db"), EVENT_TYPES)
    try:
        write_containers(big, 0, 10)
        runner = ProjectionRunner(big, views(), checkpoints=ckpt)
        runner.catch_up()
        runner.save_checkpoints()
    finally:
        big.close()
    small = open_store(str(tmp_path / "small.db"), EVENT_TYPES)
    try:
        write_containers(small, 0, 2)
        runner = ProjectionRunner(small, views(), checkpoints=ckpt)
        assert set(runner.restore_checkpoints().values()) == {0}
    finally:
        small.close()


class Sneaky(ContainersView):
    """Holds state its checkpoint_fields do not list: must not be checkpointed."""

    def reset(self) -> None:
        super().reset()
        self.extra: dict[str, int] = {}


def test_a_view_with_state_outside_its_fields_is_not_checkpointed(
    store: EventStore, tmp_path: Path
) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    write_containers(store, 0, 3)
    runner = ProjectionRunner(store, [Sneaky(), AuditView()], checkpoints=ckpt)
    runner.catch_up()
    assert runner.save_checkpoints() == 1
    assert not ckpt.file("containers").exists() and ckpt.file("audit").exists()


class FailsOnExec(ContainersView):
    def apply(self, rec: Recorded) -> None:
        if isinstance(rec.event, c.ExecStarted):
            raise RuntimeError("boom")
        super().apply(rec)


def test_a_view_that_failed_is_not_saved_and_its_old_checkpoint_is_dropped(
    store: EventStore, tmp_path: Path
) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    ckpt.write("containers", b"an older checkpoint")
    write_containers(store, 0, 2)
    runner = ProjectionRunner(store, [FailsOnExec()], checkpoints=ckpt)
    runner.catch_up()
    assert runner.failures == {"containers": 2}
    assert runner.save_checkpoints() == 0
    assert not ckpt.file("containers").exists()


def test_the_runner_thread_saves_periodically(store: EventStore, tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    runner = ProjectionRunner(store, views(), checkpoints=ckpt, checkpoint_every=10, checkpoint_interval=0)
    runner.start()
    try:
        write_containers(store, 0, 4)
        assert runner.wait_for(store.head(), timeout=10)
        write_containers(store, 4, 1)  # the next batch after 10+ events saves
        assert runner.wait_for(store.head(), timeout=10)
        for _ in range(200):
            if ckpt.file("audit").exists():
                break
            runner.wait_for(store.head() + 1, timeout=0.05)
        assert ckpt.file("audit").exists()
    finally:
        runner.stop()
    restored = views()
    fresh = ProjectionRunner(store, restored, checkpoints=ckpt)
    assert min(fresh.restore_checkpoints().values()) >= 10
    fresh.catch_up()
    for mine, theirs in zip(restored, full_replay(store), strict=True):
        assert state_of(mine) == state_of(theirs), mine.name


def test_no_checkpoint_dir_means_no_checkpoints(store: EventStore) -> None:
    write_containers(store, 0, 2)
    runner = ProjectionRunner(store, views())
    assert set(runner.restore_checkpoints().values()) == {0}
    runner.catch_up()
    assert runner.save_checkpoints() == 0


def test_the_daemon_saves_checkpoints_on_a_clean_stop_and_boots_from_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The wiring in ``Daemon``: a real daemon (SQLite, fake runtime, loopback)."""
    import logging

    from berthd.daemon.config import Config
    from berthd.daemon.lifecycle import Daemon
    from berthd.runtime.fake import FakeRuntime

    data = tmp_path / "data"

    def daemon() -> Daemon:
        return Daemon(Config(data_dir=str(data), socket=False, pool_size=0,  # type: ignore[arg-type]
                             listen="127.0.0.1:0", ws_listen="127.0.0.1:0"),
                      runtimes={"fake": FakeRuntime("n1")})

    first = daemon()
    first.start()
    try:
        write_containers(first.store, 0, 5)
        assert first.deps is not None and first.deps.runner.wait_for(first.store.head(), 10)
    finally:
        first.stop()
    files = sorted(p.name for p in (data / "checkpoints").iterdir())
    assert files == sorted(f"{v.name}.ckpt" for v in views())
    second = daemon()
    with caplog.at_level(logging.INFO, logger="berthd.events.projection"):
        second.start()
    try:
        assert "projection containers restored at position" in caplog.text
        assert second.deps is not None
        containers = second.deps.containers
        assert sorted(containers.by_id) == [f"c{i:04d}" for i in range(5)]
        assert containers.get("box-0") is not None and containers.get("box-1") is None  # removed
    finally:
        second.stop()
