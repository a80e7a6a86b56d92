"""The WebSocket listener on real loopback servers, driven by websockets' sync client.

Each test builds real components (memory log, projection runner, read models,
supervisor with the fake or the local runtime) and a ``WebSocketServer`` on 127.0.0.1
port 0; everything started is stopped in the fixture's ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect, unix_connect

from berthd.actors import CommandContext, ImageService, Supervisor, system_clock
from berthd.domain import EVENT_TYPES
from berthd.domain import container as c
from berthd.domain import node as n
from berthd.domain.base import Event, Meta
from berthd.events import ProjectionRunner, open_store
from berthd.events.readmodels import AuditView, ContainersView, ImagesView, KeysView
from berthd.events.store import EventStore
from berthd.http.auth import Authenticator, hash_key
from berthd.http.deps import Deps, Limits
from berthd.http.ws import WebSocketServer
from berthd.runtime.base import Runtime
from berthd.runtime.fake import FakeRuntime
from berthd.runtime.local import LocalRuntime

NODE = "node0ws00000"
ADMIN_KEY = "admin-key-for-ws-tests"
USER_KEY = "user-key-for-ws-tests"
ADMIN = CommandContext()
USER = CommandContext(principal="u1", owner="u1", is_admin=False)
TIMEOUT = 10.0


# ---------------------------------------------------------------------- the world


@dataclass
class World:
    """Everything one test talks to, and how to reach the server."""

    deps: Deps
    store: EventStore
    runner: ProjectionRunner
    supervisor: Supervisor
    runtime: Runtime
    image: str
    server: WebSocketServer
    stack: contextlib.ExitStack = field(repr=False)

    def url(self, path: str) -> str:
        address = self.server.tcp_address
        assert address is not None
        return f"ws://{address[0]}:{address[1]}{path}"

    def connect(self, path: str, key: str | None = ADMIN_KEY, **kw: Any) -> ClientConnection:
        headers = dict(kw.pop("additional_headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        ws: ClientConnection = self.stack.enter_context(connect(
            self.url(path), additional_headers=headers, open_timeout=TIMEOUT, close_timeout=TIMEOUT, **kw))
        return ws

    def create(self, command: list[str], ctx: CommandContext = ADMIN, start: bool = True) -> c.ContainerState:
        reply = self.supervisor.create_container(
            c.CreateContainer(image=self.image, command=command, start=start), ctx).result(timeout=30)
        assert self.runner.wait_for(reply.position, TIMEOUT)
        state: c.ContainerState = reply.state
        return state


def _runtime(kind: str, stack: contextlib.ExitStack) -> tuple[Runtime, str, str]:
    """(runtime, its name in Deps.runtimes, an image it runs)."""
    if kind == "local":
        # As root, the local runtime runs each container as its own uid: every parent of
        # its root must be searchable by others, which pytest's 0700 tmp_path is not.
        root = tempfile.mkdtemp(prefix="berthd-ws-test-")
        os.chmod(root, 0o711)
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        return LocalRuntime(root, NODE, use_bwrap=False), "local", "host"
    return FakeRuntime(NODE), "fake", "host"


@pytest.fixture
def make_world() -> Iterator[Callable[..., World]]:
    """Builds worlds; tears every one down, in reverse order, whatever happens."""
    with contextlib.ExitStack() as stack:

        def make(runtime: str = "fake", limits: Limits | None = None,
                 unix_path: str | None = None, tcp: bool = True) -> World:
            store = open_store("memory", EVENT_TYPES)
            stack.callback(store.close)
            containers, keys = ContainersView(), KeysView()
            runner = ProjectionRunner(store, [containers, ImagesView(), AuditView(), keys])
            runner.start()
            stack.callback(runner.stop)
            rt, rt_name, image = _runtime(runtime, stack)
            stack.callback(rt.close)
            workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="test-workers")
            stack.callback(workers.shutdown, wait=False, cancel_futures=True)
            supervisor = Supervisor(store=store, runtimes={rt_name: rt}, default_runtime=rt_name,
                                    workers=workers, clock=system_clock, node_id=NODE,
                                    name_taken=containers.name_taken)
            supervisor.start()
            stack.callback(supervisor.stop)
            position = store.append("key-u1", 0, [n.ApiKeyCreated(
                key_id="u1", name="user", role="user", key_hash=hash_key(USER_KEY))], _meta())[-1].position
            assert runner.wait_for(position, TIMEOUT)
            deps = Deps(
                store=store, runner=runner, containers=containers, images_view=ImagesView(),
                audit=AuditView(), supervisor=supervisor,
                images=ImageService(store=store, runtimes={rt_name: rt}, default_runtime=rt_name,
                                    clock=system_clock, node_id=NODE),
                runtimes={rt_name: rt}, default_runtime=rt_name,
                auth=Authenticator(keys, (hash_key(ADMIN_KEY),)), clock=system_clock,
                node_id=NODE, version="test", limits=limits or Limits(),
            )
            server = WebSocketServer(deps, "127.0.0.1", 0 if tcp else None, unix_path, close_timeout=2.0)
            server.start()
            stack.callback(server.stop)
            return World(deps, store, runner, supervisor, rt, image, server, stack)

        yield make


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


@pytest.fixture(params=["fake", "local"])
def exec_world(request: pytest.FixtureRequest, make_world: Callable[..., World]) -> World:
    """The exec and logs tests run on the fake runtime and on real local processes."""
    return make_world(runtime=request.param)


# ---------------------------------------------------------------------- helpers


def _meta() -> Meta:
    return Meta(timestamp="2026-11-22T10:00:00.000Z", node_id=NODE, principal="test")


def append_many(store: EventStore, stream: str, count: int, batch: int = 1,
                make: Callable[[int], Event] | None = None) -> int:
    """Append ``count`` events to a stream of our own; returns the last position."""
    make = make or (lambda i: n.NodeStarted(version=f"v{i}", runtime="fake", isolation="none"))
    version = len(store.read_stream(stream))
    last = 0
    for start in range(0, count, batch):
        events = [make(i) for i in range(start, min(count, start + batch))]
        last = store.append(stream, version, events, _meta())[-1].position
        version += len(events)
    return last


def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    frame = ws.recv(timeout=timeout)
    assert isinstance(frame, str), "every server frame is a text frame"
    decoded: dict[str, Any] = json.loads(frame)
    return decoded


def positions_until(ws: ClientConnection, last: int) -> list[int]:
    """Positions of the event frames received until ``last`` arrives."""
    got: list[int] = []
    while not got or got[-1] < last:
        got.append(recv(ws)["position"])
    return got


def closed_by_server(ws: ClientConnection) -> tuple[list[dict[str, Any]], ConnectionClosed]:
    """Every frame until the server closes, and how it closed."""
    frames: list[dict[str, Any]] = []
    while True:
        try:
            frames.append(recv(ws))
        except ConnectionClosed as closed:
            return frames, closed


def exec_session(ws: ClientConnection) -> tuple[str, str, dict[str, Any], ConnectionClosed]:
    """stdout, stderr, the exit (or error) frame, and the close."""
    frames, closed = closed_by_server(ws)
    out = "".join(f["data"] for f in frames if f["type"] == "stdout")
    err = "".join(f["data"] for f in frames if f["type"] == "stderr")
    assert frames, f"no frames before the close ({closed})"
    return out, err, frames[-1], closed


def wait_for_event(store: EventStore, stream: str, type_: str, nth: int = 1,
                   timeout: float = TIMEOUT) -> Any:
    """The ``nth`` event of ``type_`` on ``stream``, waiting on the log's own wake-up."""
    deadline = time.monotonic() + timeout
    while True:
        found = [rec for rec in store.read_stream(stream) if rec.type == type_]
        if len(found) >= nth:
            return found[nth - 1]
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {type_} on {stream}"
        store.wait_for_append(store.head(), timeout=remaining)


