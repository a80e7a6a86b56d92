"""The fake runtime: the contract, plus its fault-injection hooks."""

from __future__ import annotations

import time

import pytest

from berthd.runtime.base import (
    ExecSpec,
    Runtime,
    RuntimeFailure,
    RuntimeUnavailable,
    SandboxNotFound,
)
from berthd.runtime.fake import FakeRuntime
from tests.runtime_tests.contract import Notices, RuntimeContract


class TestFakeRuntime(RuntimeContract):
    image = "host"
    expected_isolation = frozenset({"none"})
    enforces_profiles = False
    duplicate_window = 0.3

    def make_runtime(self, node_id: str) -> Runtime:
        return FakeRuntime(node_id)

    def kill_behind_our_back(self, runtime: Runtime, berth_id: str) -> None:
        assert isinstance(runtime, FakeRuntime)
        runtime.exit_behind_our_back(berth_id, 137)

    # ---------------------------------------------------------------- hooks

    def test_fail_next_raises_once(self, runtime: Runtime) -> None:
        assert isinstance(runtime, FakeRuntime)
        runtime.fail_next("start", RuntimeFailure("boom"))
        spec = self.spec()
        runtime.create(spec)
        with pytest.raises(RuntimeFailure, match="boom"):
            runtime.start(spec.berth_id)
        assert runtime.inspect(spec.berth_id).state == "created"
        assert runtime.start(spec.berth_id).state == "running"
        with pytest.raises(ValueError):
            runtime.fail_next("no_such_operation", RuntimeFailure("x"))

    def test_exit_behind_our_back_fires_watch(self, runtime: Runtime) -> None:
        assert isinstance(runtime, FakeRuntime)
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        runtime.exit_behind_our_back(berth_id, 42)
        assert notices.wait_for(berth_id, timeout=2).exit_code == 42
        status = runtime.inspect(berth_id)
        assert status.state == "exited" and status.exit_code == 42
        with pytest.raises(RuntimeFailure):
            runtime.exit_behind_our_back(berth_id, 1)  # not running any more

    def test_vanish(self, runtime: Runtime) -> None:
        assert isinstance(runtime, FakeRuntime)
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        runtime.vanish(berth_id)
        assert notices.wait_for(berth_id, timeout=2).exit_code is None
        with pytest.raises(SandboxNotFound):
            runtime.inspect(berth_id)
        assert runtime.list_managed(self.node_id) == []

    def test_set_unavailable(self, runtime: Runtime) -> None:
        assert isinstance(runtime, FakeRuntime)
        berth_id = self.running(runtime)
        runtime.set_unavailable(True)
        for call in (
            runtime.ping,
            runtime.images,
            lambda: runtime.inspect(berth_id),
            lambda: runtime.exec(berth_id, ExecSpec(command=("true",))),
            lambda: runtime.list_managed(self.node_id),
        ):
            with pytest.raises(RuntimeUnavailable):
                call()
        runtime.set_unavailable(False)
        assert runtime.inspect(berth_id).state == "running"

    def test_calls_are_recorded(self, runtime: Runtime) -> None:
        assert isinstance(runtime, FakeRuntime)
        berth_id = self.running(runtime)
        runtime.exec(berth_id, ExecSpec(command=("true",)))
        assert runtime.calls[-3:] == [("create", berth_id), ("start", berth_id), ("exec", berth_id)]

    def test_a_container_without_command_idles_until_stopped(self, runtime: Runtime) -> None:
        spec = self.spec(command=())
        runtime.create(spec)
        assert runtime.start(spec.berth_id).state == "running"
        time.sleep(0.1)
        assert runtime.inspect(spec.berth_id).state == "running"
        assert runtime.exec(spec.berth_id, ExecSpec(command=("echo", "hi"))).stdout == b"hi\n"
        assert runtime.stop(spec.berth_id).exit_code == 143

    def test_images_pull_and_remove(self, runtime: Runtime) -> None:
        progress: list[dict[str, object]] = []
        info = runtime.pull("example/thing", progress=progress.append)
        assert "example/thing:latest" in info.tags
        assert progress and all(isinstance(p, dict) for p in progress)
        spec = self.spec(image="example/thing")
        runtime.create(spec)
        with pytest.raises(RuntimeFailure):
            runtime.remove_image("example/thing")  # in use
        runtime.remove(spec.berth_id)
        runtime.remove_image("example/thing")
        with pytest.raises(RuntimeFailure):
            runtime.create(self.spec(image="example/thing"))

    def test_close_kills_everything(self) -> None:
        runtime = FakeRuntime("closing")
        self.node_id = "closing"
        self.nodes = {"closing"}
        berth_id = self.running(runtime)
        runtime.close()
        with pytest.raises(RuntimeUnavailable):
            runtime.inspect(berth_id)
