"""Fuzzing: schemathesis against the live daemon's own /openapi.json → no server error.

Every operation the schema lists is called with generated valid and invalid input
(schemathesis' coverage, fuzzing and stateful phases); any 5xx answer is a failure. The
admin run must reach ``BERTHD_FUZZ_CASES`` generated cases (5,000 by default, as the issue
asks); a second, smaller run with a ``user`` key (``BERTHD_FUZZ_USER_CASES``, 1,500 by
default) goes through the role checks and the paths a user is refused or scoped on.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
import requests

from tests.daemon_process import DaemonProcess


def _max_examples(cases: int) -> int:
    """Examples per operation and phase: ~4,300 cases came from 75 with 39 operations."""
    return max(10, -(-cases // 50))


CASES = int(os.environ.get("BERTHD_FUZZ_CASES", "5000"))
MAX_EXAMPLES = _max_examples(CASES)
USER_CASES = int(os.environ.get("BERTHD_FUZZ_USER_CASES", "1500"))
USER_MAX_EXAMPLES = _max_examples(USER_CASES)


def _schemathesis() -> str:
    exe = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if exe is None:
        pytest.fail("schemathesis is a test dependency (pip install -e '.[test]')", pytrace=False)
    return exe


def _clean_up(d: DaemonProcess) -> None:
    """Fuzzing leaves sandboxes behind; local sandboxes outlive the daemon, so remove them."""
    s = d.session()
    for kind, query in (("sessions", ""), ("kernels", ""), ("containers", "?force=true")):
        body = s.get(d.url(f"/v1/{kind}?limit=1000"), timeout=30).json()
        items = body if isinstance(body, list) else next(v for v in body.values() if isinstance(v, list))
        for item in items:
            s.delete(d.url(f"/v1/{kind}/{item['id']}{query}"), timeout=60)


def _fuzz(d: DaemonProcess, key: str, cases: int, max_examples: int, label: str,
          figures: Callable[[str], None], cwd: pathlib.Path) -> None:
    """Run schemathesis with ``key`` against ``d``, clean up with the admin key, report the
    figures, and assert no server error and at least ``cases`` generated cases."""
    cmd = [_schemathesis(), "run", d.url("/openapi.json"), "--checks", "not_a_server_error",
           "--max-examples", str(max_examples), "--workers", "2", "--request-timeout", "30",
           "--max-failures", "50", "-H", f"Authorization: Bearer {key}",
           "--suppress-health-check", "all", "--no-color"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd,
                             env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    finally:
        try:
            _clean_up(d)
        except requests.RequestException:
            pass
    out = run.stdout + run.stderr
    generated = re.search(r"(\d+) generated", out)
    seed = re.search(r"Seed: (\d+)", out)
    passed = re.search(r"(\d+) generated, (\d+) passed", out)
    figures(f"schemathesis ({label} key): {generated.group(1) if generated else '?'} cases generated, "
            f"{passed.group(2) if passed else '?'} passed, seed {seed.group(1) if seed else '?'}")
    # A failure found (any 5xx) fails the test. schemathesis' own internal errors (seen once:
    # a SystemError inside its coverage generator) are reported, but do not fail it when
    # every generated case passed and there were enough of them.
    assert "Server error" not in out and "ST101" not in out, out[-20000:]
    assert passed and passed.group(1) == passed.group(2), out[-20000:]
    assert run.returncode == 0 or "Runtime Error" in out, out[-20000:]
    if run.returncode != 0:
        figures("schemathesis reported an internal error of its own (not a server answer): "
                + out[out.find("Runtime Error"):][:200].replace("\n", " "))
    assert generated and int(generated.group(1)) >= cases, f"only {generated and generated.group(1)} cases"


def test_schemathesis_finds_no_server_error(figures: Callable[[str], None], daemon_with: Callable[..., DaemonProcess],
                                            tmp_path: pathlib.Path) -> None:
    d = daemon_with("")
    _fuzz(d, d.key, CASES, MAX_EXAMPLES, "admin", figures, tmp_path)


def test_schemathesis_with_a_user_key_finds_no_server_error(
        figures: Callable[[str], None], daemon_with: Callable[..., DaemonProcess], tmp_path: pathlib.Path) -> None:
    d = daemon_with("")
    # budgets wide enough that the cases reach the handlers, not only the 429 of a spent bucket
    wide = {"general": 1_000_000, "executions": 1_000_000, "sessions": 1_000_000}
    r = d.post("/v1/keys", {"name": "fuzz-user", "role": "user", "rate_limits": wide})
    assert r.status_code == 201, r.text
    _fuzz(d, r.json()["key"], USER_CASES, USER_MAX_EXAMPLES, "user", figures, tmp_path)