def http_status(excinfo: pytest.ExceptionInfo[InvalidStatus]) -> tuple[int, dict[str, Any]]:
    response = excinfo.value.response
    return response.status_code, json.loads(response.body)


@contextlib.contextmanager
def stalled_loop(server: WebSocketServer) -> Iterator[None]:
    """Block the server's event loop while the body runs: the deterministic way to make
    a subscriber "too slow" (the runner keeps feeding its buffer meanwhile)."""
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(TIMEOUT)

    loop = server._loop  # test-only access: there is no public way to stall a server
    assert loop is not None
    loop.call_soon_threadsafe(block)
    assert entered.wait(TIMEOUT)
    try:
        yield
    finally:
        release.set()


# ---------------------------------------------------------------------- handshake


def test_no_key_wrong_key_are_401_before_the_upgrade(world: World) -> None:
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as excinfo:
            world.connect("/v1/events", key=key)
        status, body = http_status(excinfo)
        assert status == 401
        assert body["error"]["code"] == "UNAUTHORIZED" and body["error"]["message"]


def test_key_in_any_of_the_three_places(world: World) -> None:
    last = append_many(world.store, "node-a", 1)
    for path, headers in [
        ("/v1/events?after=0", {"Authorization": f"Bearer {ADMIN_KEY}"}),
        ("/v1/events?after=0", {"X-API-Key": ADMIN_KEY}),
        (f"/v1/events?after=0&api_key={ADMIN_KEY}", {}),
    ]:
        with world.connect(path, key=None, additional_headers=headers) as ws:
            assert positions_until(ws, last)[-1] == last


