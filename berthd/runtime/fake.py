"""An in-memory runtime for unit tests of the layers above, that passes the same contract
tests as the real ones (``tests/runtime_tests/contract.py``).

Lifecycle state, images, logs and the log of calls live in memory. What has to behave
like a real sandbox does, on the host: the main command and every exec run as host
processes (in a new session) inside a per-container temporary directory, so ``echo``,
``cat`` and ``sh -c`` work, exit codes, timeouts and signals are real. ``/workspace``
and ``/tmp`` in ``workdir``, ``put_file`` and ``get_file`` map to ``workspace/`` and
``tmp/`` in that directory (on disk, so that a command can read a file put there);
paths inside commands are not translated. A container created without a command idles
(no process) until stopped or killed. A shared directory (``berth_dir``) is ``berth/`` in
that directory, the same path on both sides, in ``$BERTH_DIR``. ``exec_detached`` starts
a host process in a session of its own, ended with the container's execs.

Test hooks (all thread-safe):

* ``fail_next(operation, exc)`` - the next call to method ``operation`` ("create",
  "start", "exec", "pull", ...) raises ``exc`` instead of running; queued per operation.
* ``exit_behind_our_back(berth_id, exit_code)`` - the container ends as if its process
  exited (or was killed) outside our control; the watch callback fires.
* ``vanish(berth_id)`` - the container disappears from the engine (``SandboxNotFound``
  from then on); the watch callback fires (exit code unknown) if it was running.
* ``set_unavailable(bool)`` - every call raises ``RuntimeUnavailable`` while True.
* ``calls`` - ``(operation, berth_id or ref)`` for every call, in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import shutil
import signal as _signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from berthd.runtime import _files, _proc
from berthd.runtime._hostexec import ProcessExecStream, Spawner, run_to_completion
from berthd.runtime._util import exit_code_from_returncode, signal_number, utc_now
from berthd.runtime.base import (
    BERTH_DIR_ENV,
    LOG_TAIL_WINDOW,
    BerthDir,
    ContainerSpec,
    ExecResult,
    ExecSpec,
    ExecStream,
    ExitNotice,
    ImageInfo,
    ImageMissing,
    Runtime,
    RuntimeFailure,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxStatus,
    WorkdirNotFound,
    last_lines,
)

__all__ = ["FakeRuntime"]

log = logging.getLogger(__name__)

DEFAULT_IMAGES = ("host", "berthd-test/busybox:latest", "berthd-test/python:3.11")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _image_id(ref: str) -> str:
    return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()


def _normal_ref(ref: str) -> str:
    """ "alpine" and "alpine:latest" are one image, as in Docker."""
    last = ref.rsplit("/", 1)[-1]
    return ref if (":" in last or "@" in last) else f"{ref}:latest"


@dataclasses.dataclass
class _Container:
    spec: ContainerSpec
    directory: str
    state: str = "created"
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    logs: bytearray = dataclasses.field(default_factory=bytearray)
    process: subprocess.Popen[bytes] | None = None
    run: int = 0  # bumped at every start: a waiter of an older run must not touch state
    execs: set[subprocess.Popen[bytes]] = dataclasses.field(default_factory=set)
    changed: threading.Condition = dataclasses.field(default_factory=threading.Condition)

    @property
    def workspace(self) -> str:
        return os.path.join(self.directory, "workspace")

    @property
    def tmp(self) -> str:
        return os.path.join(self.directory, "tmp")

    @property
    def berth(self) -> str:
        return os.path.join(self.directory, "berth")


class FakeRuntime(Runtime):
    """See the module docstring. ``images`` seeds the image list."""

    name = "fake"
    detached_execs = True

    def __init__(self, node_id: str, images: tuple[str, ...] = DEFAULT_IMAGES) -> None:
        self.node_id = node_id
        self.calls: list[tuple[str, str | None]] = []
        self._lock = threading.RLock()
        self._containers: dict[str, _Container] = {}
        self._images: dict[str, ImageInfo] = {}
        for ref in images:
            self._add_image(ref)
        self._failures: dict[str, deque[BaseException]] = {}
        self._unavailable = False
        self._on_exit: Callable[[ExitNotice], None] | None = None
        self._notices: queue.Queue[ExitNotice | None] = queue.Queue()
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ test hooks

    def fail_next(self, operation: str, exc: BaseException) -> None:
        """Make the next call to ``operation`` raise ``exc``."""
        if not callable(getattr(Runtime, operation, None)):
            raise ValueError(f"{operation!r} is not a Runtime operation")
        with self._lock:
            self._failures.setdefault(operation, deque()).append(exc)

    def set_unavailable(self, unavailable: bool) -> None:
        """While True, every call raises ``RuntimeUnavailable`` (the engine is down)."""
        self._unavailable = unavailable

    def exit_behind_our_back(self, berth_id: str, exit_code: int) -> None:
        """End the container outside our control, with ``exit_code``."""
        with self._lock:
            box = self._box(berth_id)
            if box.state != "running":
                raise RuntimeFailure(f"container {berth_id} is not running")
            self._kill_main(box)
            self._finish(box, exit_code)

    def vanish(self, berth_id: str) -> None:
        """The engine loses the container: it is simply gone."""
        with self._lock:
            box = self._box(berth_id)
            del self._containers[berth_id]
            was_running = box.state == "running"
            box.run += 1  # its waiter must not report anything any more
            self._kill_main(box)
        shutil.rmtree(box.directory, ignore_errors=True)
        if was_running:
            self._notify(ExitNotice(berth_id, None, None))

    # ------------------------------------------------------------------ plumbing

    def _enter(self, operation: str, subject: str | None) -> None:
        """Record the call and apply injected faults."""
        with self._lock:
            self.calls.append((operation, subject))
            pending = self._failures.get(operation)
            exc = pending.popleft() if pending else None
        if self._unavailable:
            raise RuntimeUnavailable("fake runtime set unavailable")
        if self._closed:
            raise RuntimeUnavailable("fake runtime closed")
        if exc is not None:
            raise exc

    def _box(self, berth_id: str) -> _Container:
        box = self._containers.get(berth_id)
        if box is None:
            raise SandboxNotFound(f"no container {berth_id} in the fake runtime")
        return box

    def _status(self, box: _Container) -> SandboxStatus:
        return SandboxStatus(
            berth_id=box.spec.berth_id,
            state=box.state,
            exit_code=box.exit_code,
            started_at=box.started_at,
            finished_at=box.finished_at,
            node_id=box.spec.node_id,
            runtime_ref=box.directory,
        )

    @staticmethod
    def _main_alive(box: _Container) -> bool:
        # Not Popen.poll(): that would reap, and only the waiter thread reaps (under the
        # lock, after killing leftovers), so a pid we signal is never a recycled one.
        return box.process is not None and _proc.alive(box.process.pid, None)

    def _kill_main(self, box: _Container) -> None:
        """SIGKILL the main process tree (caller holds the lock)."""
        if box.process is not None and self._main_alive(box):
            _proc.kill_tree(box.process.pid)

    def _finish(self, box: _Container, exit_code: int | None) -> None:
        """Record an exit (caller holds the lock), end its execs, tell the watcher."""
        for process in box.execs:
            if process.returncode is None and _proc.alive(process.pid, None):
                _proc.kill_tree(process.pid)
        box.execs.clear()
        box.state = "exited"
        box.exit_code = exit_code
        box.finished_at = utc_now()
        box.run += 1
        with box.changed:
            box.changed.notify_all()
        self._notify(ExitNotice(box.spec.berth_id, exit_code, box.finished_at))

    def _notify(self, notice: ExitNotice) -> None:
        if self._on_exit is not None:
            self._notices.put(notice)

    def _env(self, box: _Container, extra: dict[str, str]) -> dict[str, str]:
        env = {"PATH": _PATH, "HOME": box.workspace, "TMPDIR": box.tmp, "LANG": "C.UTF-8"}
        env.update(box.spec.env)
        env.update(extra)
        if box.spec.berth_dir:
            env[BERTH_DIR_ENV] = box.berth
        return env

    def _cwd(self, box: _Container, workdir: str | None) -> str:
        wanted = os.path.normpath(workdir or box.spec.workdir or "/workspace")
        for prefix, host in (("/workspace", box.workspace), ("/tmp", box.tmp)):
            if wanted == prefix or wanted.startswith(prefix + "/"):
                return host + wanted[len(prefix) :]
        return wanted

    # ------------------------------------------------------------------ lifecycle

    @property
    def isolation(self) -> str:
        return "none"

    def enforcement(self) -> dict[str, str]:
        parts = ("capabilities", "no_new_privileges", "pids", "memory", "cpus", "network",
                 "read_only_root", "tmp", "mounts")
        return {part: "not enforced (fake runtime, for tests)" for part in parts}

    def ping(self) -> None:
        self._enter("ping", None)

    def create(self, spec: ContainerSpec) -> SandboxStatus:
        self._enter("create", spec.berth_id)
        with self._lock:
            if _normal_ref(spec.image) not in self._images:
                raise ImageMissing(f"image {spec.image!r} not found; pull it first")
            # the same refusals as the real runtimes; nothing of the profile is enforced
            profile = self.security.profile(spec.profile)
            spec = dataclasses.replace(
                spec,
                limits=profile.limits(spec.limits),
                network=spec.network and profile.network,
                mounts=self.security.resolve_mounts(spec.mounts),
            )
            existing = self._containers.get(spec.berth_id)
            if existing is not None:
                if existing.spec.node_id == spec.node_id:
                    return self._status(existing)
                raise RuntimeFailure(f"container {spec.berth_id} already exists")
            directory = tempfile.mkdtemp(prefix=f"berth-fake-{spec.berth_id}-")
            box = _Container(spec=spec, directory=directory)
            os.mkdir(box.workspace)
            os.mkdir(box.tmp)
            if spec.berth_dir:
                os.mkdir(box.berth)
            cwd = self._cwd(box, spec.workdir)
            if cwd.startswith(directory + os.sep):
                os.makedirs(cwd, exist_ok=True)
            self._containers[spec.berth_id] = box
            return self._status(box)

    def start(self, berth_id: str) -> SandboxStatus:
        self._enter("start", berth_id)
        with self._lock:
            box = self._box(berth_id)
            if box.state == "running":
                return self._status(box)
            process: subprocess.Popen[bytes] | None = None
            if box.spec.command:
                try:
                    process = subprocess.Popen(
                        list(box.spec.command),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        env=self._env(box, {}),
                        cwd=self._cwd(box, None),
                        start_new_session=True,
                        close_fds=True,
                    )
                except OSError as exc:
                    raise RuntimeFailure(
                        f"cannot start {box.spec.command[0]!r} in the container: {exc}"
                    ) from None
            box.run += 1
            box.state, box.exit_code, box.finished_at = "running", None, None
            box.started_at = utc_now()
            box.process = process
            if process is not None:
                threading.Thread(
                    target=self._wait_main,
                    args=(box, process, box.run),
                    name=f"fake-main-{berth_id}",
                    daemon=True,
                ).start()
            return self._status(box)

    def _wait_main(self, box: _Container, process: subprocess.Popen[bytes], run: int) -> None:
        assert process.stdout is not None
        while chunk := os.read(process.stdout.fileno(), 65536):
            with self._lock:
                box.logs += chunk
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        process.stdout.close()
        with self._lock:
            # Kill leftovers of the group while the leader is still an unreaped zombie.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, _signal.SIGKILL)
            code = exit_code_from_returncode(process.wait())
            if box.run == run and box.state == "running":
                self._finish(box, code)

    def _signal(self, box: _Container, sig: int) -> None:
        """Signal the main process tree; an idle container just ends."""
        if box.process is not None and self._main_alive(box):
            _proc.signal_tree(box.process.pid, sig)
        elif box.process is None and box.state == "running" and sig in (
            _signal.SIGTERM, _signal.SIGKILL, _signal.SIGINT, _signal.SIGHUP,
        ):  # fmt: skip
            self._finish(box, 128 + sig)

    def _wait_exited(self, box: _Container, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with box.changed:
            while box.state == "running" and time.monotonic() < deadline:
                box.changed.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))

    def stop(self, berth_id: str, timeout: float = 10.0) -> SandboxStatus:
        self._enter("stop", berth_id)
        with self._lock:
            box = self._box(berth_id)
            if box.state != "running":
                return self._status(box)
            self._signal(box, _signal.SIGTERM)
        self._wait_exited(box, timeout)
        with self._lock:
            if box.state == "running":
                self._signal(box, _signal.SIGKILL)
        self._wait_exited(box, 10.0)
        with self._lock:
            return self._status(box)

    def kill(self, berth_id: str, signal: str = "KILL") -> SandboxStatus:
        self._enter("kill", berth_id)
        number = signal_number(signal)
        with self._lock:
            box = self._box(berth_id)
            if box.state != "running":
                return self._status(box)
            self._signal(box, number)
        if number == _signal.SIGKILL:
            self._wait_exited(box, 10.0)
        with self._lock:
            return self._status(box)

    def remove(self, berth_id: str, force: bool = False) -> None:
        self._enter("remove", berth_id)
        with self._lock:
            box = self._box(berth_id)
            if box.state == "running" and not force:
                raise RuntimeFailure(
                    f"container {berth_id} is running; stop it first or remove with force"
                )
            if box.state == "running":
                self._kill_main(box)
                self._finish(box, 137)
            del self._containers[berth_id]
        shutil.rmtree(box.directory, ignore_errors=True)

    def inspect(self, berth_id: str) -> SandboxStatus:
        self._enter("inspect", berth_id)
        with self._lock:
            return self._status(self._box(berth_id))

    def list_managed(self, node_id: str) -> list[SandboxStatus]:
        self._enter("list_managed", node_id)
        with self._lock:
            return [self._status(b) for b in self._containers.values() if b.spec.node_id == node_id]

    # ------------------------------------------------------------------ exec

    def _spawner(self, berth_id: str, spec: ExecSpec) -> Spawner:
        with self._lock:
            box = self._box(berth_id)
            if box.state != "running":
                raise RuntimeFailure(f"container {berth_id} is not running")
            if not spec.command:
                raise RuntimeFailure("exec needs a command")
            cwd = self._cwd(box, spec.workdir)
            if spec.workdir and not os.path.isdir(cwd):
                raise WorkdirNotFound(
                    f"working directory {spec.workdir!r} does not exist in the container",
                    field="workdir",
                )
            env = self._env(box, dict(spec.env))

        def launch(spawn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
            with self._lock:
                process = spawn()
                box.execs = {p for p in box.execs if p.returncode is None} | {process}
                return process

        def after_exit(pid: int) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, _signal.SIGKILL)

        def signal_tree(pid: int, sig: int) -> None:
            _proc.signal_tree(pid, sig)

        return Spawner(
            list(spec.command),
            env=env,
            cwd=cwd,
            kill_tree=_proc.kill_tree,
            signal_tree=signal_tree,
            after_exit=after_exit,
            display_name=spec.command[0],
            launcher=launch,
        )

    def exec(self, berth_id: str, spec: ExecSpec) -> ExecResult:
        self._enter("exec", berth_id)
        return run_to_completion(
            self._spawner(berth_id, spec),
            stdin=spec.stdin,
            timeout=spec.timeout,
            output_cap=spec.output_cap,
        )

    def exec_detached(self, berth_id: str, spec: ExecSpec) -> None:
        """A host process in a session of its own (it outlives the call, and this object),
        ended with the container's execs at stop, kill and remove."""
        self._enter("exec_detached", berth_id)
        spawner = self._spawner(berth_id, spec)
        if shutil.which(spec.command[0], path=dict(spawner.env).get("PATH", _PATH)) is None:
            spawner.release()
            raise RuntimeFailure(f"executable {spec.command[0]!r} not found in the container")
        process = spawner.popen(
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        spawner.release()
        threading.Thread(target=process.wait, name=f"fake-detached-{process.pid}", daemon=True).start()

    def exec_stream(self, berth_id: str, spec: ExecSpec, tty: bool = False) -> ExecStream:
        self._enter("exec_stream", berth_id)
        stream = ProcessExecStream(self._spawner(berth_id, spec), tty=tty, timeout=spec.timeout)
        if spec.stdin:
            stream.write_stdin(spec.stdin)
        return stream

    # ------------------------------------------------------------------ logs and files

    def logs(self, berth_id: str, tail: int | None = None) -> bytes:
        self._enter("logs", berth_id)
        with self._lock:
            data = bytes(self._box(berth_id).logs)
        if tail is None:
            return data
        return b"".join(data.splitlines(keepends=True)[-tail:]) if tail > 0 else b""

    def follow_logs(self, berth_id: str, tail: int | None = None) -> Iterator[bytes]:
        self._enter("follow_logs", berth_id)
        with self._lock:
            box = self._box(berth_id)

        def follow() -> Iterator[bytes]:
            position = 0
            if tail is not None:
                with self._lock:
                    data = bytes(box.logs)
                position = len(data)
                if lines := last_lines(data[-LOG_TAIL_WINDOW:], tail):
                    yield lines
            while True:
                with self._lock:
                    finished = box.state != "running" or box.spec.berth_id not in self._containers
                    chunk = bytes(box.logs[position:])
                if chunk:
                    position += len(chunk)
                    yield chunk
                    continue
                if finished:
                    return
                time.sleep(0.05)

        return follow()

    def _roots(self, berth_id: str) -> dict[str, str]:
        with self._lock:
            box = self._box(berth_id)
            return {"workspace": box.workspace, "tmp": box.tmp}

    def berth_dir(self, berth_id: str) -> BerthDir:
        self._enter("berth_dir", berth_id)
        with self._lock:
            box = self._box(berth_id)
        if not box.spec.berth_dir:
            raise RuntimeFailure(
                f"container {berth_id} has no shared directory (create it with berth_dir=True)"
            )
        return BerthDir(box.berth, box.berth)

    def put_file(self, berth_id: str, path: str, data: bytes) -> None:
        self._enter("put_file", berth_id)
        base, parts = _files.split_container_path(path, self._roots(berth_id))
        _files.write_file(base, parts, data, path)

    def get_file(self, berth_id: str, path: str) -> bytes:
        self._enter("get_file", berth_id)
        base, parts = _files.split_container_path(path, self._roots(berth_id))
        return _files.read_file(base, parts, path)

    # ------------------------------------------------------------------ images

    def _add_image(self, ref: str) -> ImageInfo:
        ref = _normal_ref(ref)
        info = ImageInfo(
            id=_image_id(ref), tags=(ref,), size=1024, created=utc_now(), runtime="fake"
        )
        self._images[ref] = info
        return info

    def images(self) -> list[ImageInfo]:
        self._enter("images", None)
        with self._lock:
            return list(self._images.values())

    def pull(
        self, ref: str, progress: Callable[[dict[str, object]], None] | None = None
    ) -> ImageInfo:
        self._enter("pull", ref)
        steps: list[dict[str, Any]] = [
            {"status": f"Pulling from {ref}", "id": "latest"},
            {
                "status": "Downloading",
                "id": "fake-layer",
                "progressDetail": {"current": 512, "total": 1024},
            },
            {"status": "Download complete", "id": "fake-layer"},
            {"status": f"Status: Downloaded newer image for {_normal_ref(ref)}"},
        ]
        if progress is not None:
            for step in steps:
                try:
                    progress(step)
                except Exception:
                    log.exception("fake runtime: pull progress callback failed")
        with self._lock:
            return self._add_image(ref)

    def remove_image(self, ref: str, force: bool = False) -> None:
        self._enter("remove_image", ref)
        with self._lock:
            key = _normal_ref(ref)
            if key not in self._images:
                raise ImageMissing(f"image {ref!r} not found")
            users = [
                b.spec.berth_id
                for b in self._containers.values()
                if _normal_ref(b.spec.image) == key
            ]
            if users and not force:
                raise RuntimeFailure(f"image {ref!r} is used by container(s) {', '.join(users)}")
            del self._images[key]

    # ------------------------------------------------------------------ watch

    def watch(self, on_exit: Callable[[ExitNotice], None]) -> None:
        self._enter("watch", None)
        self._on_exit = on_exit
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(
                target=self._dispatch, name=f"fake-watch-{self.node_id}", daemon=True
            )
            self._dispatcher.start()

    def _dispatch(self) -> None:
        """Deliver notices on the runtime's own thread, as real runtimes do."""
        while (notice := self._notices.get()) is not None:
            callback = self._on_exit
            if callback is None:
                continue
            try:
                callback(notice)
            except Exception:
                log.exception("fake runtime: on_exit callback failed for %s", notice.berth_id)

    def close(self) -> None:
        """Stop watching; kill every process the fake started and delete its directories."""
        with self._lock:
            boxes = list(self._containers.values())
            self._containers.clear()
            self._closed = True
            for box in boxes:
                box.run += 1
                self._kill_main(box)
        for box in boxes:
            shutil.rmtree(box.directory, ignore_errors=True)
        if self._dispatcher is not None:
            self._notices.put(None)
            self._dispatcher.join(timeout=5)
            self._dispatcher = None
