"""The warm pool on the fake runtime, the in-memory log and a real containers view."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from berthd.actors import CommandContext, Supervisor, system_clock
from berthd.actors import pool as pool_module
from berthd.actors.pool import POOL_LABEL, PoolKey, WarmPool
from berthd.domain import EVENT_TYPES
from berthd.domain import container as c
from berthd.domain.errors import RuntimeFailed
from berthd.events import open_store
from berthd.events.projection import ProjectionRunner
from berthd.events.readmodels import ContainersView
from berthd.events.store import EventStore
from berthd.runtime import base as rt
from berthd.runtime.fake import FakeRuntime

CTX = CommandContext(principal="k1", owner="k1", is_admin=False, correlation_id="run-1")
NODE = "node0pool000"
KEY = PoolKey("fake", "host", "default")


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class World:
    def __init__(self) -> None:
        self.store: EventStore = open_store("memory", EVENT_TYPES)
        self.view = ContainersView()
        self.runner = ProjectionRunner(self.store, [self.view])
        self.runner.start()
        self.runtime = FakeRuntime(NODE)
        self.workers = ThreadPoolExecutor(max_workers=32)
        self.sup = Supervisor(store=self.store, runtimes={"fake": self.runtime}, default_runtime="fake",
                              workers=self.workers, clock=system_clock, node_id=NODE,
                              name_taken=self.view.name_taken)
        self.sup.start()
        self.pools: list[WarmPool] = []

    def pool(self, **kw: object) -> WarmPool:
        p = WarmPool(self.sup, self.view, default_image="host", sweep_interval=0.2, **kw)  # type: ignore[arg-type]
        p.start()
        self.pools.append(p)
        return p

    def status(self, berth_id: str) -> str:
        self.runner.wait_for(self.store.head(), 5)
        state = self.view.get(berth_id)
        return state.status if state else "?"

    def live_pool_sandboxes(self) -> list[c.ContainerState]:
        self.runner.wait_for(self.store.head(), 5)
        return [s for s in self.view.all() if s.labels.get(POOL_LABEL) == "1" and s.status not in c.FINAL]

    def close(self) -> None:
        for p in self.pools:
            p.stop()
        self.sup.stop()
        self.runner.stop()
        self.runtime.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.store.close()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


def echo(*args: str, **kw: object) -> c.ExecInContainer:
    return c.ExecInContainer(command=["echo", *args], **kw)  # type: ignore[arg-type]


def test_configured_keys_are_warmed_at_start_as_system_pool_entities(world: World) -> None:
    pool = world.pool(size=2, warm=[KEY])
    eventually(lambda: pool.stats()["available"] == 2)
    sandboxes = world.live_pool_sandboxes()
    assert len(sandboxes) == 2
    assert all(s.status == "running" and s.command == ["sleep", "infinity"] for s in sandboxes)
    for s in sandboxes:
        assert {r.meta.principal for r in world.store.read_stream(s.id)} == {"system"}


def test_hit_runs_in_a_warm_sandbox_and_removes_it(world: World) -> None:
    pool = world.pool(size=1, warm=[KEY])
    eventually(lambda: pool.stats()["available"] == 1)
    warm_id = world.live_pool_sandboxes()[0].id
    lease, out = pool.run(KEY, echo("hi"), CTX)
    assert lease.source == "hit" and lease.container_id == warm_id
    assert out.result.exit_code == 0 and out.result.stdout == b"hi\n"
    eventually(lambda: world.status(warm_id) == "removed")
    recs = world.store.read_stream(warm_id)
    run_recs = [r for r in recs if r.type in ("ExecStarted", "ExecFinished", "ContainerRemoveRequested")]
    assert [r.type for r in run_recs] == ["ExecStarted", "ExecFinished", "ContainerRemoveRequested"]
    assert all(r.meta.principal == "k1" for r in run_recs)
    s = pool.stats()
    assert (s["hits"], s["misses"], s["cold"]) == (1, 0, 0)
    assert s["keys"][0]["hits"] == 1


def test_miss_creates_cold_then_refill_makes_the_next_a_hit(world: World) -> None:
    pool = world.pool(size=2)
    lease, out = pool.run(KEY, echo("one"), CTX)
    assert lease.source == "miss" and out.result.stdout == b"one\n"
    # the cold one belongs to the caller
    assert world.store.read_stream(lease.container_id)[0].meta.principal == "k1"
    eventually(lambda: pool.stats()["available"] == 2)  # the key is now used: topped up
    lease2, _ = pool.run(KEY, echo("two"), CTX)
    assert lease2.source == "hit"
    eventually(lambda: pool.stats()["available"] == 2)  # and refilled after the take
    s = pool.stats()
    assert (s["hits"], s["misses"]) == (1, 1)


def test_fast_false_is_cold_and_not_counted_as_a_miss(world: World) -> None:
    pool = world.pool(size=1, warm=[KEY])
    eventually(lambda: pool.stats()["available"] == 1)
    lease, _ = pool.run(KEY, echo("x"), CTX, fast=False)
    assert lease.source == "cold"
    s = pool.stats()
    assert (s["hits"], s["misses"], s["cold"], s["available"]) == (0, 0, 1, 1)


def test_a_used_sandbox_is_never_handed_out_again(world: World) -> None:
    pool = world.pool(size=2, warm=[KEY])
    eventually(lambda: pool.stats()["available"] == 2)
    seen: list[str] = []
    for i in range(6):
        lease, out = pool.run(KEY, echo(str(i)), CTX)
        assert out.result.stdout == f"{i}\n".encode()
        seen.append(lease.container_id)
    assert len(set(seen)) == 6
    for berth_id in seen:
        eventually(lambda berth_id=berth_id: world.status(berth_id) == "removed")  # type: ignore[misc]


def test_removed_even_when_the_exec_fails(world: World) -> None:
    pool = world.pool(size=1, warm=[KEY])
    eventually(lambda: pool.stats()["available"] == 1)
    warm_id = world.live_pool_sandboxes()[0].id
    world.runtime.fail_next("exec", rt.RuntimeFailure("exec exploded"))
    with pytest.raises(RuntimeFailed):
        pool.run(KEY, echo("x"), CTX)
    eventually(lambda: world.status(warm_id) == "removed")
    assert "ExecFailed" in [r.type for r in world.store.read_stream(warm_id)]


def test_removed_when_the_command_times_out_or_fails(world: World) -> None:
    pool = world.pool(size=1, warm=[KEY])
    lease, out = pool.run(KEY, c.ExecInContainer(command=["sleep", "30"], timeout=0.3), CTX)
    assert out.result.timed_out
    eventually(lambda: world.status(lease.container_id) == "removed")
    lease, out = pool.run(KEY, c.ExecInContainer(command=["sh", "-c", "exit 3"]), CTX)
    assert out.result.exit_code == 3
    eventually(lambda: world.status(lease.container_id) == "removed")


def test_a_warm_sandbox_that_died_is_not_handed_out(world: World) -> None:
    pool = world.pool(size=1, warm=[KEY], )
    eventually(lambda: pool.stats()["available"] == 1)
    dead = world.live_pool_sandboxes()[0].id
    world.runtime.exit_behind_our_back(dead, 137)
    eventually(lambda: world.status(dead) == "exited")
    lease, out = pool.run(KEY, echo("ok"), CTX)
    assert lease.container_id != dead and out.result.stdout == b"ok\n"
    eventually(lambda: world.status(dead) == "removed")


def test_create_failure_is_reported_and_backed_off(world: World) -> None:
    pool = world.pool(size=1)
    key = PoolKey("fake", "nope:latest", "default")
    with pytest.raises(Exception, match="not found"):
        pool.acquire(key, CTX)
    eventually(lambda: pool.stats()["keys"][0]["last_error"] is not None)
    assert pool.stats()["available"] == 0


def test_stop_removes_idle_sandboxes(world: World) -> None:
    pool = world.pool(size=3, warm=[KEY, PoolKey("fake", "berthd-test/busybox:latest", "default")])
    eventually(lambda: pool.stats()["available"] == 6)
    pool.stop()
    eventually(lambda: world.live_pool_sandboxes() == [])
    assert world.runtime.list_managed(NODE) == []
    assert pool.stats()["available"] == 0


def test_leftovers_from_a_crash_are_removed_at_start(world: World) -> None:
    left = world.sup.create_container(c.CreateContainer(
        image="host", command=["sleep", "infinity"], labels={POOL_LABEL: "1"}), CTX).result(10).state
    other = world.sup.create_container(c.CreateContainer(
        image="host", command=["sleep", "infinity"]), CTX).result(10).state
    world.runner.wait_for(world.store.head(), 5)
    pool = world.pool(size=0)
    assert pool.leftovers_removed == 1
    eventually(lambda: world.status(left.id) == "removed")
    assert world.status(other.id) == "running"


def test_size_zero_means_every_fast_run_is_a_miss(world: World) -> None:
    pool = world.pool(size=0)
    for _ in range(2):
        lease, _ = pool.run(KEY, echo("x"), CTX)
        assert lease.source == "miss"
    time.sleep(0.3)
    assert pool.stats()["available"] == 0 and pool.stats()["misses"] == 2


class _SlowAgents:
    """Stands in for the runtime's exec agents (``berthd.kernel.exec_agent``): records which
    sandboxes the pool warms, and lets each warm-up finish only when told."""

    def __init__(self) -> None:
        self.warmed: list[str] = []
        self.go = threading.Event()

    def warm(self, berth_id: str, *, wait: bool = True) -> bool:
        self.warmed.append(berth_id)
        self.go.wait(10)
        return True

    def stats(self) -> dict[str, int]:
        return {}


def test_a_sandbox_is_offered_only_once_its_exec_agent_was_started(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = _SlowAgents()
    monkeypatch.setattr(pool_module, "exec_agents", lambda runtime: agents)
    pool = world.pool(size=1, warm=[KEY])
    eventually(lambda: len(agents.warmed) == 1)
    assert world.status(agents.warmed[0]) == "running"
    assert pool.stats()["available"] == 0 and pool.stats()["keys"][0]["creating"] == 1
    agents.go.set()
    eventually(lambda: pool.stats()["available"] == 1)
    lease, out = pool.run(KEY, echo("hi"), CTX)
    assert lease.source == "hit" and lease.container_id == agents.warmed[0]


def test_stop_removes_a_sandbox_whose_agent_is_still_starting(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = _SlowAgents()
    monkeypatch.setattr(pool_module, "exec_agents", lambda runtime: agents)
    pool = world.pool(size=1, warm=[KEY])
    eventually(lambda: len(agents.warmed) == 1)
    stopping = threading.Thread(target=pool.stop)
    stopping.start()
    agents.go.set()
    stopping.join(30)
    eventually(lambda: world.live_pool_sandboxes() == [])
    assert pool.stats()["available"] == 0