def test_unknown_path_404_and_bad_query_400(world: World) -> None:
    with pytest.raises(InvalidStatus) as excinfo:
        world.connect("/v1/nothing")
    assert http_status(excinfo)[0] == 404
    assert http_status(excinfo)[1]["error"]["code"] == "NOT_FOUND"
    for query in ("after=abc", "after=-1"):
        with pytest.raises(InvalidStatus) as excinfo:
            world.connect(f"/v1/events?{query}")
        status, body = http_status(excinfo)
        assert status == 400 and body["error"]["details"]["field"] == "after"
    with pytest.raises(InvalidStatus) as excinfo:
        world.connect("/v1/containers/x/logs?tail=many")
    assert http_status(excinfo)[0] == 400


def test_upgrade_carries_request_id_and_echoes_correlation_id(world: World) -> None:
    with world.connect("/v1/events", additional_headers={"X-Correlation-ID": "corr-42"}) as ws:
        assert ws.response is not None
        assert ws.response.headers["X-Correlation-ID"] == "corr-42"
        assert len(ws.response.headers["X-Request-ID"]) == 16


# ---------------------------------------------------------------------- events


def test_events_catch_up_then_live_in_order_while_four_threads_append(world: World) -> None:
    append_many(world.store, "node-pre", 50)
    go = threading.Barrier(5)

    def writer(i: int) -> None:
        go.wait()
        append_many(world.store, f"node-w{i}", 150)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    go.wait()  # the writers start as the subscriber connects: catch-up races with them
    with world.connect("/v1/events?after=0") as ws:
        for t in threads:
            t.join()
        head = world.store.head()
        got = positions_until(ws, head)
        assert got == list(range(1, head + 1))  # all, in order, no duplicate
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)  # and nothing after the head
    rec = world.store.read_all(after=head - 1, limit=1)[0]
    assert json.loads(msgspec.json.encode(rec.as_served())) == {
        "position": head, "type": "NodeStarted", "entity": {"kind": "node", "id": rec.stream_id},
        "version": rec.version, "timestamp": "2026-11-22T10:00:00.000Z", "principal": "test",
        "data": {"version": "v149", "runtime": "fake", "isolation": "none", "pid": 0},
    }


def test_events_frames_have_the_served_shape(world: World) -> None:
    last = append_many(world.store, "node-s", 3)
    with world.connect("/v1/events?after=1") as ws:
        frames = [recv(ws) for _ in range(last - 1)]
    expected = [json.loads(msgspec.json.encode(r.as_served())) for r in world.store.read_all(after=1)]
    assert frames == expected


