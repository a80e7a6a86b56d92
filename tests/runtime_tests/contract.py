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
    Limits,
    Mount,
    Runtime,
    RuntimeError_,
    RuntimeFailure,
    SandboxNotFound,
    SandboxStatus,
)

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
                command=("sh", "-c", "(sleep 1; echo late > late.txt) & echo started; sleep 30"),
                workdir="/tmp",
                timeout=0.5,
            ),
        )
        assert result.timed_out
        assert result.exit_code != 0
        assert result.stdout == b"started\n"
        assert time.monotonic() - began < 5
        time.sleep(1.5)  # the background child would have written by now
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
        spec = self.spec()
        runtime.create(spec)
        runtime.put_file(spec.berth_id, "/tmp/seed.txt", b"seed")
        assert runtime.get_file(spec.berth_id, "/tmp/seed.txt") == b"seed"

    # ---------------------------------------------------------------- limits

    def test_limits_are_accepted(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, limits=Limits(memory_mb=256, pids=64), network=False)
        assert runtime.exec(berth_id, ExecSpec(command=("echo", "limited"))).stdout == b"limited\n"

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
