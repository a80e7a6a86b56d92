"""``Idempotency-Key`` on POST: a retry replays the first answer instead of acting twice.

Keys are scoped per principal (two keys may use the same Idempotency-Key) and kept
``ttl`` seconds (24 h by default). A request's fingerprint is the SHA-256 of its method,
path, query and body:

- unknown key: the request runs; its answer (status, body, Content-Type, ETag, Location)
  is kept; a 5xx, a 429 or a 403 ``QUOTA_EXCEEDED`` is not kept (those are worth retrying)
  and frees the key;
- same key, same fingerprint, answered: the first answer again, with
  ``Idempotent-Replayed: true``;
- same key, another fingerprint: 422 ``IDEMPOTENCY_KEY_REUSED``;
- same key while the first request still runs: 409 ``IDEMPOTENCY_IN_PROGRESS``.

Where the answers live: a SQLite table in its own file in the data dir
(``idempotency.db``, 0600), not the event log. The log already records every effect with
its principal and correlation id; what is kept here is a cache of *responses* — up to
the output caps per exec — that must expire after the TTL, and an append-only log can
neither hold bulky bodies cheaply (every replay and projection would read them) nor
forget them. The file is written in WAL mode and each answer is committed before it is
sent, so a replay works after a restart or a crash of the daemon. A request still
running when the daemon died never answered: its row is dropped at start, and a retry
runs it again. With a PostgreSQL log the table stays node-local (a retry goes to the same
node). ``POST /v1/keys`` answers are kept too — the secret is in them, in a 0600 file of
the 0700 data dir, like ``admin.key`` — because a lost answer without its secret would
be useless to the client.

When the file cannot be written (disk full, I/O error, locked past the timeout) a request
with an ``Idempotency-Key`` answers 503 ``STORE_UNAVAILABLE``, as the event log does, and
runs nothing; no row is left behind. If only the final record of an answer fails (the
request ran), that answer is still sent and the key is freed: it is not replayable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import falcon
import msgspec

from berthd.domain.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    StoreUnavailable,
    ValidationError,
)
from berthd.http.auth import Principal
from berthd.http.wire import read_body

__all__ = ["Answer", "IdempotencyMiddleware", "IdempotencyStore", "InProgress", "Mismatch", "Started",
           "HEADER", "REPLAYED_HEADER"]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_KEPT_HEADERS = ("Content-Type", "ETag", "Location")
_STORE_ERRORS = (sqlite3.Error, OSError)
"""What a failing store raises: sqlite3's "database or disk is full", "disk I/O error",
"database is locked" (all OperationalError), and the file system's own errors."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Started:
    """The key was free: run the request, then ``finish`` or ``abandon``."""


@dataclass(frozen=True, slots=True)
class InProgress:
    """The first request with this key has not answered yet."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used for another request."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL,
    status INTEGER,            -- NULL while the first request runs
    headers TEXT,
    body BLOB,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created);
"""