def test_events_without_after_are_live_only(world: World) -> None:
    append_many(world.store, "node-old", 5)
    with world.connect("/v1/events") as ws:
        # the start is fixed before connect() returns: this append is live, and delivered
        last = append_many(world.store, "node-new", 2)
        assert positions_until(ws, last) == [last - 1, last]


def test_events_filters_by_type_kind_entity_in_catch_up_and_live(world: World) -> None:
    def revoked(i: int) -> Event:
        return n.ApiKeyRevoked(key_id=f"k{i}")

    def stopped(i: int) -> Event:
        return n.NodeStopped(reason=f"r{i}")

    def mix() -> None:
        append_many(world.store, "node-a", 2)  # NodeStarted, kind node
        append_many(world.store, "key-b", 2, make=revoked)  # kind key
        append_many(world.store, "node-c", 2, make=stopped)

    mix()
    subscribers: dict[str, Callable[[dict[str, Any]], bool]] = {
        "type=NodeStopped,ApiKeyRevoked": lambda f: f["type"] in ("NodeStopped", "ApiKeyRevoked"),
        "type=NodeStopped&type=NodeStarted": lambda f: f["type"] in ("NodeStopped", "NodeStarted"),
        "kind=key": lambda f: f["entity"]["kind"] == "key",
        "entity=node-c": lambda f: f["entity"]["id"] == "node-c",
        "kind=node&entity=node-a": lambda f: f["entity"]["id"] == "node-a",
    }
    sockets = {q: world.connect(f"/v1/events?after=0&{q}") for q in subscribers}
    mix()  # live, after catch-up started
    everything = [json.loads(msgspec.json.encode(r.as_served())) for r in world.store.read_all()]
    for query, wanted in subscribers.items():
        expected = [f for f in everything if wanted(f)]
        got = [recv(sockets[query]) for _ in expected]
        assert got == expected, query
        with pytest.raises(TimeoutError):
            sockets[query].recv(timeout=0.1)


def test_slow_consumer_is_cut_with_1013_and_resumes_without_loss_or_duplicate(
        make_world: Callable[..., World]) -> None:
    world = make_world(limits=Limits(ws_queue_events=4))
    first = append_many(world.store, "node-x", 3)
    with world.connect("/v1/events?after=0") as ws:
        received = positions_until(ws, first)
        with stalled_loop(world.server):
            last = append_many(world.store, "node-x", 20)
            assert world.runner.wait_for(last, TIMEOUT)  # all offered: the buffer of 4 overflowed
        frames, closed = closed_by_server(ws)
    received += [f["position"] for f in frames]
    assert closed.rcvd is not None and closed.rcvd.code == 1013
    assert closed.rcvd.reason == f"resume after={received[-1]}"
    resume = received[-1]
    with world.connect(f"/v1/events?after={resume}") as ws:
        rest = positions_until(ws, last)
    assert received + rest == list(range(1, last + 1))


