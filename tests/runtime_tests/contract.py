"""The runtime contract: one abstract test class every runtime must pass (STYLE.md §7).

A concrete test class subclasses ``RuntimeContract``, sets ``image`` (an image the
runtime can run, with sh, echo, cat, sleep, true and false) and implements
``make_runtime(node_id)`` and ``kill_behind_our_back(runtime, berth_id)``. Each test
gets a fresh runtime on a node id of its own, and every container made on it (on any
node id the test used) is removed afterwards.

Commands stay within what both a host and busybox have, and paths inside commands are
relative to a ``workdir`` of /tmp or /workspace: runtimes without a mount namespace
(local without bubblewrap, fake) map those only for ``workdir`` and files.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from berthd.runtime.base import (
    SANDBOX_BERTH_DIR,
    ContainerSpec,
    ExecSpec,
    ExitNotice,
    FileNotFound,
    HostPathNotFound,
    InvalidPath,
    Limits,
    Mount,
    MountForbidden,
    Runtime,
    RuntimeError_,
    RuntimeFailure,
    SandboxNotFound,
    SandboxStatus,
    UnknownProfile,
    WorkdirNotFound,
)
from berthd.runtime.security import build_policy

_SESSION = uuid.uuid4().hex[:6]
_COUNTER = itertools.count()

SLEEPER = ("sleep", "30")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


class Notices:
    """Collects ``ExitNotice``s from ``Runtime.watch`` for assertions."""

    def __init__(self) -> None:
        self.items: list[ExitNotice] = []
        self._cond = threading.Condition()

    def __call__(self, notice: ExitNotice) -> None:
        with self._cond:
            self.items.append(notice)
            self._cond.notify_all()

    def for_id(self, berth_id: str) -> list[ExitNotice]:
        with self._cond:
            return [n for n in self.items if n.berth_id == berth_id]

    def wait_for(self, berth_id: str, timeout: float = 5.0) -> ExitNotice:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [n for n in self.items if n.berth_id == berth_id]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no exit notice for {berth_id} within {timeout} s")
                self._cond.wait(left)


class RuntimeContract:
    """What every ``Runtime`` promises. Not collected itself (no ``Test`` prefix)."""

    image: ClassVar[str]
    expected_isolation: ClassVar[frozenset[str]]
    # How long a poll-based watcher may need beyond its first notice to (wrongly) repeat it.
    duplicate_window: ClassVar[float] = 1.2
    # /tmp under a read-only-root profile is a tmpfs that exists only while the container
    # runs (Docker), rather than a directory of its own that outlives it (local, fake).
    tmp_only_while_running: ClassVar[bool] = False

    # ---------------------------------------------------------------- hooks

    def make_runtime(self, node_id: str) -> Runtime:
        raise NotImplementedError

    def kill_behind_our_back(self, runtime: Runtime, berth_id: str) -> None:
        """SIGKILL the container's main process without going through ``runtime``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- fixtures

    @pytest.fixture
    def runtime(self) -> Iterator[Runtime]:
        self.node_id = f"t-{_SESSION}-{next(_COUNTER)}"
        self.nodes = {self.node_id}
        rt = self.make_runtime(self.node_id)
        try:
            yield rt
        finally:
            for node in self.nodes:
                for status in rt.list_managed(node):
                    try:
                        rt.remove(status.berth_id, force=True)
                    except SandboxNotFound:
                        pass
            rt.close()

    # ---------------------------------------------------------------- helpers

    def spec(self, command: tuple[str, ...] = SLEEPER, **fields: object) -> ContainerSpec:
        values: dict[str, object] = {
            "berth_id": uuid.uuid4().hex[:12],
            "node_id": self.node_id,
            "image": self.image,
            "command": command,
        }
        values.update(fields)
        if values["node_id"] != self.node_id:
            self.nodes.add(str(values["node_id"]))
        return ContainerSpec(**values)  # type: ignore[arg-type]

    def running(
        self, runtime: Runtime, command: tuple[str, ...] = SLEEPER, **fields: object
    ) -> str:
        """Create and start a container; returns its id."""
        spec = self.spec(command, **fields)
        runtime.create(spec)
        status = runtime.start(spec.berth_id)
        assert status.state in ("running", "exited"), status
        return spec.berth_id

    def exited(self, runtime: Runtime, berth_id: str, timeout: float = 5.0) -> SandboxStatus:
        assert wait_until(lambda: runtime.inspect(berth_id).state == "exited", timeout), (
            runtime.inspect(berth_id)
        )
        return runtime.inspect(berth_id)

    # ---------------------------------------------------------------- basics

    def test_ping_and_isolation(self, runtime: Runtime) -> None:
        runtime.ping()
        assert runtime.isolation in self.expected_isolation

    def test_images_lists_something(self, runtime: Runtime) -> None:
        images = runtime.images()
        assert images
        assert all(i.id and i.runtime == runtime.name for i in images)
        wanted = {self.image, f"{self.image}:latest"}
        assert any(wanted & set(i.tags) or self.image == i.id for i in images)

    # ---------------------------------------------------------------- lifecycle

    def test_lifecycle_create_start_inspect_stop_remove(self, runtime: Runtime) -> None:
        spec = self.spec(labels={"team": "qa"}, name="lifecycle")
        created = runtime.create(spec)
        assert created.berth_id == spec.berth_id
        assert created.state == "created"
        assert created.node_id == self.node_id
        assert runtime.inspect(spec.berth_id).state == "created"

        started = runtime.start(spec.berth_id)
        assert started.state == "running"
        assert started.started_at and started.started_at.endswith("Z")
        assert started.exit_code is None
        assert runtime.start(spec.berth_id).state == "running"  # starting twice is harmless

        began = time.monotonic()
        stopped = runtime.stop(spec.berth_id, timeout=5)
        assert time.monotonic() - began < 4  # sleep dies of TERM; no waiting for KILL
        assert stopped.state == "exited"
        assert stopped.exit_code == 143
        assert stopped.finished_at and stopped.finished_at >= started.started_at
        assert runtime.stop(spec.berth_id).state == "exited"  # stopping twice is harmless

        runtime.remove(spec.berth_id)
        with pytest.raises(SandboxNotFound):
            runtime.inspect(spec.berth_id)
        with pytest.raises(SandboxNotFound):
            runtime.remove(spec.berth_id)

    def test_create_again_with_same_id_returns_the_container(self, runtime: Runtime) -> None:
        spec = self.spec()
        runtime.create(spec)
        again = runtime.create(spec)
        assert again.berth_id == spec.berth_id and again.state == "created"

    def test_stop_escalates_to_kill_after_timeout(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, ("sh", "-c", "trap '' TERM; sleep 30"))
        time.sleep(0.3)  # let the trap be installed
        began = time.monotonic()
        status = runtime.stop(berth_id, timeout=1)
        took = time.monotonic() - began
        assert status.state == "exited"
        assert status.exit_code == 137
        assert 0.8 <= took < 8, took

    def test_kill_default_and_named_signal(self, runtime: Runtime) -> None:
        first = self.running(runtime)
        status = runtime.kill(first)
        assert status.state == "exited" and status.exit_code == 137

        second = self.running(runtime)
        runtime.kill(second, "TERM")
        assert self.exited(runtime, second).exit_code == 143
        assert runtime.kill(second).state == "exited"  # killing the dead is harmless

        with pytest.raises(RuntimeFailure):
            runtime.kill(self.running(runtime), "NOT-A-SIGNAL")

    def test_exit_code_of_a_command_that_ends(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, ("sh", "-c", "exit 3"))
        status = self.exited(runtime, berth_id)
        assert status.exit_code == 3
        assert status.finished_at is not None

    def test_restart_after_exit(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, ("sh", "-c", "echo run"))
        first = self.exited(runtime, berth_id)
        runtime.start(berth_id)
        assert wait_until(lambda: runtime.logs(berth_id).count(b"run") == 2)
        second = self.exited(runtime, berth_id)
        assert second.exit_code == 0
        assert second.started_at and first.started_at and second.started_at > first.started_at

    def test_remove_running_needs_force(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        with pytest.raises(RuntimeFailure):
            runtime.remove(berth_id)
        assert runtime.inspect(berth_id).state == "running"
        runtime.remove(berth_id, force=True)
        with pytest.raises(SandboxNotFound):
            runtime.inspect(berth_id)

    def test_missing_container_is_not_found(self, runtime: Runtime) -> None:
        ghost = "ffff" + uuid.uuid4().hex[:8]
        calls: list[Callable[[], object]] = [
            lambda: runtime.inspect(ghost),
            lambda: runtime.start(ghost),
            lambda: runtime.stop(ghost),
            lambda: runtime.kill(ghost),
            lambda: runtime.remove(ghost, force=True),
            lambda: runtime.exec(ghost, ExecSpec(command=("true",))),
            lambda: runtime.exec_stream(ghost, ExecSpec(command=("true",))),
            lambda: runtime.logs(ghost),
            lambda: runtime.follow_logs(ghost),
            lambda: runtime.put_file(ghost, "/tmp/x", b"x"),
            lambda: runtime.get_file(ghost, "/tmp/x"),
        ]
        for call in calls:
            with pytest.raises(SandboxNotFound):
                call()

    def test_list_managed_sees_only_this_node(self, runtime: Runtime) -> None:
        mine = self.spec()
        other_node = f"{self.node_id}-other"
        theirs = self.spec(node_id=other_node)
        runtime.create(mine)
        runtime.create(theirs)
        ours = {s.berth_id: s for s in runtime.list_managed(self.node_id)}
        assert set(ours) == {mine.berth_id}
        assert ours[mine.berth_id].state == "created"
        assert ours[mine.berth_id].node_id == self.node_id
        assert {s.berth_id for s in runtime.list_managed(other_node)} == {theirs.berth_id}

    # ---------------------------------------------------------------- watch

    def test_watch_sees_an_exit_on_its_own_once(self, runtime: Runtime) -> None:
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime, ("sh", "-c", "sleep 0.3; exit 3"))
        notice = notices.wait_for(berth_id, timeout=5)
        assert notice.exit_code == 3
        time.sleep(self.duplicate_window)
        assert len(notices.for_id(berth_id)) == 1

    def test_watch_sees_a_kill_behind_our_back(self, runtime: Runtime) -> None:
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        time.sleep(0.2)
        self.kill_behind_our_back(runtime, berth_id)
        notice = notices.wait_for(berth_id, timeout=5)
        assert notice.exit_code == 137
        assert runtime.inspect(berth_id).state == "exited"

    def test_watch_sees_a_stop_through_us(self, runtime: Runtime) -> None:
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        runtime.stop(berth_id, timeout=5)
        assert notices.wait_for(berth_id, timeout=5).exit_code == 143

    # ---------------------------------------------------------------- exec

    def test_exec_exit_code_stdout_stderr(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        result = runtime.exec(
            berth_id, ExecSpec(command=("sh", "-c", "echo out; echo err >&2; exit 3"))
        )
        assert result.exit_code == 3
        assert result.stdout == b"out\n"
        assert result.stderr == b"err\n"
        assert not result.truncated and not result.timed_out
        assert result.duration_ms > 0
        assert runtime.exec(berth_id, ExecSpec(command=("true",))).exit_code == 0
        assert runtime.exec(berth_id, ExecSpec(command=("false",))).exit_code == 1

    def test_exec_stdin(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        assert runtime.exec(
            berth_id, ExecSpec(command=("cat",), stdin=b"hello\nworld\n")
        ).stdout == (b"hello\nworld\n")
        assert runtime.exec(berth_id, ExecSpec(command=("cat",), stdin=b"")).stdout == b""
        # Big in, big out at once: must not deadlock on full pipes.
        blob = bytes(range(256)) * 2048  # 512 KiB
        result = runtime.exec(berth_id, ExecSpec(command=("cat",), stdin=blob))
        assert result.exit_code == 0 and result.stdout == blob

    def test_exec_env_and_workdir(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, env={"BERTH_CONTAINER": "from-create"})
        result = runtime.exec(
            berth_id,
            ExecSpec(
                command=("sh", "-c", 'echo "$BERTH_CONTAINER $BERTH_EXEC"; echo marker > wd.txt'),
                env={"BERTH_EXEC": "from-exec"},
                workdir="/tmp",
            ),
        )
        assert result.exit_code == 0, result
        assert result.stdout == b"from-create from-exec\n"
        assert runtime.get_file(berth_id, "/tmp/wd.txt") == b"marker\n"

    def test_exec_missing_command(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        result = runtime.exec(berth_id, ExecSpec(command=("no-such-command-berth",)))
        assert result.exit_code in (126, 127)
        assert result.stdout or result.stderr

    def test_exec_output_cap_truncates(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        loop = "i=0; while [ $i -lt 2000 ]; do echo 0123456789; i=$((i+1)); done; echo tail >&2"
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", loop), output_cap=1000))
        assert result.exit_code == 0
        assert result.truncated
        assert result.stdout == (b"0123456789\n" * 100)[:1000]
        assert result.stderr == b"tail\n"

    def test_exec_timeout_kills_the_process_tree(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        began = time.monotonic()
        result = runtime.exec(
            berth_id,
            ExecSpec(
                # room for a loaded engine to start the exec before the timeout hits
                command=("sh", "-c", "(sleep 2.5; echo late > late.txt) & echo started; sleep 30"),
                workdir="/tmp",
                timeout=1.5,
            ),
        )
        assert result.timed_out
        assert result.exit_code != 0
        assert result.stdout == b"started\n"
        assert time.monotonic() - began < 10
        time.sleep(2.5)  # the background child would have written by now
        with pytest.raises(RuntimeFailure):
            runtime.get_file(berth_id, "/tmp/late.txt")
        # The container is still fine.
        assert runtime.inspect(berth_id).state == "running"
        assert runtime.exec(berth_id, ExecSpec(command=("echo", "ok"))).stdout == b"ok\n"

    def test_a_long_exec_does_not_block_kill(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        results: list[object] = []

        def long_exec() -> None:
            try:
                results.append(runtime.exec(berth_id, ExecSpec(command=("sleep", "30"))))
            except RuntimeError_ as exc:
                results.append(exc)

        worker = threading.Thread(target=long_exec, daemon=True)
        worker.start()
        time.sleep(0.5)
        began = time.monotonic()
        assert runtime.kill(berth_id).state == "exited"
        assert time.monotonic() - began < 5
        worker.join(timeout=10)
        assert not worker.is_alive(), "the exec outlived its container"
        assert results

    def test_exec_in_a_stopped_container_fails(self, runtime: Runtime) -> None:
        spec = self.spec()
        runtime.create(spec)
        with pytest.raises(RuntimeFailure):
            runtime.exec(spec.berth_id, ExecSpec(command=("true",)))

    def test_exec_stream_stdin_and_signal(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        script = (
            "trap 'echo interrupted; exit 7' INT; "  # before the echo we wait for
            'read line; echo "got $line"; '
            "while true; do sleep 0.1; done"
        )
        stream = runtime.exec_stream(berth_id, ExecSpec(command=("sh", "-c", script)))
        try:
            stream.write_stdin(b"hello\n")
            chunks = stream.output()
            seen = b""
            for kind, data in chunks:
                assert kind == "stdout"
                seen += data
                if b"got hello\n" in seen:
                    break
            assert seen == b"got hello\n"
            stream.signal("INT")
            rest = b"".join(data for _, data in chunks)
            assert rest == b"interrupted\n"
            assert stream.wait(timeout=5) == 7
        finally:
            stream.close()

    def test_exec_stream_close_stdin_and_stderr(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        stream = runtime.exec_stream(berth_id, ExecSpec(command=("sh", "-c", "cat; echo done >&2")))
        try:
            stream.write_stdin(b"abc")
            stream.close_stdin()
            got: dict[str, bytes] = {"stdout": b"", "stderr": b""}
            for kind, data in stream.output():
                got[kind] += data
            assert got == {"stdout": b"abc", "stderr": b"done\n"}
            assert stream.wait(timeout=5) == 0
        finally:
            stream.close()

    def test_exec_stream_tty(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        stream = runtime.exec_stream(
            berth_id, ExecSpec(command=("sh", "-c", "echo tty-ok")), tty=True
        )
        try:
            out = b"".join(data for _, data in stream.output())
            assert b"tty-ok" in out
            assert stream.wait(timeout=5) == 0
        finally:
            stream.close()

    def test_exec_stream_close_kills(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        stream = runtime.exec_stream(berth_id, ExecSpec(command=("sleep", "30")))
        began = time.monotonic()
        stream.close()
        assert time.monotonic() - began < 5
        marker = runtime.exec(berth_id, ExecSpec(command=("echo", "still-here")))
        assert marker.stdout == b"still-here\n"

    # ---------------------------------------------------------------- logs

    def test_logs_and_tail(self, runtime: Runtime) -> None:
        berth_id = self.running(
            runtime, ("sh", "-c", "echo one; echo two >&2; sleep 0.1; echo three; sleep 30")
        )
        assert wait_until(lambda: b"three" in runtime.logs(berth_id))
        logs = runtime.logs(berth_id)
        assert b"one\n" in logs and b"two\n" in logs and logs.endswith(b"three\n")
        assert runtime.logs(berth_id, tail=1) == b"three\n"
        assert runtime.logs(berth_id, tail=0) == b""

    def test_follow_logs_until_the_end(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, ("sh", "-c", "echo a; sleep 0.5; echo b"))
        began = time.monotonic()
        collected = b"".join(runtime.follow_logs(berth_id))
        assert collected == b"a\nb\n"
        assert time.monotonic() - began < 5

    def test_follow_logs_with_a_tail_starts_from_the_last_lines(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, ("sh", "-c", "echo 1; echo 2; echo 3; sleep 1.5; echo new"))
        deadline = time.monotonic() + 5
        while not runtime.logs(berth_id).endswith(b"3\n"):
            assert time.monotonic() < deadline, runtime.logs(berth_id)
            time.sleep(0.02)
        # the tail and what follows come from one point: nothing lost, nothing twice
        assert b"".join(runtime.follow_logs(berth_id, tail=2)) == b"2\n3\nnew\n"
        assert b"".join(runtime.follow_logs(berth_id, tail=0)) == b""  # exited: nothing new

    # ---------------------------------------------------------------- files

    def test_put_file_get_file_roundtrip(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        blob = bytes(range(256)) * 400
        runtime.put_file(berth_id, "/tmp/berth-blob.bin", blob)
        assert runtime.get_file(berth_id, "/tmp/berth-blob.bin") == blob
        runtime.put_file(berth_id, "/tmp/berth-blob.bin", b"replaced")
        assert runtime.get_file(berth_id, "/tmp/berth-blob.bin") == b"replaced"
        # The file is really inside: a command sees it.
        seen = runtime.exec(berth_id, ExecSpec(command=("cat", "berth-blob.bin"), workdir="/tmp"))
        assert seen.stdout == b"replaced"

    def test_file_errors(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        with pytest.raises(RuntimeFailure):
            runtime.get_file(berth_id, "/tmp/no-such-file")
        with pytest.raises(RuntimeFailure):
            runtime.put_file(berth_id, "/tmp/no-such-dir/file", b"x")
        with pytest.raises(RuntimeFailure):
            runtime.get_file(berth_id, "/tmp")

    def test_files_of_a_created_container(self, runtime: Runtime) -> None:
        # a profile without a read-only root: what is put before the start stays
        runtime.security = build_policy({"writable": {"read_only_root": False}})
        spec = self.spec(profile="writable")
        runtime.create(spec)
        runtime.put_file(spec.berth_id, "/tmp/seed.txt", b"seed")
        assert runtime.get_file(spec.berth_id, "/tmp/seed.txt") == b"seed"
        runtime.start(spec.berth_id)
        assert runtime.get_file(spec.berth_id, "/tmp/seed.txt") == b"seed"

    def test_tmp_of_a_created_container_under_the_default_profile(self, runtime: Runtime) -> None:
        spec = self.spec()
        runtime.create(spec)
        if self.tmp_only_while_running:
            with pytest.raises(InvalidPath, match="start it first"):
                runtime.put_file(spec.berth_id, "/tmp/seed.txt", b"seed")
            runtime.start(spec.berth_id)
        runtime.put_file(spec.berth_id, "/tmp/seed.txt", b"seed")
        assert runtime.get_file(spec.berth_id, "/tmp/seed.txt") == b"seed"

    # ---------------------------------------------------------------- limits

    def test_limits_are_accepted(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, limits=Limits(memory_mb=256, pids=64), network=False)
        assert runtime.exec(berth_id, ExecSpec(command=("echo", "limited"))).stdout == b"limited\n"

    # ---------------------------------------------------------------- detached processes

    BEAT = 'i=0; while :; do i=$((i+1)); echo $i > "$BERTH_DIR/beat.tmp"; mv "$BERTH_DIR/beat.tmp" "$BERTH_DIR/beat"; sleep 0.05; done'

    @staticmethod
    def beats(runtime: Runtime, berth_id: str) -> Callable[[], int]:
        """Reads the counter that BEAT keeps bumping (0 before its first write)."""
        beat = Path(runtime.berth_dir(berth_id).host, "beat")

        def read() -> int:
            try:
                return int(beat.read_text() or 0)
            except (FileNotFoundError, ValueError):
                return 0

        return read

    def beating(self, read: Callable[[], int]) -> bool:
        """Does the counter still move (within a few seconds)?"""
        first = read()
        return wait_until(lambda: read() > first, timeout=3)

    def test_a_detached_process_outlives_its_call_and_dies_with_stop(self, runtime: Runtime) -> None:
        assert runtime.detached_execs
        berth_id = self.running(runtime, berth_dir=True)
        runtime.exec_detached(berth_id, ExecSpec(command=("sh", "-c", self.BEAT)))
        read = self.beats(runtime, berth_id)
        assert wait_until(lambda: read() > 0)
        assert runtime.exec(berth_id, ExecSpec(command=("true",))).exit_code == 0
        assert self.beating(read)  # the call and a later exec are over: it runs on
        runtime.stop(berth_id, timeout=5)
        assert not self.beating(read)
        runtime.start(berth_id)  # a restarted container does not bring it back
        assert not self.beating(read)

    def test_a_detached_process_dies_with_kill_remove_and_the_main_process(self, runtime: Runtime) -> None:
        for end in ("kill", "remove", "main"):
            command = ("sh", "-c", "sleep 1; exit 3") if end == "main" else SLEEPER
            berth_id = self.running(runtime, command, berth_dir=True)
            runtime.exec_detached(berth_id, ExecSpec(command=("sh", "-c", self.BEAT)))
            read = self.beats(runtime, berth_id)
            assert wait_until(lambda: read() > 0), end  # noqa: B023 - used at once
            if end == "kill":
                runtime.kill(berth_id)
            elif end == "remove":
                host = runtime.berth_dir(berth_id).host
                runtime.remove(berth_id, force=True)
                # the directory is gone with the container: nothing may write there again
                assert not wait_until(lambda: os.path.exists(host), timeout=1), end  # noqa: B023
                continue
            else:
                self.exited(runtime, berth_id)
            assert not self.beating(read), end

    def test_a_detached_process_is_confined_like_an_exec(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, berth_dir=True)
        probe = 'echo "$(id -u) $(id -g) $(cat /proc/self/status | grep -E "^(CapEff|NoNewPrivs)" | tr -d "\t" | tr "\n" " ")"'
        runtime.exec_detached(
            berth_id, ExecSpec(command=("sh", "-c", probe + ' > "$BERTH_DIR/who.tmp"; mv "$BERTH_DIR/who.tmp" "$BERTH_DIR/who"'))
        )
        who = Path(runtime.berth_dir(berth_id).host, "who")
        assert wait_until(who.exists)
        assert who.read_text() == runtime.exec(berth_id, ExecSpec(command=("sh", "-c", probe))).stdout.decode()

    def test_a_detached_process_is_held_by_the_profile_limits(self, runtime: Runtime) -> None:
        self._require_enforcement()
        runtime.security = build_policy({"small": {"memory_mb": 64}})
        berth_id = self.running(runtime, profile="small", berth_dir=True)
        hog = "awk 'BEGIN { s = \"x\"; while (length(s) < 268435456) s = s s; print length(s) }'"
        script = f'{hog} > "$BERTH_DIR/out"; echo $? > "$BERTH_DIR/rc.tmp"; mv "$BERTH_DIR/rc.tmp" "$BERTH_DIR/rc"'
        runtime.exec_detached(berth_id, ExecSpec(command=("sh", "-c", script)))
        rc = Path(runtime.berth_dir(berth_id).host, "rc")
        assert wait_until(rc.exists, timeout=60)
        assert rc.read_text().strip() != "0"
        assert "268435456" not in Path(rc.parent, "out").read_text()

    def test_a_detached_process_needs_a_running_container(self, runtime: Runtime) -> None:
        spec = self.spec(berth_dir=True)
        runtime.create(spec)
        with pytest.raises(RuntimeFailure):
            runtime.exec_detached(spec.berth_id, ExecSpec(command=SLEEPER))
        with pytest.raises(SandboxNotFound):
            runtime.exec_detached(uuid.uuid4().hex[:12], ExecSpec(command=SLEEPER))

    # ---------------------------------------------------------------- shared directory

    def test_berth_dir_is_shared_both_ways(self, runtime: Runtime) -> None:
        main = 'echo "main sees $BERTH_DIR" > "$BERTH_DIR/main.txt"; exec sleep 30'
        berth_id = self.running(runtime, ("sh", "-c", main), berth_dir=True)
        shared = runtime.berth_dir(berth_id)
        assert os.path.isdir(shared.host)
        assert shared.sandbox in (SANDBOX_BERTH_DIR, shared.host)
        # the shell creates the file before it writes the line: wait for the whole line
        main_txt = Path(shared.host, "main.txt")
        assert wait_until(lambda: main_txt.exists() and main_txt.read_text().endswith("\n"))
        assert main_txt.read_text() == f"main sees {shared.sandbox}\n"
        Path(shared.host, "from-host.txt").write_text("hello\n")
        script = 'cat "$BERTH_DIR/from-host.txt"; echo back > "$BERTH_DIR/from-sandbox.txt"'
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", script)))
        assert result.exit_code == 0, result
        assert result.stdout == b"hello\n"
        assert Path(shared.host, "from-sandbox.txt").read_text() == "back\n"

    def test_berth_dir_only_when_asked(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        with pytest.raises(RuntimeFailure):
            runtime.berth_dir(berth_id)
        with pytest.raises(SandboxNotFound):
            runtime.berth_dir(uuid.uuid4().hex[:12])
        probe = ExecSpec(command=("sh", "-c", 'echo "${BERTH_DIR:-unset}"'))
        assert runtime.exec(berth_id, probe).stdout == b"unset\n"

    def test_berth_dir_lives_as_long_as_the_container(self, runtime: Runtime) -> None:
        spec = self.spec(berth_dir=True)
        runtime.create(spec)
        shared = runtime.berth_dir(spec.berth_id)  # there before the first start
        Path(shared.host, "kept.txt").write_text("kept")
        runtime.start(spec.berth_id)
        runtime.stop(spec.berth_id, timeout=5)
        runtime.start(spec.berth_id)
        probe = ExecSpec(command=("sh", "-c", 'cat "$BERTH_DIR/kept.txt"'))
        assert runtime.exec(spec.berth_id, probe).stdout == b"kept"
        runtime.remove(spec.berth_id, force=True)
        assert not os.path.exists(shared.host)

    def test_the_shared_path_is_reserved(self, runtime: Runtime) -> None:
        mount = Mount(host_path="/tmp", container_path=SANDBOX_BERTH_DIR + "/sub", mode="ro")
        with pytest.raises(RuntimeFailure):
            runtime.create(self.spec(berth_dir=True, mounts=(mount,)))

    # ---------------------------------------------------------------- client errors

    def test_client_errors_have_their_own_classes(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        with pytest.raises(FileNotFound) as missing_file:
            runtime.get_file(berth_id, "/tmp/no-such-file")
        assert missing_file.value.code == "PATH_NOT_FOUND"
        with pytest.raises(FileNotFound):
            runtime.put_file(berth_id, "/tmp/no-such-dir/file", b"x")
        with pytest.raises(InvalidPath) as directory:
            runtime.get_file(berth_id, "/tmp")
        assert directory.value.code == "INVALID_PATH"
        with pytest.raises(WorkdirNotFound) as workdir:
            runtime.exec(berth_id, ExecSpec(command=("pwd",), workdir="/tmp/no-such-dir"))
        assert workdir.value.code == "WORKDIR_NOT_FOUND"
        with pytest.raises(UnknownProfile) as profile:
            runtime.create(self.spec(profile="no-such-profile"))
        assert profile.value.details == {"field": "profile"}

    # ---------------------------------------------------------------- security profiles

    # Whether the runtime enforces profiles at all (the fake and local without bubblewrap
    # do not: /v1/info says so).
    enforces_profiles: ClassVar[bool] = True
    # Whether it can mount host paths (local without bubblewrap cannot).
    mounts_supported: ClassVar[bool] = True

    def _require_enforcement(self) -> None:
        if not self.enforces_profiles:
            pytest.skip("this runtime does not enforce profiles (its enforcement() says so)")

    def test_enforcement_is_stated(self, runtime: Runtime) -> None:
        enforced = runtime.enforcement()
        for part in ("capabilities", "no_new_privileges", "pids", "memory", "cpus", "network",
                     "read_only_root", "tmp", "mounts"):
            assert enforced.get(part), part
        if self.enforces_profiles:
            assert "not enforced" not in enforced["capabilities"]
            assert "not enforced" not in enforced["network"]

    def test_default_profile_inside_the_sandbox(self, runtime: Runtime) -> None:
        self._require_enforcement()
        berth_id = self.running(runtime)
        status = runtime.exec(berth_id, ExecSpec(command=("cat", "/proc/self/status")))
        fields = dict(
            line.split(":", 1) for line in status.stdout.decode().splitlines() if ":" in line
        )
        assert fields["CapEff"].strip() == "0000000000000000"
        assert fields["CapPrm"].strip() == "0000000000000000"
        assert fields["NoNewPrivs"].strip() == "1"
        root = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", "echo x > /berth-probe")))
        assert root.exit_code != 0
        assert b"Read-only file system" in root.stderr
        tmp = runtime.exec(
            berth_id, ExecSpec(command=("sh", "-c", "echo ok > /tmp/probe && cat /tmp/probe"))
        )
        assert (tmp.exit_code, tmp.stdout) == (0, b"ok\n")
        interfaces = runtime.exec(berth_id, ExecSpec(command=("cat", "/proc/net/dev")))
        names = [
            line.split(":", 1)[0].strip()
            for line in interfaces.stdout.decode().splitlines()[2:]
            if ":" in line
        ]
        assert names == ["lo"]

    def test_a_profile_pids_limit_stops_a_fork_bomb(self, runtime: Runtime) -> None:
        self._require_enforcement()
        if not runtime.enforcement()["pids"].startswith(("pids cgroup", "RLIMIT_NPROC")):
            pytest.skip(f"pids not enforced here: {runtime.enforcement()['pids']}")
        runtime.security = build_policy({"tiny": {"pids": 16}})
        berth_id = self.running(runtime, profile="tiny")
        bomb = 'i=0; while [ $i -lt 40 ]; do sleep 3 & i=$((i+1)); done; wait; echo done'
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", bomb), timeout=30))
        assert result.stderr, result  # "can't fork" / "Resource temporarily unavailable"
        assert b"fork" in result.stderr.lower() or b"unavailable" in result.stderr.lower()

    def test_a_profile_memory_limit_stops_a_memory_hog(self, runtime: Runtime) -> None:
        self._require_enforcement()
        runtime.security = build_policy({"small": {"memory_mb": 64}})
        berth_id = self.running(runtime, profile="small")
        hog = "awk 'BEGIN { s = \"x\"; while (length(s) < 268435456) s = s s; print length(s) }'"
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", hog), timeout=60))
        assert result.exit_code != 0, result
        assert b"268435456" not in result.stdout

    def test_asked_limits_only_tighten_the_profile(self, runtime: Runtime) -> None:
        profile = runtime.security.profile("default")
        assert profile.limits(Limits(memory_mb=4096, pids=10)) == Limits(
            memory_mb=1024, cpus=1.0, pids=10
        )

    # ---------------------------------------------------------------- host mounts

    def _mount_root(self) -> str:
        root = tempfile.mkdtemp(prefix="berthd-roots-", dir="/tmp")
        os.chmod(root, 0o755)
        self._cleanup.append(root)
        return root

    @pytest.fixture(autouse=True)
    def _roots(self) -> Iterator[None]:
        self._cleanup: list[str] = []
        yield
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def test_mounts_only_under_the_roots(self, runtime: Runtime) -> None:
        if not self.mounts_supported:
            pytest.skip("no mounts on this runtime")
        root = self._mount_root()
        os.mkdir(os.path.join(root, "inside"))
        os.symlink("/etc", os.path.join(root, "out"))
        os.symlink("inside", os.path.join(root, "in"))
        runtime.security = build_policy(mount_roots=[root])

        def create(host_path: str) -> None:
            mount = Mount(host_path=host_path, container_path="/data")
            runtime.create(self.spec(mounts=(mount,)))

        with pytest.raises(MountForbidden):
            create("/etc")  # no root
        with pytest.raises(MountForbidden):
            create(os.path.join(root, "out"))  # a symlink out of the root
        with pytest.raises(MountForbidden):
            create(os.path.join(root, "inside", "..", ".."))  # climbs out
        with pytest.raises(HostPathNotFound):
            create(os.path.join(root, "missing"))
        runtime.security = build_policy(mount_roots=["/"])
        for control in ("/var/run/docker.sock", "/run", "/proc", "/sys", "/dev", "/etc", "/"):
            with pytest.raises(MountForbidden):
                create(control)
        runtime.security = build_policy(mount_roots=[root])
        create(os.path.join(root, "in"))  # a symlink that stays inside is fine

    def test_a_mount_swapped_for_a_symlink_after_create_is_refused(self, runtime: Runtime) -> None:
        self._require_enforcement()
        root = self._mount_root()
        data = os.path.join(root, "data")
        os.mkdir(data)
        runtime.security = build_policy(mount_roots=[root])
        spec = self.spec(mounts=(Mount(host_path=data, container_path="/data"),))
        runtime.create(spec)
        os.rename(data, data + ".old")
        os.symlink("/etc", data)
        with pytest.raises(MountForbidden):
            runtime.start(spec.berth_id)
        assert runtime.inspect(spec.berth_id).state != "running"
