"""The local runtime, with bubblewrap and without: the contract, plus what only it has
(the shim surviving the daemon, path safety, the host image, what is enforced)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from berthd.runtime.base import (
    ContainerSpec,
    ExecSpec,
    Limits,
    Mount,
    Runtime,
    RuntimeFailure,
)
from berthd.runtime.local import LocalRuntime
from berthd.runtime.security import build_policy
from tests.conftest import missing
from tests.runtime_tests.contract import SLEEPER, Notices, RuntimeContract, wait_until

AS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_root() -> Iterator[str]:
    """A root every sandbox uid can traverse (pytest's tmp_path is 0700 under root)."""
    root = tempfile.mkdtemp(prefix="berthd-local-test-", dir="/tmp")
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class _LocalContract(RuntimeContract):
    image = "host"
    use_bwrap: bool
    duplicate_window = 1.0

    @pytest.fixture(autouse=True)
    def _root(self, local_root: str) -> None:
        # Autouse: runs before the contract's ``runtime`` fixture needs it.
        self.root = local_root

    def make_runtime(self, node_id: str) -> Runtime:
        return LocalRuntime(self.root, node_id, use_bwrap=self.use_bwrap)

    def state_of(self, berth_id: str) -> dict[str, object]:
        with open(os.path.join(self.root, berth_id, "state.json")) as f:
            state: dict[str, object] = json.load(f)
        return state

    def kill_behind_our_back(self, runtime: Runtime, berth_id: str) -> None:
        pid = self.state_of(berth_id)["pid"]
        assert isinstance(pid, int)
        if self.use_bwrap:
            os.kill(pid, signal.SIGKILL)  # the outer bwrap: the sandbox dies with it
        else:
            os.killpg(pid, signal.SIGKILL)

    # ---------------------------------------------------------------- detached processes

    def _leftovers(self, berth_id: str, uid: object) -> list[str]:
        """Processes of this container still on the host (ps): by path, and by its uid."""
        listing = subprocess.run(["ps", "-eo", "uid=,stat=,args="], capture_output=True, text=True)
        found = []
        for line in listing.stdout.splitlines():
            owner, stat, args = (line.split(None, 2) + ["", ""])[:3]
            if stat.startswith("Z"):
                continue
            if os.path.join(self.root, berth_id) in args or (uid is not None and owner == str(uid)):
                found.append(line)
        return found

    def test_detached_processes_leave_nothing_behind(self, runtime: Runtime) -> None:
        for end in ("stop", "remove"):
            berth_id = self.running(runtime, berth_dir=True)
            spec = json.loads(Path(self.root, berth_id, "spec.json").read_text())
            runtime.exec_detached(berth_id, ExecSpec(command=("sh", "-c", self.BEAT)))
            read = self.beats(runtime, berth_id)
            assert wait_until(lambda: read() > 0)  # noqa: B023 - used at once
            [own] = os.listdir(Path(self.root, berth_id, "detached"))
            state = json.loads(Path(self.root, berth_id, "detached", own, "state.json").read_text())
            for procs in spec.get("cgroup_procs") or ():  # the container's cgroups hold it
                assert str(state["pid"]) in Path(procs).read_text().split()
            # a restarted daemon (a new runtime on the same root) still ends it
            other = LocalRuntime(self.root, self.node_id, use_bwrap=self.use_bwrap)
            try:
                if end == "stop":
                    other.stop(berth_id, timeout=2)
                else:
                    other.remove(berth_id, force=True)
            finally:
                other.close()
            assert wait_until(lambda: not self._leftovers(berth_id, spec.get("uid"))), (  # noqa: B023
                self._leftovers(berth_id, spec.get("uid"))
            )

    def test_a_detached_process_stays_out_of_the_watch(self, runtime: Runtime) -> None:
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime, berth_dir=True)
        detached = Path(self.root, berth_id, "detached")
        runtime.exec_detached(berth_id, ExecSpec(command=("true",)))
        assert wait_until(lambda: any(Path(detached, d, "exit.json").exists() for d in os.listdir(detached)))
        assert [s.berth_id for s in runtime.list_managed(self.node_id)] == [berth_id]
        assert not wait_until(lambda: bool(notices.for_id(berth_id)), timeout=self.duplicate_window)
        assert runtime.inspect(berth_id).state == "running"
        runtime.exec_detached(berth_id, ExecSpec(command=SLEEPER))
        assert len(os.listdir(detached)) == 1  # the one that ended is forgotten

    # ---------------------------------------------------------------- the host image

    def test_only_the_host_image(self, runtime: Runtime) -> None:
        with pytest.raises(RuntimeFailure, match="host"):
            runtime.create(self.spec(image="berthd-test/busybox:latest"))
        with pytest.raises(RuntimeFailure):
            runtime.pull("alpine:3.20")
        progress: list[dict[str, object]] = []
        assert runtime.pull("host", progress=progress.append).id == "host"
        assert progress
        assert [i.id for i in runtime.images()] == ["host"]
        with pytest.raises(RuntimeFailure):
            runtime.remove_image("host")

    # ---------------------------------------------------------------- files

    def test_symlinks_never_lead_out(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        planted = runtime.exec(
            berth_id,
            ExecSpec(
                command=("sh", "-c", "ln -s /etc evil && ln -s /etc/hostname h"),
                workdir="/workspace",
            ),
        )
        assert planted.exit_code == 0, planted
        hostname = Path("/etc/hostname").read_bytes()
        for path in ("/workspace/evil/hostname", "/workspace/h"):
            with pytest.raises(RuntimeFailure, match="symlink"):
                runtime.get_file(berth_id, path)
        with pytest.raises(RuntimeFailure, match="symlink"):
            runtime.put_file(berth_id, "/workspace/evil/hostname", b"owned")
        # Writing over a planted link replaces the link, never its target.
        runtime.put_file(berth_id, "/workspace/h", b"mine")
        assert runtime.get_file(berth_id, "/workspace/h") == b"mine"
        assert Path("/etc/hostname").read_bytes() == hostname

    def test_only_workspace_and_tmp_are_reachable(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        for path in ("/etc/hostname", "/workspace/../etc/passwd", "relative.txt", "/workspace"):
            with pytest.raises(RuntimeFailure):
                runtime.get_file(berth_id, path)
        runtime.put_file(berth_id, "/workspace/ok.txt", b"ok")
        assert runtime.exec(berth_id, ExecSpec(command=("cat", "ok.txt"))).stdout == b"ok"

    # ---------------------------------------------------------------- survival

    def test_a_new_runtime_finds_running_containers(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime)
        before = runtime.inspect(berth_id)
        runtime.close()
        again = LocalRuntime(self.root, self.node_id, use_bwrap=self.use_bwrap)
        try:
            found = again.inspect(berth_id)
            assert found.state == "running" and found.started_at == before.started_at
            assert [s.berth_id for s in again.list_managed(self.node_id)] == [berth_id]
            assert again.stop(berth_id, timeout=5).exit_code == 143
        finally:
            again.close()

    def test_containers_survive_a_sigkilled_daemon(self, runtime: Runtime) -> None:
        long_id, short_id = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
        daemon = textwrap.dedent(
            f"""
            import os, signal
            from berthd.runtime.base import ContainerSpec
            from berthd.runtime.local import LocalRuntime
            rt = LocalRuntime({self.root!r}, {self.node_id!r}, use_bwrap={self.use_bwrap!r})
            for berth_id, command in (({long_id!r}, ("sleep", "30")),
                                      ({short_id!r}, ("sh", "-c", "sleep 1; exit 5"))):
                rt.create(ContainerSpec(berth_id=berth_id, node_id={self.node_id!r},
                                        image="host", command=command))
                rt.start(berth_id)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", daemon], cwd=REPO, capture_output=True, timeout=30
        )
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        assert runtime.inspect(long_id).state == "running"
        # The other one ended while no daemon was there: its exit code was kept.
        assert wait_until(lambda: runtime.inspect(short_id).state == "exited", 5)
        assert runtime.inspect(short_id).exit_code == 5
        stopped = runtime.stop(long_id, timeout=5)
        assert stopped.state == "exited" and stopped.exit_code == 143

    # ---------------------------------------------------------------- environment

    def test_the_daemon_environment_does_not_leak(
        self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("BERTHD_ADMIN_KEY", "secret-admin-key")
        berth_id = self.running(runtime)
        result = runtime.exec(
            berth_id, ExecSpec(command=("sh", "-c", 'echo "${BERTHD_ADMIN_KEY:-unset}"'))
        )
        assert result.stdout == b"unset\n"

    def test_memory_limit(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, limits=Limits(memory_mb=64))
        grab = runtime.exec(
            berth_id,
            ExecSpec(command=("python3", "-c", "b = bytearray(256 << 20); print('got it')")),
        )
        assert grab.exit_code != 0
        assert b"got it" not in grab.stdout
        small = runtime.exec(berth_id, ExecSpec(command=("python3", "-c", "print('small')")))
        assert small.stdout == b"small\n"

    def test_pids_limit(self, runtime: Runtime) -> None:
        if not AS_ROOT:
            pytest.skip("the pids limit is per uid: enforced only with per-container uids (root)")
        berth_id = self.running(runtime, limits=Limits(pids=8))
        spawn = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 2 & done; wait"
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", spawn), timeout=10))
        assert result.exit_code != 0
        assert b"fork" in result.stderr.lower()


class TestLocalBubblewrap(_LocalContract):
    use_bwrap = True
    expected_isolation = frozenset({"bubblewrap"})

    @pytest.fixture(autouse=True)
    def _needs_bwrap(self) -> None:
        if shutil.which("bwrap") is None:
            missing("bubblewrap", "`bwrap` is not on PATH (apt-get install bubblewrap)")

    def test_inside_the_sandbox(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, network=False)
        probe = (
            "id -u; hostname; pwd; "
            "cat /etc/shadow >/dev/null 2>&1 && echo shadow-readable || echo shadow-denied; "
            f"ls {self.root} >/dev/null 2>&1 && echo root-visible || echo root-hidden; "
            "ls /run | wc -l; "
            "touch /usr/berth-probe 2>/dev/null && echo usr-writable || echo usr-readonly; "
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
        )
        result = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", probe)))
        assert result.exit_code == 0, result
        lines = result.stdout.decode().split()
        assert lines == [
            "65534",
            f"berth-{berth_id}",
            "/workspace",
            "shadow-denied",
            "root-hidden",
            "0",
            "usr-readonly",
            "lo",
        ]

    def test_the_default_profile_as_cgroups(self, runtime: Runtime) -> None:
        spec_of = lambda b: json.loads(Path(self.root, b, "spec.json").read_text())  # noqa: E731
        berth_id = self.running(runtime)
        procs = spec_of(berth_id).get("cgroup_procs")
        if not procs:
            pytest.skip(f"no cgroups on this host: {runtime.enforcement()['memory']}")
        assert runtime.enforcement()["cpus"].startswith("CFS quota")
        by_controller = {p.split("/")[4]: os.path.dirname(p) for p in procs}
        memory = Path(by_controller["memory"], "memory.limit_in_bytes").read_text().strip()
        assert memory == str(1 << 30)
        assert Path(by_controller["pids"], "pids.max").read_text().strip() == "256"
        assert Path(by_controller["cpu"], "cpu.cfs_quota_us").read_text().strip() == "100000"
        # the main process and an exec are both in them
        main = set(Path(procs[0]).read_text().split())
        assert len(main) >= 3  # the shim, bubblewrap, its init, sleep
        exec_ = runtime.exec_stream(berth_id, ExecSpec(command=("sleep", "5")))
        try:
            assert wait_until(lambda: len(set(Path(procs[0]).read_text().split()) - main) >= 2)
        finally:
            exec_.close()
        # cgroups do not survive a reboot, the container does: a start makes them again
        runtime.stop(berth_id, timeout=5)
        for proc in procs:
            assert wait_until(lambda p=proc: _rmdir(os.path.dirname(p)))
        assert runtime.start(berth_id).state == "running"
        assert Path(by_controller["pids"], "pids.max").read_text().strip() == "256"
        assert len(Path(procs[0]).read_text().split()) >= 3
        runtime.remove(berth_id, force=True)
        runtime.watch(lambda notice: None)  # its poll collects what was still busy
        assert wait_until(lambda: not any(os.path.exists(os.path.dirname(p)) for p in procs))

    def test_the_default_profile_as_rlimits(self, local_root: str) -> None:
        runtime = LocalRuntime(local_root, "rlimits-" + uuid.uuid4().hex[:6], use_bwrap=True, use_cgroups=False)
        self.node_id, self.nodes = runtime.node_id, {runtime.node_id}
        try:
            berth_id = self.running(runtime)
            limits = runtime.exec(berth_id, ExecSpec(command=("cat", "/proc/self/limits"))).stdout.decode()
            rows = {line[:26].strip(): line[26:].split() for line in limits.splitlines()[1:]}
            assert rows["Max address space"][:2] == [str(1 << 30)] * 2  # memory_mb 1024, per process
            if AS_ROOT:
                assert rows["Max processes"][:2] == ["258", "258"]  # pids 256 + bubblewrap's two
            enforced = runtime.enforcement()
            assert enforced["cpus"].startswith("not enforced")
            assert enforced["pids"].startswith("RLIMIT_NPROC" if AS_ROOT else "not enforced")
            runtime.security = build_policy({"small": {"memory_mb": 64, "pids": 16}})
            small = self.running(runtime, profile="small")
            hog = "awk 'BEGIN { s = \"x\"; while (length(s) < 268435456) s = s s; print length(s) }'"
            result = runtime.exec(small, ExecSpec(command=("sh", "-c", hog), timeout=60))
            assert result.exit_code != 0 and b"268435456" not in result.stdout
        finally:
            for status in runtime.list_managed(runtime.node_id):
                runtime.remove(status.berth_id, force=True)
            runtime.close()

    def test_network_when_asked(self, runtime: Runtime) -> None:
        count = ExecSpec(command=("sh", "-c", "tail -n +3 /proc/net/dev | wc -l"))
        berth_id = self.running(runtime, network=True, profile="networked")
        assert int(runtime.exec(berth_id, count).stdout) >= 2  # lo and the host's interfaces
        # the default profile has no network, whatever the spec asks
        berth_id = self.running(runtime, network=True)
        assert int(runtime.exec(berth_id, count).stdout) == 1  # lo only

    def test_mounts(self, runtime: Runtime, local_root: str) -> None:
        shared = tempfile.mkdtemp(prefix="berthd-mount-", dir="/tmp")
        os.chmod(shared, 0o755)
        Path(shared, "data.txt").write_text("from the host\n")
        os.chmod(Path(shared, "data.txt"), 0o644)
        runtime.security = build_policy(mount_roots=[shared])
        try:
            berth_id = self.running(
                runtime, mounts=(Mount(host_path=shared, container_path="/data", mode="ro"),)
            )
            read = runtime.exec(berth_id, ExecSpec(command=("cat", "/data/data.txt")))
            assert read.stdout == b"from the host\n"
            write = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", "echo x > /data/new")))
            assert write.exit_code != 0
            assert not Path(shared, "new").exists()
            # bound by descriptor (what was checked is what is bound), none of them leaked
            launch = json.loads(Path(self.root, berth_id, "launch.json").read_text())
            assert "--ro-bind-fd" in launch["argv"] and launch["pass_fds"]
            open_fds = len(os.listdir("/proc/self/fd"))
            for _ in range(5):
                runtime.exec(berth_id, ExecSpec(command=("true",)))
                runtime.exec(berth_id, ExecSpec(command=("no-such-command",)))
            assert len(os.listdir("/proc/self/fd")) <= open_fds
        finally:
            shutil.rmtree(shared, ignore_errors=True)

    def test_a_killed_shim_means_a_lost_exit(self, runtime: Runtime) -> None:
        notices = Notices()
        runtime.watch(notices)
        berth_id = self.running(runtime)
        shim = self.state_of(berth_id)["shim_pid"]
        assert isinstance(shim, int)
        os.kill(shim, signal.SIGKILL)  # --die-with-parent takes the sandbox down too
        notice = notices.wait_for(berth_id, timeout=5)
        assert notice.exit_code is None
        status = runtime.inspect(berth_id)
        assert status.state == "exited" and status.exit_code is None


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


class TestLocalPlain(_LocalContract):
    use_bwrap = False
    expected_isolation = frozenset({"none"})
    enforces_profiles = False
    mounts_supported = False

    def test_isolation_none_is_loud(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="berthd.runtime.local"):
            LocalRuntime(self.root, "loud", use_bwrap=False).close()
        assert any("isolation: none" in r.getMessage() for r in caplog.records)

    def test_mounts_are_refused(self, runtime: Runtime) -> None:
        with pytest.raises(RuntimeFailure, match="bubblewrap"):
            runtime.create(self.spec(mounts=(Mount(host_path="/etc", container_path="/data"),)))

    def test_containers_cannot_read_each_other(self, runtime: Runtime) -> None:
        if not AS_ROOT:
            pytest.skip("per-container uids need the daemon to run as root")
        first, second = self.running(runtime), self.running(runtime)
        runtime.put_file(second, "/workspace/secret.txt", b"second's secret")
        secret = os.path.join(self.root, second, "workspace", "secret.txt")
        result = runtime.exec(first, ExecSpec(command=("cat", secret)))
        assert result.exit_code != 0
        assert b"secret" not in result.stdout
        uids = {
            runtime.exec(b, ExecSpec(command=("id", "-u"))).stdout.strip() for b in (first, second)
        }
        assert len(uids) == 2 and all(int(u) >= 2_000_000_000 for u in uids)
        shadow = runtime.exec(first, ExecSpec(command=("cat", "/etc/shadow")))
        assert shadow.exit_code != 0

    def test_workdir_maps_into_the_container_dirs(self, runtime: Runtime) -> None:
        berth_id = self.running(runtime, workdir="/workspace/sub")
        assert runtime.exec(berth_id, ExecSpec(command=("sh", "-c", "echo hi > f"))).exit_code == 0
        assert runtime.get_file(berth_id, "/workspace/sub/f") == b"hi\n"


def test_bwrap_required_but_unusable_is_unavailable(
    local_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berthd.runtime.base import RuntimeUnavailable

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeUnavailable):
        LocalRuntime(local_root, "nobwrap", use_bwrap=True)
    auto = LocalRuntime(local_root, "nobwrap", use_bwrap=None)
    try:
        assert auto.isolation == "none"
    finally:
        auto.close()


def test_a_root_others_cannot_traverse_is_refused() -> None:
    if not AS_ROOT:
        pytest.skip("only root runs containers as other uids")
    private = tempfile.mkdtemp(prefix="berthd-private-", dir="/tmp")  # 0700
    try:
        with pytest.raises(RuntimeFailure, match="searchable"):
            LocalRuntime(os.path.join(private, "root"), "private", use_bwrap=False)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_spec_files_are_private(local_root: str) -> None:
    rt = LocalRuntime(local_root, "private-files", use_bwrap=False)
    try:
        spec = ContainerSpec(
            berth_id=uuid.uuid4().hex[:12],
            node_id="private-files",
            image="host",
            command=("true",),
            env={"TOKEN": "s3cret"},
        )
        rt.create(spec)
        assert os.stat(os.path.join(local_root, spec.berth_id, "spec.json")).st_mode & 0o077 == 0
        rt.remove(spec.berth_id)
    finally:
        rt.close()
