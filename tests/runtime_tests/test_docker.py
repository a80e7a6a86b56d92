"""The Docker runtime on a real engine: the contract, plus what only it has (container
settings, the engine being unreachable, pulls from a registry, the poll fallback)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthd.runtime.base import (
    ExecSpec,
    Limits,
    Mount,
    PortMapping,
    Runtime,
    RuntimeFailure,
    RuntimeUnavailable,
)
from berthd.runtime.docker import DockerRuntime
from berthd.runtime.security import build_policy
from tests.conftest import BUSYBOX_IMAGE, missing
from tests.runtime_tests.contract import Notices, RuntimeContract


class TestDockerRuntime(RuntimeContract):
    image = BUSYBOX_IMAGE
    expected_isolation = frozenset({"container"})
    duplicate_window = 1.2  # the poll runs every 0.5 s here
    tmp_only_while_running = True

    @pytest.fixture(autouse=True)
    def _client(self, docker_client: Any) -> None:
        # Autouse: runs before the contract's ``runtime`` fixture needs it.
        self.client = docker_client

    def make_runtime(self, node_id: str) -> Runtime:
        return DockerRuntime(node_id, client=self.client, poll_interval=0.5)

    def kill_behind_our_back(self, runtime: Runtime, berth_id: str) -> None:
        self.client.containers.get(f"berth-{berth_id}").kill()

    # ---------------------------------------------------------------- settings

    def test_container_settings(self, runtime: Runtime) -> None:
        shared = tempfile.mkdtemp(prefix="berthd-docker-mount-")
        Path(shared, "data.txt").write_text("from the host\n")
        runtime.security = build_policy(mount_roots=[shared])
        try:
            berth_id = self.running(
                runtime,
                name="settings",
                labels={"team": "qa"},
                env={"GREETING": "hi"},
                limits=Limits(memory_mb=64, cpus=0.5, pids=64),
                network=False,
                mounts=(Mount(host_path=shared, container_path="/data", mode="ro"),),
            )
            attrs = self.client.containers.get(f"berth-{berth_id}").attrs
            assert attrs["Name"] == f"/berth-{berth_id}"
            labels = attrs["Config"]["Labels"]
            assert labels["berth.id"] == berth_id
            assert labels["berth.node"] == self.node_id
            assert labels["berth.name"] == "settings"
            assert labels["team"] == "qa"
            host = attrs["HostConfig"]
            assert host["Init"] is True
            assert host["NetworkMode"] == "none"
            assert host["Memory"] == 64 * 1024 * 1024
            assert host["MemorySwap"] == 64 * 1024 * 1024
            assert host["NanoCpus"] == 500_000_000
            assert host["PidsLimit"] == 64
            assert host["CapDrop"] == ["ALL"]
            assert host["SecurityOpt"] == ["no-new-privileges:true"]
            assert host["ReadonlyRootfs"] is True
            assert labels["berth.profile"] == "default"
            assert "GREETING=hi" in attrs["Config"]["Env"]
            read = runtime.exec(berth_id, ExecSpec(command=("cat", "/data/data.txt")))
            assert read.stdout == b"from the host\n"
            write = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", "echo x > /data/new")))
            assert write.exit_code != 0
        finally:
            shutil.rmtree(shared, ignore_errors=True)

    def test_the_default_profile_on_the_engine(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        host = self.client.containers.get(f"berth-{berth_id}").attrs["HostConfig"]
        assert (host["Memory"], host["MemorySwap"]) == (1 << 30, 1 << 30)  # 1 GiB, no swap
        assert (host["NanoCpus"], host["PidsLimit"]) == (1_000_000_000, 256)
        assert (host["NetworkMode"], host["ReadonlyRootfs"], host["CapDrop"]) == ("none", True, ["ALL"])
        tmp = [m for m in host["Mounts"] if m["Target"] == "/tmp"]
        assert tmp and tmp[0]["VolumeOptions"]["DriverConfig"]["Options"]["type"] == "tmpfs"
        mounted = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", "grep ' /tmp ' /proc/mounts")))
        assert mounted.stdout.split()[2] == b"tmpfs"

    def test_ports_are_published_on_loopback_only(self, runtime: Runtime) -> None:
        spec = self.spec(ports=(PortMapping(container_port=8080),), profile="networked")
        runtime.create(spec)
        bindings = self.client.containers.get(f"berth-{spec.berth_id}").attrs["HostConfig"][
            "PortBindings"
        ]
        assert [b["HostIp"] for b in bindings["8080/tcp"]] == ["127.0.0.1"]

    def test_unknown_image_is_a_failure_not_a_missing_container(self, runtime: Runtime) -> None:
        with pytest.raises(RuntimeFailure, match="pull"):
            runtime.create(self.spec(image="berthd-test/does-not-exist:1"))

    def test_get_file_follows_symlinks_inside_the_container(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        runtime.put_file(berth_id, "/tmp/target.txt", b"target")
        linked = runtime.exec(berth_id, ExecSpec(command=("ln", "-s", "target.txt", "/tmp/link")))
        assert linked.exit_code == 0
        assert runtime.get_file(berth_id, "/tmp/link") == b"target"

    # ---------------------------------------------------------------- watch

    def test_the_poll_catches_exits_when_events_are_lost(
        self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert isinstance(runtime, DockerRuntime)
        monkeypatch.setattr(runtime, "_on_event", lambda event: None)
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        time.sleep(0.7)  # seen running by a poll
        self.kill_behind_our_back(runtime, berth_id)
        assert notices.wait_for(berth_id, timeout=5).exit_code == 137
        gone = self.running(runtime)
        time.sleep(0.7)
        self.client.containers.get(f"berth-{gone}").remove(force=True)
        # Seen dead (137) if a poll fell between the kill and the removal, else vanished.
        assert notices.wait_for(gone, timeout=5).exit_code in (137, None)

    # ---------------------------------------------------------------- images

    def test_pull_from_a_registry(self, runtime: Runtime) -> None:
        registry = os.environ.get("BERTHD_TEST_REGISTRY", "")
        if not registry:
            missing("image registry", "BERTHD_TEST_REGISTRY is not set; run ops/registry.sh")
        try:
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            direct.open(f"http://{registry}/v2/", timeout=3).close()
        except OSError as exc:
            missing("image registry", f"{registry} does not answer ({exc}); run ops/registry.sh")
        ref = f"{registry}/berthd-test/busybox:latest"
        if any(ref in i.tags for i in runtime.images()):
            runtime.remove_image(ref)
        assert not any(ref in i.tags for i in runtime.images())
        progress: list[dict[str, object]] = []
        info = runtime.pull(ref, progress=progress.append)
        assert ref in info.tags
        assert progress and all(isinstance(p, dict) and "status" in p for p in progress)
        assert any(ref in i.tags for i in runtime.images())
        runtime.remove_image(ref)
        assert not any(ref in i.tags for i in runtime.images())
        with pytest.raises(RuntimeFailure):
            runtime.pull(f"{registry}/berthd-test/no-such-image:{uuid.uuid4().hex[:6]}")
        runtime.pull(ref)  # leave the engine as we found it

    def test_remove_missing_image_is_a_failure(self, runtime: Runtime) -> None:
        with pytest.raises(RuntimeFailure):
            runtime.remove_image("berthd-test/does-not-exist:1")


# -------------------------------------------------------------------- no engine


def test_an_absent_engine_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/berthd-docker.sock")
    runtime = DockerRuntime("absent")
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeUnavailable):
            runtime.ping()
        with pytest.raises(RuntimeUnavailable):
            runtime.inspect("anything")
        with pytest.raises(RuntimeUnavailable):
            runtime.list_managed("absent")
    finally:
        runtime.close()
    assert time.monotonic() - began < 5


@pytest.fixture
def silent_engine() -> Iterator[str]:
    """A unix socket that accepts connections and never answers: a hung engine."""
    directory = tempfile.mkdtemp(prefix="berthd-silent-")
    path = os.path.join(directory, "docker.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"unix://{path}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_a_hung_engine_times_out_as_unavailable(
    silent_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", silent_engine)
    runtime = DockerRuntime("hung", timeout=1.0)
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeUnavailable):
            runtime.ping()
    finally:
        runtime.close()
    assert time.monotonic() - began < 5


def test_watching_an_absent_engine_keeps_trying_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/berthd-docker.sock")
    runtime = DockerRuntime("absent-watch", poll_interval=0.1)
    notices = Notices()
    runtime.watch(notices)
    time.sleep(0.5)  # several failed polls and event reconnects
    began = time.monotonic()
    runtime.close()
    assert time.monotonic() - began < 3
    assert notices.items == []  # an unreachable engine is not a reason to declare exits
