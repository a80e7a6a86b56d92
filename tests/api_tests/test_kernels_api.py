"""Kernels through the HTTP and WebSocket APIs, with a real daemon on the local runtime and
on Docker: executions, timeouts, interrupt, restart, results by id, streaming and
re-attach, a dead kernel, destroy, and kernel state surviving a SIGKILL of the daemon."""

from __future__ import annotations

import json
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from berthd.daemon.config import load_config
from berthd.daemon.lifecycle import Daemon
from tests.daemon_process import DaemonProcess

PYTHON_IMAGE = "berthd-test/python:3.11"
IMAGES = {"local": "host", "docker": PYTHON_IMAGE}

# code that leaves a grandchild running until the timeout: the whole tree must go
TREE = ("import subprocess, time\n"
        "p = subprocess.Popen(['python3', '-c', 'import time; time.sleep(300)'])\n"
        "time.sleep(120)\n")
SLEEPERS = ("import os\n"
            "n = 0\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        n += b'time.sleep(300)' in open(f'/proc/{pid}/cmdline', 'rb').read()\n"
            "    except (OSError, ValueError):\n"
            "        pass\n"
            "n\n")


def wait_for(fn: Any, timeout: float = 10.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


@pytest.fixture(scope="module", params=["local", "docker"])
def rt(request: pytest.FixtureRequest) -> tuple[DaemonProcess, str]:
    daemon: DaemonProcess = request.getfixturevalue(f"{request.param}_daemon")
    return daemon, request.param


@pytest.fixture(scope="module")
def kernel(rt: tuple[DaemonProcess, str]) -> Iterator[dict[str, Any]]:
    d, name = rt
    r = d.post("/v1/kernels", {"language": "python", "image": IMAGES[name]})
    assert r.status_code == 201, r.text
    view = r.json()
    yield view
    d.delete(f"/v1/kernels/{view['id']}")


def execute(d: DaemonProcess, kernel_id: str, code: str, **kw: Any) -> dict[str, Any]:
    r = d.post(f"/v1/kernels/{kernel_id}/execute", {"code": code, **kw})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ws_connect(d: DaemonProcess, kernel_id: str) -> ClientConnection:
    return connect(f"{d.ws}/v1/kernels/{kernel_id}/execute", additional_headers=d.headers, open_timeout=10)


def test_create_and_execute(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, name = rt
    assert kernel["status"] == "idle" and kernel["language"] == "python"
    assert set(kernel) >= {"id", "name", "language", "status", "container_id", "execution_count",
                           "created_at", "last_activity"}
    kid = kernel["id"]
    one = execute(d, kid, "1+1")
    assert one["status"] == "ok" and one["return_value"] == "2" and one["error"] is None
    assert set(one) >= {"status", "stdout", "stderr", "return_value", "execution_count", "duration_ms",
                        "truncated", "error", "result_id"}
    printed = execute(d, kid, "print('hello')\nimport sys; print('oops', file=sys.stderr)")
    assert printed["stdout"] == "hello\n" and printed["stderr"] == "oops\n" and printed["return_value"] is None
    assert printed["execution_count"] == one["execution_count"] + 1
    failed = execute(d, kid, "1/0")
    assert failed["status"] == "error" and failed["error"]["ename"] == "ZeroDivisionError"
    assert "ZeroDivisionError" in json.dumps(failed["error"]["traceback"])
    # results by id, from the log
    stored = d.get(f"/v1/results/{printed['result_id']}").json()
    assert stored["stdout"] == "hello\n" and stored["status"] == "ok" and stored["kernel_id"] == kid
    assert d.get(f"/v1/kernels/{kernel['name']}").json()["execution_count"] == failed["execution_count"]
    listed = d.get("/v1/kernels").json()
    assert kid in [k["id"] for k in listed["items"]]
    assert d.get("/v1/info").json()["counts"]["kernels"].get("idle", 0) >= 1
    # its sandbox is a container entity on the log
    box = d.get(f"/v1/containers/{kernel['container_id']}").json()
    assert box["status"] == "running" and box["runtime"] == name


def test_timeout_kills_the_tree_and_the_kernel_stays_usable(rt: tuple[DaemonProcess, str],
                                                            kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    execute(d, kid, "survivor = 'still here'")
    started = time.monotonic()
    r = execute(d, kid, TREE, timeout=1)
    assert r["status"] == "timeout"
    assert time.monotonic() - started < 10
    assert wait_for(lambda: execute(d, kid, SLEEPERS)["return_value"] == "0", 5), "a grandchild survived"
    assert execute(d, kid, "survivor")["return_value"] == "'still here'"


def test_interrupt(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(execute(d, kid, "import time\ntime.sleep(60)")))
    runner.start()
    assert wait_for(lambda: d.get(f"/v1/kernels/{kid}").json()["status"] == "busy")
    r = d.post(f"/v1/kernels/{kid}/interrupt")
    assert r.status_code == 200, r.text
    runner.join(15)
    assert out["status"] == "error" and out["error"]["ename"] == "KeyboardInterrupt"
    assert execute(d, kid, "2*21")["return_value"] == "42"


def test_interrupt_with_nothing_running_is_a_no_op(rt: tuple[DaemonProcess, str]) -> None:
    d, name = rt
    r = d.post("/v1/kernels", {"language": "python", "image": IMAGES[name]})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    try:
        # at once, while the kernel may still be starting, and again once it is idle
        first = d.post(f"/v1/kernels/{kid}/interrupt")
        assert first.status_code == 200 and first.json()["interrupted"] is None, first.text
        assert execute(d, kid, "1 + 1")["return_value"] == "2"
        again = d.post(f"/v1/kernels/{kid}/interrupt")
        assert again.status_code == 200 and again.json()["interrupted"] is None, again.text
    finally:
        d.delete(f"/v1/kernels/{kid}")


def test_concurrent_executes_queue(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    answers: dict[int, Any] = {}

    def send(i: int) -> None:
        answers[i] = d.post(f"/v1/kernels/{kid}/execute", {"code": f"import time\ntime.sleep(0.05)\n{i} + 1000"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 6
    for i, r in answers.items():  # never 409 busy: they wait their turn
        assert r.status_code == 200, r.text
        assert r.json()["return_value"] == str(i + 1000)
    assert len({r.json()["execution_count"] for r in answers.values()}) == 6  # one at a time


def test_ws_execute_waits_its_turn(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(execute(d, kid, "import time\ntime.sleep(0.5)\n'first'")))
    runner.start()
    assert wait_for(lambda: d.get(f"/v1/kernels/{kid}").json()["status"] == "busy")
    with ws_connect(d, kid) as ws:
        ws.send(json.dumps({"code": "print('second', flush=True)\n2"}))
        frames = [json.loads(m) for m in ws]
    runner.join(30)
    assert out["return_value"] == "'first'"
    assert frames[0]["type"] == "started" and frames[-1]["type"] == "result"
    assert frames[-1]["return_value"] == "2" and frames[-1]["result_id"] == frames[0]["result_id"]
    assert "".join(f["data"] for f in frames if f["type"] == "stdout") == "second\n"


def test_restart_clears_state(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    execute(d, kid, "forgotten = 1")
    r = d.post(f"/v1/kernels/{kid}/restart")
    assert r.status_code == 200 and r.json()["status"] == "idle" and r.json()["execution_count"] == 0
    after = execute(d, kid, "forgotten")
    assert after["status"] == "error" and after["error"]["ename"] == "NameError"
    assert after["execution_count"] == 1


def test_ws_streams_and_reattaches(rt: tuple[DaemonProcess, str], kernel: dict[str, Any]) -> None:
    d, _ = rt
    kid = kernel["id"]
    code = "import time\nfor i in range(6):\n    print(f'line {i}', flush=True)\n    time.sleep(0.15)\n'end'"
    with ws_connect(d, kid) as ws:
        ws.send(json.dumps({"code": code}))
        started = json.loads(ws.recv(10))
        assert started["type"] == "started"
        seen = ""
        while "line 0\n" not in seen:  # streamed while it runs (chunks may split a line)
            frame = json.loads(ws.recv(10))
            assert frame["type"] == "stdout", frame
            seen += frame["data"]
        assert "line 5" not in seen
        result_id = started["result_id"]
    # the client lost its socket mid-run: attach again from what it had, lose nothing
    with ws_connect(d, kid) as ws:
        ws.send(json.dumps({"attach": result_id, "offset": len(seen)}))
        frames = [json.loads(m) for m in ws]
    text = "".join(f["data"] for f in frames if f["type"] == "stdout")
    assert seen + text == "".join(f"line {i}\n" for i in range(6))
    assert frames[-1]["type"] == "result" and frames[-1]["return_value"] == "'end'"
    assert frames[-1]["result_id"] == result_id
    stored = wait_for(lambda: (s := d.get(f"/v1/results/{result_id}").json())["status"] == "ok" and s)
    assert stored["return_value"] == "'end'"


def test_attach_right_after_started_finds_the_execution(rt: tuple[DaemonProcess, str],
                                                         kernel: dict[str, Any]) -> None:
    # found in review: "started" went out before the intent was committed, and an attach
    # right after it answered RESULT_NOT_FOUND about 1 time in 30
    d, _ = rt
    for i in range(25):
        with ws_connect(d, kernel["id"]) as ws:
            ws.send(json.dumps({"code": f"import time\ntime.sleep(0.05)\n{i}"}))
            started = json.loads(ws.recv(10))
            assert started["type"] == "started"
        with ws_connect(d, kernel["id"]) as ws:
            ws.send(json.dumps({"attach": started["result_id"], "offset": 0}))
            frames = [json.loads(m) for m in ws]
        assert frames[-1]["type"] == "result" and frames[-1]["return_value"] == str(i), frames


def test_dead_kernel_is_never_a_success(rt: tuple[DaemonProcess, str]) -> None:
    d, name = rt
    kid = d.post("/v1/kernels", {"image": IMAGES[name]}).json()["id"]
    try:
        r = d.post(f"/v1/kernels/{kid}/execute", {"code": "import os\nprint('bye', flush=True)\nos._exit(3)"})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "KERNEL_DEAD"
        assert d.get(f"/v1/kernels/{kid}").json()["status"] == "dead"
        assert d.get(f"/v1/results/{err['details']['result_id']}").json()["status"] == "dead"
        again = d.post(f"/v1/kernels/{kid}/execute", {"code": "1"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "KERNEL_DEAD"
        assert d.post(f"/v1/kernels/{kid}/restart").json()["status"] == "idle"
        assert execute(d, kid, "3")["return_value"] == "3"
        types = [e["type"] for e in d.get(f"/v1/events?entity={kid}&limit=100").json()["items"]]
        assert "KernelDied" in types and types.count("ExecutionFinished") == 2
    finally:
        d.delete(f"/v1/kernels/{kid}")


def test_destroy_removes_the_sandbox(rt: tuple[DaemonProcess, str]) -> None:
    d, name = rt
    view = d.post("/v1/kernels", {"image": IMAGES[name], "name": f"doomed-{name}"}).json()
    assert execute(d, view["name"], "1")["return_value"] == "1"
    r = d.delete(f"/v1/kernels/{view['name']}")
    assert r.status_code == 200 and r.json()["status"] == "destroyed"
    assert d.get(f"/v1/containers/{view['container_id']}").json()["status"] == "removed"
    assert d.get(f"/v1/kernels/{view['id']}").json()["status"] == "destroyed"
    assert view["id"] not in [k["id"] for k in d.get("/v1/kernels").json()["items"]]
    gone = d.post(f"/v1/kernels/{view['id']}/execute", {"code": "1"})
    assert gone.status_code == 409


def test_destroy_during_an_execution_is_not_a_death(rt: tuple[DaemonProcess, str]) -> None:
    # found in review: the cut execution answered KERNEL_DEAD ("restart it") and the log
    # had a KernelDied for a kernel that was being destroyed
    d, name = rt
    kid = d.post("/v1/kernels", {"image": IMAGES[name]}).json()["id"]
    answers: list[Any] = []
    runner = threading.Thread(target=lambda: answers.append(
        d.post(f"/v1/kernels/{kid}/execute", {"code": "import time\nprint('on', flush=True)\ntime.sleep(60)"})))
    runner.start()
    assert wait_for(lambda: d.get(f"/v1/kernels/{kid}").json()["status"] == "busy")
    began = time.monotonic()
    r = d.delete(f"/v1/kernels/{kid}")
    assert r.status_code == 200 and r.json()["status"] == "destroyed", r.text
    runner.join(60)
    assert time.monotonic() - began < 8, "the execution waited for an agent that was shut down"
    assert len(answers) == 1 and answers[0].status_code == 409, answers and answers[0].text
    err = answers[0].json()["error"]
    assert err["code"] == "CONFLICT" and err["details"]["status"] == "destroyed"
    view = d.get(f"/v1/kernels/{kid}").json()
    assert view["status"] == "destroyed" and view["error"] is None
    stored = d.get(f"/v1/results/{err['details']['result_id']}").json()
    assert stored["status"] == "error" and stored["error"]["ename"] == "KernelDestroyed"
    types = [e["type"] for e in d.get(f"/v1/events?entity={kid}&limit=100").json()["items"]]
    assert "KernelDied" not in types and types[-1] == "KernelDestroyed", types


def test_refusals_append_nothing(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    before = d.get("/v1/info").json()["log_position"]
    bad = d.post("/v1/kernels", {"language": "ruby"})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "language"
    unknown = d.post("/v1/kernels", {"language": "python", "colour": "red"})
    assert unknown.status_code == 400
    missing = d.get("/v1/kernels/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "KERNEL_NOT_FOUND"
    assert d.post("/v1/kernels/nope/execute", {"code": "1"}).json()["error"]["code"] == "KERNEL_NOT_FOUND"
    result = d.get("/v1/results/nope")
    assert result.status_code == 404 and result.json()["error"]["code"] == "RESULT_NOT_FOUND"
    box = d.post("/v1/containers", {"image": "host", "command": ["sleep", "60"]}).json()
    assert d.post(f"/v1/containers/{box['id']}/stop", {"timeout": 1}).status_code == 200
    stopped_join = d.post("/v1/kernels", {"container": box["id"]})
    assert stopped_join.status_code == 409 and stopped_join.json()["error"]["details"]["field"] == "container"
    d.delete(f"/v1/containers/{box['id']}?force=true")
    # only the container's own events were appended
    events = d.get(f"/v1/events?after={before}&kind=kernel").json()["items"]
    assert events == []


def test_bash_kernel_keeps_cd_and_export(rt: tuple[DaemonProcess, str]) -> None:
    d, name = rt  # the Docker test image carries the host's bash (ops/test-images.sh)
    created = d.post("/v1/kernels", {"language": "bash", "image": IMAGES[name]})
    assert created.status_code == 201, created.text
    kid = created.json()["id"]
    try:
        assert execute(d, kid, "cd /tmp && export GREETING=hi")["status"] == "ok"
        r = execute(d, kid, "pwd; echo $GREETING")
        assert r["stdout"] == "/tmp\nhi\n" and r["return_value"] is None
        assert execute(d, kid, "(exit 3)")["exit_code"] == 3
        late = execute(d, kid, "sleep 60", timeout=1)
        assert late["status"] == "timeout"
        assert execute(d, kid, "echo $GREETING in $PWD")["stdout"] == "hi in /tmp\n"  # still the same shell
    finally:
        d.delete(f"/v1/kernels/{kid}")


@pytest.mark.parametrize("name", ["local", "docker"])
def test_kernel_in_an_existing_container(name: str, request: pytest.FixtureRequest) -> None:
    d: DaemonProcess = request.getfixturevalue(f"{name}_daemon")
    box = d.post("/v1/containers", {"image": IMAGES[name], "command": ["sleep", "300"]}).json()
    try:
        view = d.post("/v1/kernels", {"container": box["id"]})
        assert view.status_code == 201, view.text
        kid = view.json()["id"]
        assert view.json()["container_id"] == box["id"]
        assert execute(d, kid, "import os; os.path.isdir(os.environ['BERTH_DIR'])")["return_value"] == "True"
        # the agent runs as the container's other processes do
        who = d.post(f"/v1/containers/{box['id']}/exec", {"command": ["id", "-u"]}).json()
        assert execute(d, kid, "os.getuid()")["return_value"] == who["stdout"].strip()
        assert d.delete(f"/v1/kernels/{kid}").json()["status"] == "destroyed"
        assert d.get(f"/v1/containers/{box['id']}").json()["status"] == "running"  # not ours to remove
    finally:
        d.delete(f"/v1/containers/{box['id']}?force=true")


@pytest.mark.parametrize("name", ["local", "docker"])
def test_a_joined_kernel_survives_sigkill(name: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    if name == "docker":
        request.getfixturevalue("docker_client")
    d = DaemonProcess(tmp_path / "data", runtime=name).start()
    try:
        box = d.post("/v1/containers", {"image": IMAGES[name], "command": ["sleep", "300"]}).json()
        view = d.post("/v1/kernels", {"language": "python", "container": box["id"]})
        assert view.status_code == 201, view.text
        kid = view.json()["id"]
        assert execute(d, kid, "x = 41")["status"] == "ok"
        d.kill()
        d.start()
        assert execute(d, kid, "x + 1")["return_value"] == "42"
        # the kernel ends with its container
        assert d.delete(f"/v1/containers/{box['id']}?force=true").status_code == 200
        ended = wait_for(lambda: d.post(f"/v1/kernels/{kid}/execute", {"code": "x"}).json().get("status") != "ok", 20)
        assert ended
    finally:
        d.stop()


@pytest.mark.parametrize("name", ["local", "docker"])
def test_kernel_state_survives_sigkill(name: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    if name == "docker":
        request.getfixturevalue("docker_client")
    d = DaemonProcess(tmp_path / "data", runtime=name).start()
    try:
        kid = d.post("/v1/kernels", {"image": IMAGES[name]}).json()["id"]
        assert execute(d, kid, "x = 41")["status"] == "ok"
        # an execution in flight when the daemon dies is finished on the log afterwards
        with ws_connect(d, kid) as ws:
            ws.send(json.dumps({"code": "print('begun', flush=True)\nimport time\ntime.sleep(1.5)\nprint('done')\nx"}))
            result_id = json.loads(ws.recv(10))["result_id"]
            # kill only once the code really runs in the kernel: an execution the agent never
            # received is (rightly) recorded as not run
            while json.loads(ws.recv(10)).get("type") != "stdout":
                pass
            d.kill()
        d.start()
        stored = wait_for(lambda: (s := d.get(f"/v1/results/{result_id}").json()).get("status", "running") != "running" and s, 20)
        assert stored["status"] == "ok" and stored["stdout"] == "begun\ndone\n" and stored["return_value"] == "41", stored
        assert execute(d, kid, "x + 1")["return_value"] == "42"
        d.delete(f"/v1/kernels/{kid}")
    finally:
        d.stop()


def test_the_queue_depth_comes_from_the_config(tmp_path: pathlib.Path) -> None:
    """The wiring only: what a full queue answers is tested on the actors (QUEUE_FULL)."""
    config = tmp_path / "berthd.toml"
    config.write_text("queue_depth = 3\n")
    daemon = Daemon(load_config({"config": str(config), "data_dir": str(tmp_path / "data"),
                                 "listen": "127.0.0.1:0", "ws_listen": "127.0.0.1:0", "runtime": "local"},
                                env={}))
    daemon.start()
    try:
        assert daemon.deps is not None and daemon.deps.kernels is not None and daemon.deps.sessions is not None
        assert daemon.deps.kernels.queue_depth == 3 and daemon.deps.sessions.queue_depth == 3
    finally:
        daemon.stop()