def test_a_consumer_that_stops_reading_is_cut_and_can_resume(make_world: Callable[..., World]) -> None:
    """The same without stalling the server: the client just does not read while the
    log grows, until its socket buffers fill and its queue overflows."""
    world = make_world(limits=Limits(ws_queue_events=8))
    big = "x" * 4000

    def fat(i: int) -> Event:
        return n.NodeStopped(reason=big)

    with world.connect("/v1/events?after=0", max_queue=1) as ws:
        last = 0
        for _ in range(40):
            last = append_many(world.store, "node-fat", 100, batch=100, make=fat)
        frames, closed = closed_by_server(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
    sent = [f["position"] for f in frames]
    assert sent == list(range(1, len(sent) + 1))
    assert closed.rcvd.reason == f"resume after={sent[-1] if sent else 0}"
    with world.connect(f"/v1/events?{closed.rcvd.reason.split()[1]}") as ws:
        assert positions_until(ws, last) == list(range(len(sent) + 1, last + 1))


def test_a_lagging_runner_does_not_flood_a_new_subscriber(make_world: Callable[..., World]) -> None:
    """Events the runner dispatches late were already sent from the store: they must not
    count against the buffer (or a subscriber would be cut for nothing after a burst)."""
    world = make_world(limits=Limits(ws_queue_events=4))
    world.runner.stop()
    backlog = append_many(world.store, "node-lag", 50)
    with world.connect("/v1/events?after=0") as ws:
        assert positions_until(ws, backlog) == list(range(1, backlog + 1))  # from the store
        world.runner.start()  # now it dispatches the 50 to the subscriber's listener
        assert world.runner.wait_for(backlog, TIMEOUT)
        last = append_many(world.store, "node-lag", 3)
        assert positions_until(ws, last) == [backlog + 1, backlog + 2, backlog + 3]


def test_user_keys_see_only_their_own_containers_events(make_world: Callable[..., World]) -> None:
    world = make_world(runtime="local")
    mine = world.create(["sleep", "30"], ctx=USER)
    theirs = world.create(["sleep", "30"], ctx=ADMIN)
    head = world.store.head()
    with world.connect("/v1/events?after=0", key=USER_KEY) as ws:
        frames: list[dict[str, Any]] = []
        mine_ids = {r.position for r in world.store.read_all() if r.stream_id == mine.id}
        while len(frames) < len(mine_ids):
            frames.append(recv(ws))
        assert {f["position"] for f in frames} == mine_ids
        assert all(f["entity"]["id"] == mine.id for f in frames)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)
    assert head > max(mine_ids)
    with world.connect(f"/v1/containers/{theirs.name}/exec", key=USER_KEY) as ws:
        ws.send(json.dumps({"command": ["true"]}))
        _, _, last, closed = exec_session(ws)
    assert last["error"]["code"] == "CONTAINER_NOT_FOUND" and closed.rcvd is not None
    assert closed.rcvd.code == 1008


def test_many_subscribers_get_every_event_in_order_across_catch_up_and_live(world: World) -> None:
    """The fan-out writes batches of frames straight to each connection: subscribers
    joining at different points, while batches are appended, each get their exact range."""
    first = append_many(world.store, "node-pre", 30, batch=7)
    go = threading.Barrier(3)

    def writer(i: int) -> None:
        go.wait()
        append_many(world.store, f"node-f{i}", 200, batch=5)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    go.wait()
    starts = [0, 10, first, None]
    sockets = [world.connect("/v1/events" if s is None else f"/v1/events?after={s}") for s in starts]
    for t in threads:
        t.join()
    head = append_many(world.store, "node-post", 20, batch=4)  # live for every one of them
    for start, ws in zip(starts, sockets, strict=True):
        got = positions_until(ws, head)
        if start is None:  # live only: from some head at connect time, then everything
            start = got[0] - 1
        assert got == list(range(start + 1, head + 1)), start
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.1)


def test_events_negotiate_no_compression_and_a_deflate_client_gets_plain_frames(world: World) -> None:
    """The fan-out writes one frame's bytes to every subscriber, so /v1/events accepts no
    extension; websockets' client offers permessage-deflate by default, and still works."""
    last = append_many(world.store, "node-z", 3)
    with world.connect("/v1/events?after=0", compression="deflate") as ws:
        assert ws.protocol.extensions == []
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        frames = [recv(ws) for _ in range(last)]
        live = append_many(world.store, "node-z", 2)
        frames += [recv(ws) for _ in range(live - last)]
    expected = [json.loads(msgspec.json.encode(r.as_served())) for r in world.store.read_all()]
    assert frames == expected


def test_other_endpoints_still_negotiate_compression(world: World) -> None:
    state = world.create(["sleep", "30"])
    with world.connect(f"/v1/containers/{state.id}/logs?follow=false", compression="deflate") as ws:
        assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]


