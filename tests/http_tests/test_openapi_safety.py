"""The OpenAPI document says what the safety layer does: keys routes, Idempotency-Key,
If-Match and 412, ETag, 429 with Retry-After and the X-RateLimit-* headers, quota 403s."""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis

from berthd.http.openapi import build_openapi

SPEC = build_openapi("test")
OPS = [(path, method, op) for path, item in SPEC["paths"].items() for method, op in item.items()]


def _params(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in op.get("parameters", [])}


def test_the_document_loads_and_every_ref_resolves() -> None:
    schemathesis.openapi.from_dict(SPEC)  # parses as OpenAPI 3.1
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(SPEC)))
    assert refs <= set(SPEC["components"]["schemas"]), refs - set(SPEC["components"]["schemas"])


def test_keys_routes_and_shapes() -> None:
    keys, item = SPEC["paths"]["/v1/keys"], SPEC["paths"]["/v1/keys/{id}"]
    assert set(keys) == {"post", "get"} and set(item) == {"get", "delete"}
    created = SPEC["components"]["schemas"]["KeyCreatedView"]
    assert {"id", "name", "role", "rate_limit", "created_at", "key"} <= set(created["properties"])
    assert "key" not in SPEC["components"]["schemas"]["KeyView"]["properties"]
    body = SPEC["components"]["schemas"]["CreateApiKey"]
    assert body["properties"]["role"]["enum"] == ["admin", "user"] and body["required"] == ["name"]
    assert "403" in keys["post"]["responses"] and "404" in item["delete"]["responses"]


def test_every_post_takes_an_idempotency_key() -> None:
    for path, method, op in OPS:
        if method == "post":
            assert "Idempotency-Key" in _params(op), path
            assert {"409", "422"} <= set(op["responses"]), path


def test_versioned_entities_have_etag_and_if_match() -> None:
    for path in ("/v1/containers/{id}", "/v1/kernels/{id}", "/v1/sessions/{id}"):
        assert "ETag" in SPEC["paths"][path]["get"]["responses"]["200"]["headers"]
    for path, method, op in OPS:
        versioned = re.match(r"^/v1/(containers|kernels|sessions)/\{id\}", path)
        if versioned and method in ("post", "put", "delete"):
            assert "If-Match" in _params(op) and "412" in op["responses"], (path, method)
        else:
            assert "If-Match" not in _params(op), (path, method)


def test_rate_limits_and_quotas_are_documented() -> None:
    for path, _method, op in OPS:
        if op.get("security") == []:
            assert "429" not in op["responses"], path  # unauthenticated: never limited
            continue
        limited = op["responses"]["429"]
        assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
            limited["headers"]), path
        ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
        assert "X-RateLimit-Remaining" in ok["headers"], path
    for path in ("/v1/containers", "/v1/kernels", "/v1/sessions"):
        assert "403" in SPEC["paths"][path]["post"]["responses"]
    for code in ("RATE_LIMITED", "QUOTA_EXCEEDED", "PRECONDITION_FAILED", "IDEMPOTENCY_KEY_REUSED",
                 "IDEMPOTENCY_IN_PROGRESS", "KEY_NOT_FOUND"):
        assert code in SPEC["info"]["description"]
