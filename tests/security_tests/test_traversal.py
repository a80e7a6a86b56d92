"""The traversal battery (issue 4): generated traversal and symlink attempts against host
mounts, host-directory browsing and file copy into and out of sandboxes → 0 escapes.

``BERTHD_TRAVERSAL_ATTEMPTS`` (default 600) sets how many host paths are generated; each
is tried as a mount and as a browse, so the jail battery alone runs twice that, and it
asserts at least 500. The file-copy battery plants symlinks inside real sandboxes (local
with bubblewrap, Docker) — including one swapped back and forth while the copies run —
and checks the host afterwards. Figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berthd.runtime.base import (
    ContainerSpec,
    ExecSpec,
    Mount,
    Runtime,
    RuntimeError_,
    RuntimeFailure,
)
from berthd.runtime.docker import DockerRuntime
from berthd.runtime.local import LocalRuntime
from berthd.runtime.security import build_policy
from tests.conftest import BUSYBOX_IMAGE, missing
from tests.security_tests.traversal import ESCAPE_SUFFIXES, HostTree, payloads

ATTEMPTS = int(os.environ.get("BERTHD_TRAVERSAL_ATTEMPTS", "600"))
REFUSALS = {"MOUNT_FORBIDDEN", "PATH_FORBIDDEN", "PATH_NOT_FOUND", "INVALID_PATH"}


@pytest.fixture
def tree() -> Iterator[HostTree]:
    base = tempfile.mkdtemp(prefix="berthd-traversal-", dir="/tmp")
    try:
        yield HostTree.make(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_generator_makes_what_it_is_asked(tree: HostTree) -> None:
    assert len(list(payloads(tree, 7))) == 7
    assert len(list(payloads(tree, ATTEMPTS))) == ATTEMPTS
    assert list(payloads(tree, 50)) == list(payloads(tree, 50))  # seeded: the same run


def test_jail_battery_mounts_and_browse(tree: HostTree) -> None:
    policy = build_policy(mount_roots=[tree.root], host_roots=[tree.root])
    attempts = escapes = refused = allowed = 0
    for path in payloads(tree, ATTEMPTS):
        attempts += 1
        try:
            mount = policy.resolve_mount(Mount(host_path=path, container_path="/data"))
        except RuntimeFailure as exc:
            assert exc.code in REFUSALS, (path, exc)
            refused += 1
        else:
            allowed += 1
            if tree.escaped(mount.host_path):
                escapes += 1
        attempts += 1
        try:
            resolved, entries, _ = policy.browse.list_directory(path)
        except RuntimeFailure as exc:
            assert exc.code in REFUSALS, (path, exc)
            refused += 1
        else:
            allowed += 1
            names = {e.name for e in entries}
            if tree.escaped(resolved.path) or tree.sentinel in names or "SECRET" in names:
                escapes += 1
            if any(tree.escaped(e.path) for e in entries):
                escapes += 1
    print(f"\ntraversal battery (jail): {attempts} attempts, {refused} refused, "
          f"{allowed} allowed inside the root, {escapes} escapes")
    assert escapes == 0
    assert attempts >= 500


def test_every_escape_suffix_is_refused(tree: HostTree) -> None:
    """Not just "not outside": each of these is refused outright."""
    policy = build_policy(mount_roots=[tree.root], host_roots=[tree.root])
    for suffix in ESCAPE_SUFFIXES:
        with pytest.raises(RuntimeFailure) as refused:
            policy.resolve_mount(Mount(host_path=f"{tree.root}/{suffix}", container_path="/data"))
        assert refused.value.code in REFUSALS
    # and what stays inside works
    assert policy.resolve_mount(Mount(f"{tree.root}/inside", "/data")).host_path == f"{tree.root}/sub"
    assert policy.resolve_mount(Mount(f"{tree.root}/sub/../inside/inner.txt", "/d")).host_path == (
        f"{tree.root}/sub/inner.txt"
    )


def test_a_symlink_swapped_during_resolution_never_escapes(tree: HostTree) -> None:
    """A directory flipped between itself and a symlink out while resolutions run."""
    policy = build_policy(mount_roots=[tree.root], host_roots=[tree.root])
    flip = os.path.join(tree.root, "flip")
    os.mkdir(flip)
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            with _suppress():
                os.rename(flip, flip + ".dir")
                os.symlink(tree.outside, flip)
            with _suppress():
                os.unlink(flip)
                os.rename(flip + ".dir", flip)

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    attempts = escapes = 0
    try:
        for _ in range(300):
            for path in (flip, f"{flip}/SECRET", f"{flip}/{tree.sentinel}"):
                attempts += 1
                try:
                    resolved, entries, _ = policy.browse.list_directory(path)
                except RuntimeError_:
                    pass
                else:
                    if tree.escaped(resolved.path) or any(e.name == "SECRET" for e in entries):
                        escapes += 1
                attempts += 1
                try:
                    mount = policy.resolve_mount(Mount(host_path=path, container_path="/data"))
                except RuntimeError_:
                    pass
                else:
                    escapes += tree.escaped(mount.host_path)
    finally:
        stop.set()
        thread.join()
    print(f"\ntraversal battery (swap): {attempts} attempts, {escapes} escapes")
    assert escapes == 0


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


# ---------------------------------------------------------------- file copy


@pytest.fixture
def host_secret() -> Iterator[tuple[str, bytes]]:
    """A root-only directory on the host with a secret in it: what a copy must not reach."""
    directory = tempfile.mkdtemp(prefix="berthd-secret-", dir="/var/tmp")
    os.chmod(directory, 0o700)
    secret = uuid.uuid4().hex.encode()
    Path(directory, "SECRET").write_bytes(secret)
    try:
        yield directory, secret
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["local", "docker"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[tuple[Runtime, str]]:
    node = f"sec-{uuid.uuid4().hex[:6]}"
    root = ""
    runtime: Runtime
    if request.param == "local":
        if shutil.which("bwrap") is None:
            missing("bubblewrap", "`bwrap` is not on PATH (apt-get install bubblewrap)")
        root = tempfile.mkdtemp(prefix="berthd-sec-local-", dir="/tmp")
        os.chmod(root, 0o711)
        runtime = LocalRuntime(root, node, use_bwrap=True)
        image = "host"
    else:
        client: Any = request.getfixturevalue("docker_client")
        root = tempfile.mkdtemp(prefix="berthd-sec-docker-")
        runtime = DockerRuntime(node, client=client, berth_root=root)
        image = BUSYBOX_IMAGE
    berth_id = uuid.uuid4().hex[:12]
    runtime.create(ContainerSpec(berth_id=berth_id, node_id=node, image=image, command=("sleep", "300")))
    runtime.start(berth_id)
    try:
        yield runtime, berth_id
    finally:
        for status in runtime.list_managed(node):
            runtime.remove(status.berth_id, force=True)
        runtime.close()
        shutil.rmtree(root, ignore_errors=True)


def _plant(runtime: Runtime, berth_id: str, secret_dir: str) -> None:
    """Symlinks inside the sandbox, planted by the sandbox itself, pointing everywhere."""
    links = {
        "l_root": "/", "l_etc": "/etc", "l_secret": f"{secret_dir}/SECRET", "l_secretdir": secret_dir,
        "ch1": "/tmp/ch2", "ch2": "/tmp/l_secret", "l_up": "..", "l_proc": "/proc/1/root",
    }
    script = "; ".join(f"ln -sfn {target} /tmp/{name}" for name, target in links.items())
    script += "; mkdir -p /tmp/real; ln -sfn /tmp/l_secretdir /tmp/real/deep"
    done = runtime.exec(berth_id, ExecSpec(command=("sh", "-c", script)))
    assert done.exit_code == 0, done


def _host_untouched(secret_dir: str, secret: bytes) -> bool:
    return Path(secret_dir, "SECRET").read_bytes() == secret and os.listdir(secret_dir) == ["SECRET"]


def test_file_copy_battery(sandbox: tuple[Runtime, str], host_secret: tuple[str, bytes]) -> None:
    runtime, berth_id = sandbox
    secret_dir, secret = host_secret
    shadow = Path("/etc/shadow").read_bytes() if os.access("/etc/shadow", os.R_OK) else None
    names = ("l_root", "l_etc", "l_secret", "l_secretdir", "ch1", "ch2", "l_up", "l_proc", "real/deep")
    tails = ("", "/SECRET", "/etc/shadow", "/etc/passwd", f"{secret_dir}/SECRET", "/../SECRET")
    gets = [f"/tmp/{n}{t}" for n in names for t in tails]
    gets += [f"/tmp/../{secret_dir}/SECRET", "/tmp/../etc/shadow", "/workspace/../../etc/shadow",
             f"/tmp/./../..{secret_dir}/SECRET", f"{secret_dir}/SECRET", "/etc/shadow"]
    puts = [f"/tmp/{n}{t}" for n in names for t in ("", "/pwned", "/SECRET", f"{secret_dir}/pwned")]
    attempts = escapes = 0
    _plant(runtime, berth_id, secret_dir)
    for path in gets:
        attempts += 1
        try:
            data = runtime.get_file(berth_id, path)
        except RuntimeError_:
            continue
        if secret in data or (shadow is not None and data == shadow):
            escapes += 1
    for path in puts:
        _plant(runtime, berth_id, secret_dir)  # a put may have replaced the link itself
        attempts += 1
        try:
            runtime.put_file(berth_id, path, b"pwned")
        except RuntimeError_:
            pass
        if not _host_untouched(secret_dir, secret):
            escapes += 1
    # a symlink swapped back and forth while the copies run
    swap = (f"while :; do rm -rf /tmp/swap; mkdir /tmp/swap; rm -rf /tmp/swap; "
            f"ln -s {secret_dir} /tmp/swap; done")
    flipping = threading.Thread(
        target=lambda: runtime.exec(berth_id, ExecSpec(command=("sh", "-c", swap), timeout=8)),
        daemon=True,
    )
    flipping.start()
    for _ in range(60):
        for path in ("/tmp/swap/SECRET", "/tmp/swap/pwned"):
            attempts += 1
            try:
                if path.endswith("SECRET"):
                    escapes += secret in runtime.get_file(berth_id, path)
                else:
                    runtime.put_file(berth_id, path, b"pwned")
            except RuntimeError_:
                pass
            if not _host_untouched(secret_dir, secret):
                escapes += 1
    flipping.join(timeout=15)
    print(f"\ntraversal battery (file copy, {runtime.name}): {attempts} attempts, {escapes} escapes")
    assert escapes == 0
    assert attempts >= 150