def test_a_consumer_whose_socket_backs_up_is_cut_and_resumes(make_world: Callable[..., World]) -> None:
    """Events appended one at a time (each delivery is small): what cuts a subscriber
    that does not read is the bytes its socket has not taken."""
    world = make_world(limits=Limits(ws_queue_events=64))
    big = "y" * 8000

    def fat(i: int) -> Event:
        return n.NodeStopped(reason=big)

    with world.connect("/v1/events?after=0", max_queue=1) as ws:
        last = append_many(world.store, "node-big", 2500, make=fat)
        frames, closed = closed_by_server(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
    sent = [f["position"] for f in frames]
    assert sent == list(range(1, len(sent) + 1))
    assert closed.rcvd.reason == f"resume after={sent[-1] if sent else 0}"
    with world.connect(f"/v1/events?{closed.rcvd.reason.split()[1]}") as ws:
        assert positions_until(ws, last) == list(range(len(sent) + 1, last + 1))


def test_the_fan_out_follows_the_runner_only_while_someone_subscribes(world: World) -> None:
    baseline = world.runner._listeners  # test-only access: listeners are not public
    for _ in range(2):  # the last subscriber leaving, then a new one: still delivered
        with world.connect("/v1/events") as ws:
            last = append_many(world.store, "node-again", 2)
            assert positions_until(ws, last) == [last - 1, last]
            assert len(world.runner._listeners) == len(baseline) + 1
        deadline = time.monotonic() + TIMEOUT
        while world.runner._listeners != baseline:
            assert time.monotonic() < deadline, "the fan-out still listens with no subscriber"
            time.sleep(0.01)


def test_user_keys_see_only_their_own_containers_live_events(world: World) -> None:
    with world.connect("/v1/events", key=USER_KEY) as ws:
        world.create(["sleep", "30"], ctx=ADMIN)
        mine = world.create(["sleep", "30"], ctx=USER)
        world.create(["sleep", "30"], ctx=ADMIN)
        mine_ids = sorted(r.position for r in world.store.read_all() if r.stream_id == mine.id)
        frames = [recv(ws) for _ in mine_ids]
        assert [f["position"] for f in frames] == mine_ids
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)


# ---------------------------------------------------------------------- exec


def test_exec_stdin_round_trip_with_cat(exec_world: World) -> None:
    w = exec_world
    state = w.create(["sleep", "60"])
    with w.connect(f"/v1/containers/{state.name}/exec",
                   additional_headers={"X-Correlation-ID": "corr-exec-1"}) as ws:
        ws.send(json.dumps({"command": ["cat"]}))
        ws.send(json.dumps({"type": "stdin", "data": "hello\n"}))
        ws.send("ünïcödé\n".encode())  # a binary frame is raw stdin
        ws.send(json.dumps({"type": "stdin_close"}))
        out, err, last, closed = exec_session(ws)
    assert out == "hello\nünïcödé\n" and err == ""
    assert last == {"type": "exit", "exit_code": 0}
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    finished = wait_for_event(w.store, state.id, "ExecFinished")
    started = wait_for_event(w.store, state.id, "ExecStarted")
    assert started.event.command == ["cat"] and finished.event.exit_code == 0
    assert finished.event.stdout_bytes == len("hello\nünïcödé\n".encode())
    for rec in (started, finished):
        assert rec.meta.correlation_id == "corr-exec-1" and rec.meta.principal == "admin"


def test_exec_exit_code_and_stderr(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sh", "-c", "echo out; echo err >&2; exit 3"],
                            "stdin": False}))
        out, err, last, _ = exec_session(ws)
    assert (out, err, last) == ("out\n", "err\n", {"type": "exit", "exit_code": 3})


def test_exec_signal_int_stops_sleep(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sh", "-c", "echo ready; exec sleep 30"]}))
        assert recv(ws) == {"type": "stdout", "data": "ready\n"}
        began = time.monotonic()
        ws.send(json.dumps({"type": "signal", "signal": "INT"}))
        _, _, last, closed = exec_session(ws)
    assert time.monotonic() - began < 5
    assert last["type"] == "exit" and last["exit_code"] not in (0, None)
    assert closed.rcvd is not None and closed.rcvd.code == 1000


def test_exec_tty_and_timeout(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sh", "-c", "tty"], "tty": True}))
        out, _, last, _ = exec_session(ws)
    assert out.startswith("/dev/pts/") and last == {"type": "exit", "exit_code": 0}
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sleep", "30"], "timeout": 0.3}))
        _, _, last, _ = exec_session(ws)
    assert last["type"] == "exit" and last["timed_out"] is True and last["exit_code"] != 0
    finished = wait_for_event(exec_world.store, state.id, "ExecFinished", nth=2)
    assert finished.event.timed_out


def test_exec_without_stdin_refuses_input(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["cat"], "stdin": False}))
        _, _, last, closed = exec_session(ws)  # cat ends at once: its stdin is closed
    assert last == {"type": "exit", "exit_code": 0}
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sleep", "30"], "stdin": False}))
        ws.send(json.dumps({"type": "stdin", "data": "x"}))
        _, _, last, closed = exec_session(ws)
    assert last["error"]["details"]["field"] == "stdin"
    assert closed.rcvd is not None and closed.rcvd.code == 1008