class IdempotencyStore:
    """The answers by (principal, key), in a SQLite file; safe to share between threads."""

    def __init__(self, path: str, clock: Callable[[], datetime], ttl: float = 86400.0) -> None:
        self.clock = clock
        self.ttl = ttl
        fresh = path != ":memory:" and not os.path.exists(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if fresh:
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._unfinished: set[tuple[str, str]] = set()  # rows still "running" whose delete failed
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a process crash
            self._db.executescript(_SCHEMA)
            # requests that were running when the daemon stopped never answered: free their keys
            self._db.execute("DELETE FROM idempotency WHERE status IS NULL")
        self.purge()

    def _now(self) -> float:
        return self.clock().timestamp()

    def begin(self, scope: str, key: str, fingerprint: str) -> Started | InProgress | Mismatch | Answer:
        """Raises ``StoreUnavailable`` when the file cannot be read or written (nothing kept)."""
        now = self._now()
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT fingerprint, created, status, headers, body FROM idempotency WHERE scope=? AND key=?",
                    (scope, key)).fetchone()
                if row is not None and (row[1] < now - self.ttl or (scope, key) in self._unfinished):
                    # expired, or a row whose request's end could not be recorded: the key is free
                    self._db.execute("DELETE FROM idempotency WHERE scope=? AND key=?", (scope, key))
                    row = None
                self._unfinished.discard((scope, key))
                if row is None:
                    self._db.execute("INSERT INTO idempotency (scope, key, fingerprint, created) VALUES (?, ?, ?, ?)",
                                     (scope, key, fingerprint, now))
                    return Started()
            except _STORE_ERRORS as exc:
                raise _unavailable(exc) from exc
        stored_fingerprint, _, status, headers, body = row
        if stored_fingerprint != fingerprint:
            return Mismatch()
        if status is None:
            return InProgress()
        return Answer(int(status), msgspec.json.decode(headers, type=dict[str, str]), bytes(body))

    def finish(self, scope: str, key: str, answer: Answer) -> bool:
        """Keep the answer; False when it could not be written (the key is then freed)."""
        with self._lock:
            try:
                self._db.execute("UPDATE idempotency SET status=?, headers=?, body=? WHERE scope=? AND key=?",
                                 (answer.status, msgspec.json.encode(answer.headers), answer.body, scope, key))
                return True
            except _STORE_ERRORS as exc:
                log.warning("idempotency store: cannot keep the answer for key %r: %s", key, exc)
                self._forget(scope, key)
                return False

    def abandon(self, scope: str, key: str) -> None:
        """Free the key. Never raises: a row that cannot be deleted now is treated as free
        (and deleted by the next ``begin`` with that key, or at the next start)."""
        with self._lock:
            self._forget(scope, key)

    def _forget(self, scope: str, key: str) -> None:
        try:
            self._db.execute("DELETE FROM idempotency WHERE scope=? AND key=?", (scope, key))
            self._unfinished.discard((scope, key))
        except _STORE_ERRORS as exc:
            log.warning("idempotency store: cannot free key %r now: %s", key, exc)
            self._unfinished.add((scope, key))

    def purge(self) -> int:
        """Forget keys older than the TTL; returns how many (0 when the file cannot be written
        now: the next purge tries again)."""
        with self._lock:
            try:
                return self._db.execute("DELETE FROM idempotency WHERE created < ?",
                                        (self._now() - self.ttl,)).rowcount
            except _STORE_ERRORS as exc:
                log.warning("idempotency store: cannot purge expired keys: %s", exc)
                return 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"the idempotency store cannot be written: {exc}; retry later")


def fingerprint_of(req: falcon.Request, body: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{req.method} {req.path}?{req.query_string}\n".encode())
    h.update(body)
    return h.hexdigest()


class IdempotencyMiddleware:
    """Replays, refuses or records POSTs that carry ``Idempotency-Key`` (after auth and
    rate limits: a replay costs a token like any request)."""

    def __init__(self, store: IdempotencyStore, max_body_bytes: int) -> None:
        self.store = store
        self.max_body_bytes = max_body_bytes
        self._purge_every = 1000
        self._count = 0

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         params: dict[str, Any]) -> None:
        if req.method != "POST":
            return
        key = req.get_header(HEADER)
        principal: Principal | None = req.context.get("principal")
        if key is None or principal is None:
            return
        if not _KEY.match(key):
            raise ValidationError("Idempotency-Key must be 1 to 255 visible ASCII characters", field=HEADER)
        body = read_body(req, self.max_body_bytes)
        req.context.raw_body = body  # the resource decodes the same bytes
        scope = principal.key_id
        found = self.store.begin(scope, key, fingerprint_of(req, body))
        if isinstance(found, Mismatch):
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for another request (method, path or body differ); "
                "use a new key for a new request", key=key)
        if isinstance(found, InProgress):
            raise IdempotencyInProgress(
                "the first request with this Idempotency-Key is still running; retry later to get its answer",
                key=key)
        if isinstance(found, Answer):
            resp.status = found.status
            for name, value in found.headers.items():
                resp.set_header(name, value)
            resp.set_header(REPLAYED_HEADER, "true")
            resp.data = found.body
            resp.complete = True
            return
        req.context.idempotency = (scope, key)
        self._count += 1
        if self._count % self._purge_every == 0:
            self.store.purge()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        held: tuple[str, str] | None = req.context.get("idempotency")
        if held is None:
            return
        req.context.idempotency = None
        status = int(falcon.code_to_http_status(resp.status)[:3])
        if status >= 500 or status == 429 or req.context.get("quota_refused"):
            self.store.abandon(*held)
            return
        body = resp.render_body() or b""
        headers = {name: value for name in _KEPT_HEADERS if (value := resp.get_header(name)) is not None}
        self.store.finish(*held, Answer(status, headers, body))
