"""The security policy on its own: profiles from configuration, the host jail's control
paths, sockets and listings (real files, no daemon)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from berthd.daemon.config import ConfigError, load_config
from berthd.runtime.base import Limits, Mount, MountForbidden, PathForbidden, UnknownProfile
from berthd.runtime.fake import FakeRuntime
from berthd.runtime.hostpath import HostJail
from berthd.runtime.security import BUILTIN_PROFILES, build_policy, configure_security


def test_builtin_profiles() -> None:
    default = BUILTIN_PROFILES["default"]
    assert (default.network, default.pids, default.memory_mb, default.cpus, default.read_only_root) == (
        False, 256, 1024, 1.0, True)
    assert BUILTIN_PROFILES["networked"].network is True
    assert BUILTIN_PROFILES["networked"].limits(Limits()) == default.limits(Limits())
    with pytest.raises(UnknownProfile):
        build_policy().profile("nope")


def test_profiles_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "berthd.toml"
    config.write_text(
        'mount_roots = ["/srv/data"]\n[profiles.build]\nnetwork = true\nmemory_mb = 4096\n'
        "[profiles.default]\npids = 128\n"
    )
    cfg = load_config({"config": str(config), "data_dir": str(tmp_path / "data")}, env={})
    runtime = FakeRuntime("n")
    policy = configure_security({"fake": runtime}, cfg, str(tmp_path / "data"))
    assert runtime.security is policy
    build = policy.profile("build")
    assert (build.network, build.memory_mb, build.pids, build.cpus) == (True, 4096, 256, 1.0)
    assert policy.profile("default").pids == 128  # a built-in one redefined
    assert policy.mounts.roots == ("/srv/data",) and policy.browse.roots == ("/srv/data",)
    assert str(tmp_path / "data") in policy.mounts.forbidden


def test_config_names_what_is_wrong(tmp_path: Path) -> None:
    config = tmp_path / "berthd.toml"
    config.write_text("[profiles.build]\nnetwrk = true\n")
    with pytest.raises(ConfigError, match="unknown field 'netwrk'.*network"):
        load_config({"config": str(config)}, env={})
    config.write_text("[profiles.Bad_Name]\nnetwork = true\n")
    with pytest.raises(ConfigError, match="profiles"):
        load_config({"config": str(config)}, env={})
    config.write_text("[profiles.build]\npids = -1\n")
    with pytest.raises(ConfigError, match="pids"):
        load_config({"config": str(config)}, env={})
    # below what a runtime can run a sandbox with: refused at load, 0 (no limit) is fine
    for line, field in (("pids = 3", "pids"), ("memory_mb = 4", "memory_mb"), ("cpus = 0.001", "cpus")):
        config.write_text(f"[profiles.build]\n{line}\n")
        with pytest.raises(ConfigError, match=f"{field} must be 0 .no limit. or at least"):
            load_config({"config": str(config)}, env={})
    config.write_text("[profiles.build]\npids = 0\nmemory_mb = 0\ncpus = 0\n")
    load_config({"config": str(config)}, env={})


def test_control_paths_inside_a_root(tmp_path: Path) -> None:
    data = tmp_path / "home" / ".local" / "share" / "berthd"
    data.mkdir(parents=True)
    (tmp_path / "home" / "project").mkdir()
    jail = HostJail([str(tmp_path / "home")], forbidden=[str(data)])
    with pytest.raises(PathForbidden):
        jail.resolve(str(data))  # the data dir itself
    with pytest.raises(PathForbidden):
        jail.resolve(str(data / "admin.key"))  # inside it, even missing
    with pytest.raises(PathForbidden):
        jail.resolve(str(tmp_path / "home"))  # a mount containing it
    assert jail.resolve(str(tmp_path / "home" / "project")).path == str(tmp_path / "home" / "project")
    # a listing of the home is fine, and never names what leads to the data dir
    _, entries, _ = jail.list_directory(str(tmp_path / "home" / ".local" / "share"))
    assert entries == []
    (tmp_path / "home" / "link-to-data").symlink_to(data)
    with pytest.raises(PathForbidden):
        jail.resolve(str(tmp_path / "home" / "link-to-data"))


def test_sockets_and_fifos_are_never_mountable(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        os.mkfifo(tmp_path / "fifo")
        policy = build_policy(mount_roots=[str(tmp_path)])
        for name in ("s.sock", "fifo"):
            with pytest.raises(MountForbidden):
                policy.resolve_mount(Mount(str(tmp_path / name), "/x"))


def test_mount_targets(tmp_path: Path) -> None:
    policy = build_policy(mount_roots=[str(tmp_path)])
    for target in ("/", "/proc", "/proc/sys", "/sys/x", "/dev/shm", "/tmp", "/run/berth", "/run/berth/x",
                   "/a/../b", "relative"):
        with pytest.raises(Exception) as refused:
            policy.resolve_mount(Mount(str(tmp_path), target))
        assert getattr(refused.value, "code", None) == "INVALID_PATH", target
    assert policy.resolve_mount(Mount(str(tmp_path), "/data/", "rw")) == Mount(str(tmp_path), "/data", "rw")