def test_exec_output_cap_truncates(make_world: Callable[..., World]) -> None:
    w = make_world(runtime="local", limits=Limits(output_cap_bytes=10))
    state = w.create(["sleep", "60"])
    with w.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sh", "-c", "printf 0123456789abcdef; printf 'é' >&2"]}))
        out, err, last, _ = exec_session(ws)
    assert out == "0123456789" and err == "é"
    assert last == {"type": "exit", "exit_code": 0, "truncated": True}


def test_exec_on_a_container_that_is_not_running_is_an_error_frame(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"], start=False)
    assert state.status == "created"
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["true"]}))
        frames, closed = closed_by_server(ws)
    assert len(frames) == 1 and frames[0]["type"] == "error"
    assert frames[0]["error"]["code"] == "CONFLICT" and "not running" in frames[0]["error"]["message"]
    assert closed.rcvd is not None and closed.rcvd.code == 1008


def test_exec_refusals_are_error_frames(world: World) -> None:
    with world.connect("/v1/containers/nope/exec") as ws:
        ws.send(json.dumps({"command": ["true"]}))
        frames, closed = closed_by_server(ws)
    assert frames[0]["error"]["code"] == "CONTAINER_NOT_FOUND"
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    state = world.create(["sleep", "60"])
    for bad, field_ in [("not json", "$"), (json.dumps({"command": []}), "command"),
                        (json.dumps({"command": ["ls"], "shell": True}), "shell"),
                        (json.dumps({"command": ["ls"], "tty": "yes"}), "tty")]:
        with world.connect(f"/v1/containers/{state.id}/exec") as ws:
            ws.send(bad)
            frames, closed = closed_by_server(ws)
        assert [f["type"] for f in frames] == ["error"], bad
        assert frames[0]["error"]["code"] == "VALIDATION_ERROR"
        assert frames[0]["error"]["details"]["field"] == field_, frames[0]
        assert closed.rcvd is not None and closed.rcvd.code == 1008


