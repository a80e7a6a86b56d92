"""Safe retries through a real daemon on loopback: Idempotency-Key replays the first
answer (also after a restart), refuses another body (422) and a retry while the first
runs (409); ETag on GET and If-Match on mutations (412)."""

from __future__ import annotations

import pathlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.daemon_process import DaemonProcess

BOX = {"image": "host", "command": ["sleep", "300"]}


def post(d: DaemonProcess, path: str, body: Any, key: str | None = None, **headers: str) -> requests.Response:
    extra = {"Idempotency-Key": key} if key else {}
    return requests.post(d.url(path), json=body, headers={**d.headers, **extra, **headers}, timeout=120)


def test_replay_mismatch_and_restart(tmp_path: pathlib.Path) -> None:
    d = DaemonProcess(tmp_path / "data", runtime="local").start()
    try:
        first = post(d, "/v1/containers", {**BOX, "name": "idem-box"}, "create-1")
        assert first.status_code == 201, first.text
        again = post(d, "/v1/containers", {**BOX, "name": "idem-box"}, "create-1")
        assert again.status_code == 201 and again.content == first.content
        assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
        other = post(d, "/v1/containers", {**BOX, "name": "another-box"}, "create-1")
        assert other.status_code == 422 and other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        elsewhere = post(d, "/v1/sessions", {**BOX, "name": "idem-box"}, "create-1")
        assert elsewhere.status_code == 422  # the same key on another endpoint is another request
        # a refusal is an answer too, replayed as it was
        bad = post(d, "/v1/containers", {"image": "host", "colour": "red"}, "bad-1")
        assert bad.status_code == 400
        assert post(d, "/v1/containers", {"image": "host", "colour": "red"}, "bad-1").content == bad.content
        # keys are per principal: another key's same Idempotency-Key is its own
        user = d.post("/v1/keys", {"name": "idem-user"}).json()["key"]
        theirs = requests.post(d.url("/v1/containers"), json={**BOX, "name": "user-box"}, timeout=60,
                               headers={"Authorization": f"Bearer {user}", "Idempotency-Key": "create-1"})
        assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
        # the secret of a key is replayed too: a lost answer would be useless without it
        k1 = post(d, "/v1/keys", {"name": "replayed-key"}, "key-1")
        assert post(d, "/v1/keys", {"name": "replayed-key"}, "key-1").json()["key"] == k1.json()["key"]

        head = d.get("/v1/events", params={"entity": first.json()["id"]}).json()["items"]
        d.stop()
        d.start()
        after = post(d, "/v1/containers", {**BOX, "name": "idem-box"}, "create-1")
        assert after.status_code == 201 and after.content == first.content
        assert after.headers["Idempotent-Replayed"] == "true"
        assert post(d, "/v1/containers", {**BOX, "name": "x"}, "create-1").status_code == 422
        # nothing ran twice: one container, and no event beyond what the restart itself observed
        named = [c for c in d.get("/v1/containers").json()["items"] if c["name"] == "idem-box"]
        assert len(named) == 1
        creates = [e for e in d.get("/v1/events", params={"entity": first.json()["id"]}).json()["items"]
                   if e["type"] == "ContainerCreateRequested"]
        assert len(creates) == 1 and len(head) >= 1
        # and after a SIGKILL: each answer was committed before it was sent
        exec_first = post(d, f"/v1/containers/{first.json()['id']}/exec", {"command": ["date", "+%s%N"]}, "exec-9")
        assert exec_first.status_code == 200, exec_first.text
        d.kill()
        d.start()
        exec_again = post(d, f"/v1/containers/{first.json()['id']}/exec", {"command": ["date", "+%s%N"]}, "exec-9")
        assert exec_again.content == exec_first.content and exec_again.headers["Idempotent-Replayed"] == "true"
        bad_key = post(d, "/v1/containers", BOX, "has space")
        assert bad_key.status_code == 400 and bad_key.json()["error"]["details"]["field"] == "Idempotency-Key"
    finally:
        d.stop()


def test_a_retry_while_the_first_runs_is_409(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    box = d.post("/v1/containers", BOX).json()
    body = {"command": ["sh", "-c", "sleep 2; echo done"]}
    # two at once: whichever arrives first runs (2 s), the other finds it still running
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(d, f"/v1/containers/{box['id']}/exec", body, "exec-1"), range(2)))
    answers.sort(key=lambda r: r.status_code)
    ran, refused = answers
    assert ran.status_code == 200 and ran.json()["stdout"] == "done\n"
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS"
    replay = post(d, f"/v1/containers/{box['id']}/exec", body, "exec-1")
    assert replay.status_code == 200 and replay.json()["exec_id"] == ran.json()["exec_id"]
    d.delete(f"/v1/containers/{box['id']}", params={"force": "true"})


def test_etag_and_if_match(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    box = d.post("/v1/containers", BOX).json()
    cid = box["id"]
    etag = d.get(f"/v1/containers/{cid}").headers["ETag"]
    assert etag == f'"{box["version"]}"'
    stale = post(d, f"/v1/containers/{cid}/stop", {"timeout": 1}, None, **{"If-Match": '"1"'})
    assert stale.status_code == 412 and stale.json()["error"]["code"] == "PRECONDITION_FAILED"
    assert stale.json()["error"]["details"]["etag"] == etag
    stopped = post(d, f"/v1/containers/{cid}/stop", {"timeout": 1}, None, **{"If-Match": etag})
    assert stopped.status_code == 200 and stopped.json()["status"] == "exited"
    gone = requests.delete(d.url(f"/v1/containers/{cid}"), headers={**d.headers, "If-Match": etag}, timeout=60)
    assert gone.status_code == 412  # the stop moved the version on
    assert requests.delete(d.url(f"/v1/containers/{cid}"), timeout=60,
                           headers={**d.headers, "If-Match": d.get(f"/v1/containers/{cid}").headers["ETag"]}
                           ).status_code == 200

    kernel = d.post("/v1/kernels", {"language": "bash", "image": "host"}).json()
    k_etag = d.get(f"/v1/kernels/{kernel['id']}").headers["ETag"]
    assert post(d, f"/v1/kernels/{kernel['id']}/execute", {"code": "echo 1"}, None,
                **{"If-Match": '"999"'}).status_code == 412
    assert post(d, f"/v1/kernels/{kernel['id']}/execute", {"code": "echo 1"}, None,
                **{"If-Match": k_etag}).status_code == 200
    assert requests.delete(d.url(f"/v1/kernels/{kernel['id']}"), timeout=60,
                           headers={**d.headers, "If-Match": k_etag}).status_code == 412
    assert requests.delete(d.url(f"/v1/kernels/{kernel['id']}"), timeout=60,
                           headers={**d.headers, "If-Match": "*"}).status_code == 200

    session = d.post("/v1/sessions", {"language": "bash"}).json()
    s_etag = d.get(f"/v1/sessions/{session['id']}").headers["ETag"]
    assert requests.delete(d.url(f"/v1/sessions/{session['id']}"), timeout=60,
                           headers={**d.headers, "If-Match": 'W/"0"'}).status_code == 412
    assert requests.delete(d.url(f"/v1/sessions/{session['id']}"), timeout=60,
                           headers={**d.headers, "If-Match": s_etag}).status_code == 200
    # someone else's entity: 404 as ever, never 412 (existence does not leak)
    user = d.post("/v1/keys", {"name": "etag-user"}).json()["key"]
    other = requests.post(d.url(f"/v1/containers/{cid}/start"), json={}, timeout=60,
                          headers={"Authorization": f"Bearer {user}", "If-Match": '"1"'})
    assert other.status_code == 404
