"""``If-Match`` on a real daemon (local runtime): concurrent mutations sent with the same
entity tag cannot all pass — the entity's actor checks the tag again when the command
arrives, after the read model's early check. Found in review: 6 concurrent execs with one
``If-Match`` all answered 200."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.daemon_process import DaemonProcess


def _concurrently(d: DaemonProcess, path: str, body: Any, etag: str, n: int) -> list[int]:
    def one(_i: int) -> int:
        r = requests.post(d.url(path), json=body, headers={**d.headers, "If-Match": etag}, timeout=120)
        assert r.status_code in (200, 412), r.text
        if r.status_code == 412:
            assert r.json()["error"]["code"] == "PRECONDITION_FAILED"
        return r.status_code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_container_execs_with_one_etag_pass_once(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    r = d.post("/v1/containers", {"image": "host", "command": ["sleep", "300"]})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    try:
        for _ in range(3):
            etag = d.get(f"/v1/containers/{cid}").headers["ETag"]
            codes = _concurrently(d, f"/v1/containers/{cid}/exec", {"command": ["sleep", "0.2"]}, etag, 6)
            assert sorted(codes) == [200] + [412] * 5, codes
    finally:
        d.delete(f"/v1/containers/{cid}?force=true")


def test_concurrent_kernel_executes_with_one_etag_pass_once(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    kid = d.post("/v1/kernels", {"image": "host"}).json()["id"]
    try:
        etag = d.get(f"/v1/kernels/{kid}").headers["ETag"]
        codes = _concurrently(d, f"/v1/kernels/{kid}/execute", {"code": "import time; time.sleep(0.2)"}, etag, 4)
        assert sorted(codes) == [200] + [412] * 3, codes
        # the tag is the kernel's alone: destroying with it also removes its sandbox (a
        # container with versions of its own) without a 412 from there
        view = d.get(f"/v1/kernels/{kid}")
        r = requests.delete(d.url(f"/v1/kernels/{kid}"), headers={**d.headers, "If-Match": view.headers["ETag"]},
                            timeout=120)
        assert r.status_code == 200 and r.json()["status"] == "destroyed", r.text
        assert d.get(f"/v1/containers/{view.json()['container_id']}").json()["status"] == "removed"
    finally:
        d.delete(f"/v1/kernels/{kid}")


def test_concurrent_session_executes_with_one_etag_pass_once(local_daemon: DaemonProcess) -> None:
    d = local_daemon
    sid = d.post("/v1/sessions", {"image": "host"}).json()["id"]
    try:
        assert d.post(f"/v1/sessions/{sid}/execute", {"code": "1"}).status_code == 200  # kernel opened
        etag = d.get(f"/v1/sessions/{sid}").headers["ETag"]
        codes = _concurrently(d, f"/v1/sessions/{sid}/execute", {"code": "import time; time.sleep(0.2)"}, etag, 4)
        assert sorted(codes) == [200] + [412] * 3, codes
    finally:
        d.delete(f"/v1/sessions/{sid}")