def test_a_bad_control_frame_kills_the_exec(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    with exec_world.connect(f"/v1/containers/{state.id}/exec") as ws:
        ws.send(json.dumps({"command": ["sleep", "30"]}))
        ws.send(json.dumps({"type": "resize", "rows": 3}))
        frames, closed = closed_by_server(ws)
    assert frames[-1]["error"]["code"] == "VALIDATION_ERROR"
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert wait_for_event(exec_world.store, state.id, "ExecFinished").event.exit_code != 0


def test_client_leaving_kills_the_exec(exec_world: World) -> None:
    state = exec_world.create(["sleep", "60"])
    ws = exec_world.connect(f"/v1/containers/{state.id}/exec")
    ws.send(json.dumps({"command": ["sh", "-c", "echo ready; exec sleep 30"]}))
    assert recv(ws)["data"] == "ready\n"
    began = time.monotonic()
    ws.close()
    finished = wait_for_event(exec_world.store, state.id, "ExecFinished")
    assert time.monotonic() - began < 5
    assert finished.event.exit_code not in (0, None)


# ---------------------------------------------------------------------- logs


def test_logs_follow_until_the_container_stops(exec_world: World) -> None:
    w = exec_world
    state = w.create(["sh", "-c", "echo one; sleep 0.3; echo two"])
    with w.connect(f"/v1/containers/{state.id}/logs?follow=true") as ws:
        frames, closed = closed_by_server(ws)
    assert all(f["type"] == "log" for f in frames)
    assert "".join(f["data"] for f in frames) == "one\ntwo\n"
    assert closed.rcvd is not None and closed.rcvd.code == 1000


def test_logs_follow_streams_new_output(make_world: Callable[..., World]) -> None:
    w = make_world(runtime="local")
    state = w.create(["sh", "-c", "echo a; echo b; echo c; while [ ! -e go ]; do sleep 0.05; done; echo d"])
    deadline = time.monotonic() + TIMEOUT
    while b"c\n" not in w.runtime.logs(state.id):  # no event tells when a line is written
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with w.connect(f"/v1/containers/{state.id}/logs?follow=true&tail=1") as ws:
        assert recv(ws) == {"type": "log", "data": "c\n"}
        w.runtime.put_file(state.id, "/workspace/go", b"")
        frames, closed = closed_by_server(ws)
    assert "".join(f["data"] for f in frames) == "d\n"
    assert closed.rcvd is not None and closed.rcvd.code == 1000


def test_logs_without_follow_send_what_there_is_and_close(make_world: Callable[..., World]) -> None:
    w = make_world(runtime="local")
    state = w.create(["sh", "-c", "printf 'x\\ny\\nz\\n'"])
    wait_for_event(w.store, state.id, "ContainerExited")
    with w.connect(f"/v1/containers/{state.id}/logs?tail=2") as ws:
        frames, closed = closed_by_server(ws)
    assert "".join(f["data"] for f in frames) == "y\nz\n"
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    with w.connect("/v1/containers/nope/logs") as ws:
        frames, closed = closed_by_server(ws)
    assert frames[0]["error"]["code"] == "CONTAINER_NOT_FOUND"


# ---------------------------------------------------------------------- lifecycle


def test_stop_with_clients_connected_returns_promptly(make_world: Callable[..., World]) -> None:
    w = make_world(runtime="local")
    state = w.create(["sleep", "60"])
    events = w.connect("/v1/events")
    execing = w.connect(f"/v1/containers/{state.id}/exec")
    execing.send(json.dumps({"command": ["sh", "-c", "echo ready; exec sleep 30"]}))
    assert recv(execing)["data"] == "ready\n"
    began = time.monotonic()
    w.server.stop()
    assert time.monotonic() - began < 5
    for ws in (events, execing):
        _, closed = closed_by_server(ws)
        assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert wait_for_event(w.store, state.id, "ExecFinished").event.exit_code not in (0, None)
    w.server.stop()  # idempotent


def test_start_stop_many_times_and_rebind_the_same_port(world: World) -> None:
    server = world.server
    address = server.tcp_address
    assert address is not None
    for _ in range(10):
        server.stop()
        assert server.tcp_address is None
        server.port = address[1]
        server.start()
        assert server.tcp_address == address
        with world.connect("/v1/events") as ws:
            last = append_many(world.store, "node-cycle", 1)
            assert recv(ws)["position"] == last


def test_unix_socket_is_admin_0660_and_removed_on_stop(make_world: Callable[..., World],
                                                       tmp_path: Any) -> None:
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    path = str(private / "berthd-ws.sock")
    w = make_world(unix_path=path, tcp=False)
    assert w.server.tcp_address is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    last = append_many(w.store, "node-u", 2)
    with unix_connect(path, uri="ws://localhost/v1/events?after=0", open_timeout=TIMEOUT) as ws:
        assert positions_until(ws, last)[-1] == last
    w.server.stop()
    assert not os.path.exists(path)
    w.server.start()  # and again on the same path
    with unix_connect(path, uri="ws://localhost/v1/events", open_timeout=TIMEOUT) as ws:
        last = append_many(w.store, "node-u", 1)
        assert recv(ws)["position"] == last


def test_start_raises_what_the_bind_raised(world: World, tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        WebSocketServer(world.deps, None, None, str(tmp_path / "missing" / "ws.sock")).start()
    address = world.server.tcp_address
    assert address is not None
    taken = WebSocketServer(world.deps, address[0], address[1], None)
    with pytest.raises(OSError):
        taken.start()
    assert not taken.running
    taken.stop()  # a no-op
