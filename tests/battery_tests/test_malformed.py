"""Malformed input in every field: every path parameter, query parameter and JSON body
that the live daemon's /openapi.json lists gets traversal strings, huge numbers, unicode,
NUL bytes, wrong types and broken JSON. No answer may be a 5xx, every 4xx carries an
error code, and nothing refused may reach the log."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import requests

from tests.daemon_process import DaemonProcess

TRAVERSAL = ["../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc",
             "....//....//etc", "/etc/shadow", "..\\..\\windows", "%00", "a%00b", "~root/.ssh",
             "/var/run/docker.sock", "/proc/self/environ", "file:///etc/passwd"]
ODD = ["", " ", "-1", "0", "99999999999999999999999999", "1e309", "NaN", "true", "null", "[]", "{}",
       "ü" * 200, "\u202eevil", "😀", "%ff%fe", "%c0%af", "x" * 10000, "'; DROP TABLE events; --",
       "${jndi:ldap://127.0.0.1/a}", "{{7*7}}", "%0d%0aX-Injected: 1"]
VALUES = TRAVERSAL + ODD
BODIES: list[bytes] = [
    b"{", b"[]", b"null", b"\"str\"", b"1e999999", b"{\"a\": 1e309}", b"\xff\xfe\x00", b"{\"x\": \"\\ud800\"}",
    b"{" + b"\"a\":{" * 2000 + b"}" * 2001, b"{\"command\": [\"" + b"a" * 70000 + b"\"]}",
]
WRONG_TYPES: list[Any] = [None, True, -1, 2 ** 70, -(2 ** 70), 1.5e308, "../../etc/passwd", "\u0000",
                          [], {}, ["a", None], {"../../x": "y"}]


def _paths(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation; deletes last, so the test's container lives through the others."""
    ops = [(method.upper(), path, op) for path, item in spec["paths"].items()
           for method, op in item.items() if method in ("get", "post", "put", "delete", "patch")]
    return sorted(ops, key=lambda o: o[0] == "DELETE")


class Log:
    """The log head, read after every request: a refused request must not move it."""

    def __init__(self, d: DaemonProcess, s: requests.Session) -> None:
        self.d, self.s = d, s
        self.head = self.read()

    def read(self) -> int:
        return int(self.s.get(self.d.url("/v1/info"), timeout=30).json()["log_position"])

    def moved(self) -> bool:
        before, self.head = self.head, self.read()
        return self.head != before


def _check(r: requests.Response, what: str, bad: list[str], log: Log) -> None:
    if log.moved() and r.status_code >= 400:
        bad.append(f"{what}: refused with {r.status_code} but the log moved")
    if r.status_code >= 500:
        bad.append(f"{what}: {r.status_code} {r.text[:200]}")
    elif r.status_code >= 400:
        try:
            code = r.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if not code:
            bad.append(f"{what}: {r.status_code} without an error code: {r.text[:200]}")


def test_every_field_refuses_malformed_input_cleanly(daemon_with: Callable[..., DaemonProcess],
                                                     figures: Callable[[str], None]) -> None:
    d = daemon_with("")
    s = d.session()
    spec = s.get(d.url("/openapi.json"), timeout=30).json()
    # a real container so that "the id exists" paths get past the lookup
    cid = s.post(d.url("/v1/containers"), json={"image": "host", "command": ["sleep", "600"]},
                 timeout=60).json()["id"]
    log = Log(d, s)
    bad: list[str] = []
    cases = 0
    try:
        for method, path, op in _paths(spec):
            params = op.get("parameters", [])
            names = re.findall(r"{(\w+)}", path)
            filled = {n: cid for n in names}
            # every path parameter gets every bad value
            for name, value in itertools.product(names, VALUES):
                url = path.format(**{**filled, name: value.replace("/", "%2F") if "/" in value else value})
                r = s.request(method, d.url(url), data=b"{}" if method in ("POST", "PUT") else None, timeout=60)
                _check(r, f"{method} {url[:80]}", bad, log)
                cases += 1
            # every query parameter gets every bad value
            for p, value in itertools.product([p for p in params if p.get("in") == "query"], VALUES):
                r = s.request(method, d.url(path.format(**filled)), params={p["name"]: value},
                              data=b"{}" if method in ("POST", "PUT") else None, timeout=60)
                _check(r, f"{method} {path}?{p['name']}={value[:40]}", bad, log)
                cases += 1
            if method in ("POST", "PUT") and "requestBody" in op:
                for body in BODIES:
                    r = s.request(method, d.url(path.format(**filled)), data=body,
                                  headers={"Content-Type": "application/json"}, timeout=60)
                    _check(r, f"{method} {path} body {body[:40]!r}", bad, log)
                    cases += 1
                schema = op["requestBody"]["content"].get("application/json", {}).get("schema", {})
                if "$ref" in schema:
                    schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
                for field, wrong in itertools.product(schema.get("properties", {}), WRONG_TYPES):
                    r = s.request(method, d.url(path.format(**filled)), data=json.dumps({field: wrong}),
                                  headers={"Content-Type": "application/json"}, timeout=60)
                    _check(r, f"{method} {path} {{{field}: {str(wrong)[:30]}}}", bad, log)
                    cases += 1
        figures(f"malformed input: {cases} requests over {len(_paths(spec))} operations, "
              f"{len(bad)} bad answers")
        assert not bad, "\n".join(bad[:40])
    finally:
        s.delete(d.url(f"/v1/containers/{cid}?force=true"), timeout=60)
