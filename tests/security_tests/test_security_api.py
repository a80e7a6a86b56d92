"""Safe sandboxes through the API of a real daemon on loopback: profiles from the config,
mounts only under the mount roots, the host-directory browser jailed, the runtime's
client errors as 4xx with stable codes, and what is enforced stated in /v1/info."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import BUSYBOX_IMAGE
from tests.daemon_process import DaemonProcess
from tests.security_tests.traversal import ESCAPE_SUFFIXES, HostTree, payloads

CONFIG = """
mount_roots = ["{root}"]
host_roots = ["{root}"]

[profiles.wide]
network = true
pids = 512
memory_mb = 0

[profiles.unbounded]
cpus = 0
"""


@pytest.fixture(scope="module")
def tree() -> Iterator[HostTree]:
    base = tempfile.mkdtemp(prefix="berthd-api-roots-", dir="/tmp")
    try:
        yield HostTree.make(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _start(tmp_path_factory: pytest.TempPathFactory, tree: HostTree, runtime: str) -> DaemonProcess:
    home = pathlib.Path(tmp_path_factory.mktemp("berthd-sec"))
    config = home / "berthd.toml"
    config.write_text(CONFIG.format(root=tree.root))
    return DaemonProcess(home / "data", runtime=runtime, args=("--config", str(config))).start()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tree: HostTree) -> Iterator[DaemonProcess]:
    d = _start(tmp_path_factory, tree, "local")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def docker_daemon(
    tmp_path_factory: pytest.TempPathFactory, tree: HostTree, docker_client: object
) -> Iterator[DaemonProcess]:
    d = _start(tmp_path_factory, tree, "docker")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(params=["local", "docker"])
def any_daemon(request: pytest.FixtureRequest) -> tuple[DaemonProcess, str]:
    """The same test on both runtimes: the daemon and an image it runs."""
    if request.param == "local":
        return request.getfixturevalue("daemon"), "host"
    return request.getfixturevalue("docker_daemon"), BUSYBOX_IMAGE


def _error(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def _head(d: DaemonProcess) -> int:
    return d.get("/v1/info").json()["log_position"]


def _create(d: DaemonProcess, image: str = "host", **body: object) -> requests.Response:
    return d.post("/v1/containers", {"image": image, "command": ["sleep", "300"], **body})


def test_info_states_what_is_enforced(daemon: DaemonProcess, tree: HostTree) -> None:
    info = daemon.get("/v1/info").json()
    enforced = info["runtimes"]["local"]["enforced"]
    assert enforced["capabilities"].startswith("all dropped")
    assert enforced["cpus"].startswith(("CFS quota", "not enforced"))  # cgroups where the host has them
    security = info["security"]
    assert {"default", "networked", "restricted", "wide"} <= set(security["profiles"])
    assert security["profiles"]["default"] == {
        "name": "default", "network": False, "memory_mb": 1024, "cpus": 1.0, "pids": 256,
        "read_only_root": True, "tmp_size_mb": 256,
    }
    wide = security["profiles"]["wide"]
    assert (wide["network"], wide["pids"], wide["memory_mb"], wide["cpus"]) == (True, 512, None, 1.0)
    assert security["mount_roots"] == [tree.root] and security["host_roots"] == [tree.root]


def test_profile_is_checked_and_recorded(daemon: DaemonProcess) -> None:
    before = _head(daemon)
    r = _create(daemon, profile="no-such-profile")
    assert r.status_code == 400 and _error(r)["code"] == "VALIDATION_ERROR"
    assert _error(r)["details"]["field"] == "profile"
    r = _create(daemon, ports=[{"container_port": 18080}])
    assert r.status_code == 400 and _error(r)["details"]["field"] == "ports"
    assert _head(daemon) == before
    view = _create(daemon, profile="wide", start=False).json()
    assert view["profile"] == "wide"
    events = daemon.get("/v1/events", params={"entity": view["id"], "type": "ContainerCreateRequested"})
    assert [e["data"]["profile"] for e in events.json()["items"]] == ["wide"]
    daemon.delete(f"/v1/containers/{view['id']}?force=true")


def test_default_profile_inside_a_container(any_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, image = any_daemon
    view = _create(daemon, image).json()
    try:
        r = daemon.post(f"/v1/containers/{view['id']}/exec", {"command": [
            "sh", "-c", "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; tail -n +3 /proc/net/dev | wc -l; "
                        "echo x > /probe || echo read-only"]})
        out = r.json()["stdout"]
        assert "CapEff:\t0000000000000000" in out and "NoNewPrivs:\t1" in out
        assert out.splitlines()[2].strip() == "1"  # lo only
        assert out.splitlines()[-1] == "read-only"
    finally:
        daemon.delete(f"/v1/containers/{view['id']}?force=true")


def test_client_errors_from_the_runtime(any_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, image = any_daemon
    view = _create(daemon, image).json()
    cid = view["id"]
    try:
        r = daemon.get(f"/v1/containers/{cid}/files", params={"path": "/tmp/nothing-here"})
        assert (r.status_code, _error(r)["code"]) == (404, "PATH_NOT_FOUND")
        r = daemon.get(f"/v1/containers/{cid}/files", params={"path": "/tmp"})
        assert (r.status_code, _error(r)["code"]) == (400, "INVALID_PATH")
        r = requests.put(daemon.url(f"/v1/containers/{cid}/files"), params={"path": "/tmp/no/such/dir"},
                         data=b"x", headers=daemon.headers, timeout=30)
        assert (r.status_code, _error(r)["code"]) == (404, "PATH_NOT_FOUND")
        r = daemon.post(f"/v1/containers/{cid}/exec", {"command": ["pwd"], "workdir": "/tmp/not-there"})
        assert (r.status_code, _error(r)["code"]) == (400, "WORKDIR_NOT_FOUND")
        daemon.post(f"/v1/containers/{cid}/exec", {"command": ["ln", "-s", "/etc", "/tmp/etc-link"]})
        r = daemon.get(f"/v1/containers/{cid}/files", params={"path": "/tmp/etc-link/passwd"})
        if image == "host":
            assert (r.status_code, _error(r)["code"]) == (403, "PATH_FORBIDDEN")
        else:  # the engine resolves it inside the container: its own /etc/passwd
            assert r.status_code == 200 and b"root:" in r.content
        r = requests.put(daemon.url(f"/v1/containers/{cid}/files"), params={"path": "/etc/x"},
                         data=b"x", headers=daemon.headers, timeout=30)
        assert r.status_code in (400, 404), r.text  # read-only root (Docker); unreachable (local)
    finally:
        daemon.delete(f"/v1/containers/{cid}?force=true")


def test_mounts_under_the_roots_only(daemon: DaemonProcess, tree: HostTree) -> None:
    before = _head(daemon)
    refused = 0
    hostile = [f"{tree.root}/{s}" for s in ESCAPE_SUFFIXES]
    hostile += ["/etc", "/var/run/docker.sock", "/run", "/proc", "/", tree.outside, f"{tree.root}/../outside"]
    for path in hostile:
        r = _create(daemon, mounts=[{"host_path": path, "container_path": "/data"}])
        assert r.status_code in (400, 403, 404), (path, r.text)
        assert _error(r)["code"] in ("MOUNT_FORBIDDEN", "PATH_NOT_FOUND", "INVALID_PATH", "VALIDATION_ERROR")
        refused += 1
    assert _head(daemon) == before, "nothing is appended for a refused mount"
    print(f"\ntraversal battery (API mounts): {refused} attempts, {refused} refused, 0 escapes")
    r = _create(daemon, mounts=[{"host_path": f"{tree.root}/inside", "container_path": "/data"}])
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    try:
        out = daemon.post(f"/v1/containers/{cid}/exec", {"command": ["cat", "/data/inner.txt"]}).json()
        assert out["stdout"] == "inner\n"
        write = daemon.post(f"/v1/containers/{cid}/exec", {"command": ["sh", "-c", "echo x > /data/new"]}).json()
        assert write["exit_code"] != 0  # read-only unless mode rw
        assert not os.path.exists(os.path.join(tree.root, "sub", "new"))
    finally:
        daemon.delete(f"/v1/containers/{cid}?force=true")


def test_host_directories_are_jailed(daemon: DaemonProcess, tree: HostTree) -> None:
    r = daemon.post("/v1/host/directories", {})
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["path"] == tree.root and listing["parent"] is None
    assert [d["name"] for d in listing["directories"]] == ["sub"]
    assert {f["name"] for f in listing["files"]} >= {"to_outside", "dotdot", "inside"}
    assert all(f["type"] == "symlink" for f in listing["files"])
    sub = daemon.post("/v1/host/directories", {"path": f"{tree.root}/inside"}).json()
    assert sub["path"] == f"{tree.root}/sub" and sub["parent"] == tree.root
    assert [(f["name"], f["size"]) for f in sub["files"]] == [("inner.txt", 6)]
    attempts = escapes = 0
    for path in payloads(tree, 300):
        attempts += 1
        r = daemon.post("/v1/host/directories", {"path": path})
        if r.status_code == 200:
            body = r.json()
            names = {e["name"] for e in body["directories"] + body["files"]}
            if tree.escaped(body["path"]) or tree.sentinel in names or "SECRET" in names:
                escapes += 1
        else:
            assert r.status_code in (400, 403, 404), (path, r.text)
            assert _error(r)["code"] in ("PATH_FORBIDDEN", "PATH_NOT_FOUND", "INVALID_PATH", "VALIDATION_ERROR")
    print(f"\ntraversal battery (API host directories): {attempts} attempts, {escapes} escapes")
    assert escapes == 0
    r = daemon.post("/v1/host/directories", {"currentPath": "/"})
    assert r.status_code == 400 and _error(r)["details"]["field"] == "currentPath"


def test_kernels_work_under_the_default_profile(any_daemon: tuple[DaemonProcess, str]) -> None:
    daemon, image = any_daemon
    body = {"language": "python", "name": "k" + uuid.uuid4().hex[:8]}
    if image != "host":
        body["image"] = os.environ.get("BERTHD_TEST_PYTHON_IMAGE", "berthd-test/python:3.11")
    r = daemon.post("/v1/kernels", body)
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        out = daemon.post(f"/v1/kernels/{kid}/execute", {"code": "import os\nopen('/tmp/k','w').write('x')\n6*7"})
        assert out.status_code == 200, out.text
        assert out.json()["return_value"] == "42", out.json()
    finally:
        daemon.delete(f"/v1/kernels/{kid}")


def test_an_unknown_profile_is_refused_everywhere_before_the_log(daemon: DaemonProcess) -> None:
    before = _head(daemon)
    for path, body in (("/v1/kernels", {"language": "python", "profile": "nope"}),
                       ("/v1/sessions", {"profile": "nope"}),
                       ("/v1/run", {"command": ["true"], "profile": "nope"})):
        r = daemon.post(path, body)
        assert r.status_code == 400, (path, r.text)
        assert _error(r)["details"]["field"] == "profile"
    assert _head(daemon) == before


def test_host_directories_need_an_admin_key(daemon: DaemonProcess) -> None:
    r = daemon.post("/v1/keys", {"name": "u-" + uuid.uuid4().hex[:8], "role": "user"})
    assert r.status_code == 201, r.text
    user = {"Authorization": f"Bearer {r.json()['key']}"}
    r = requests.post(daemon.url("/v1/host/directories"), json={}, headers=user, timeout=30)
    assert (r.status_code, _error(r)["code"]) == (403, "FORBIDDEN")


def test_more_cpus_than_the_host_has_is_a_client_error(docker_daemon: DaemonProcess) -> None:
    # with a profile that sets no CPU ceiling the engine checks against the host: its
    # refusal is the client's (400 naming the field), not a runtime failure (502)
    r = _create(docker_daemon, BUSYBOX_IMAGE, profile="unbounded", limits={"cpus": (os.cpu_count() or 1) + 1})
    assert r.status_code == 400, r.text
    assert (_error(r)["code"], _error(r)["details"].get("field")) == ("VALIDATION_ERROR", "limits.cpus")
