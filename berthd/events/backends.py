"""The three ``EventStore`` backends, over eventsourcing's application recorders.

- ``MemoryEventStore``: ``POPOApplicationRecorder``, for unit tests.
- ``SQLiteEventStore``: ``SQLiteApplicationRecorder`` on one file, WAL, and
  ``PRAGMA synchronous=FULL`` on every connection (an append is on disk when it returns).
- ``PostgresEventStore``: ``PostgresApplicationRecorder`` in a schema of its own.

``open_store(url, registry)`` picks one from a URL. Recorders are built directly with
explicit arguments, never through ``Application``/``InfrastructureFactory``, which would
read ``os.environ``.

Durable appends go through group commit on SQLite and PostgreSQL (``_group_commit``):
one writer thread per store takes the appends queued by every thread, writes them in one
transaction with one fsync, and acknowledges each caller after that commit. The memory
store appends on the caller's thread.

How the guarantees are kept:

- Versions. SQLite and PostgreSQL: the writer thread's transaction first excludes every
  other writer of the log, in this process or another (SQLite ``BEGIN IMMEDIATE``;
  PostgreSQL ``LOCK TABLE ... IN EXCLUSIVE MODE``, the recorder's own lock), then reads
  the current version of each stream in the batch. An append whose stream is not at its
  expected version (counting appends accepted earlier in the same batch) fails alone
  with ``ConcurrencyConflict``; the others are inserted, versions
  ``expected+1..expected+n``. The check and the insert share the exclusive transaction,
  so the check is exact; the primary key ``(originator_id, originator_version)`` stays a
  backstop: should it ever refuse an insert, the batch is rolled back and its appends
  are retried one transaction each, where a refusal is that append's conflict. Memory:
  the version is read, then the events inserted; the recorder refuses a version that
  exists, which catches anyone who got there in between (versions are contiguous and
  never deleted, so "version ``expected`` is the last" can only turn into "version
  ``expected+1`` exists").
- Positions are eventsourcing's notification ids. SQLite: the rowid, given out by the one
  writer SQLite allows at a time, so in commit order and without gaps. PostgreSQL: a
  ``bigserial`` drawn under the table lock, so ids are drawn and committed by one
  transaction at a time, and a follower can never see position n+1 before a late commit
  of n. A rolled-back insert burns its ids: positions there are strictly increasing but
  may have gaps. Within a batch, appends get their positions in the order they were
  queued. Memory: list index + 1.
- All or nothing: a batch is one transaction. A database failure rolls it back and every
  caller of the batch gets ``StoreUnavailable``; none of its events are in the log. On
  PostgreSQL a lost connection is retried on a fresh one only before the batch's
  ``COMMIT`` was sent; after that the outcome is unknown and is reported as
  ``StoreUnavailable`` (eventsourcing's blind retry of inserts, which could report our
  own success as a conflict, is bypassed).
- Wake-ups: every commit in this process notifies a ``threading.Condition`` before its
  callers return; waiters also re-read ``head()`` every ``poll_interval`` seconds
  (SQLite, PostgreSQL) to see appends by other processes, sharing one poll between all
  waiting threads. PostgreSQL adds a ``LISTEN`` on the recorder's ``NOTIFY`` channel
  (each batch sends one ``NOTIFY``), so cross-process wake-ups are immediate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
import psycopg_pool
from eventsourcing.domain import EventSourcingError
from eventsourcing.persistence import (
    ApplicationRecorder,
    IntegrityError,
    InterfaceError,
    Notification,
    StoredEvent,
)
from eventsourcing.popo import POPOApplicationRecorder
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
)
from psycopg.sql import SQL, Identifier

from berthd.events._group_commit import GroupCommitter, Outcome, PendingAppend, Release, plan
from berthd.events.codec import CorruptEvent, EventCodec
from berthd.events.store import (
    ConcurrencyConflict,
    EventStore,
    Recorded,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "MemoryEventStore",
    "PostgresEventStore",
    "RecorderEventStore",
    "SQLiteEventStore",
    "open_store",
]

log = logging.getLogger(__name__)

Registry = Mapping[str, type[Any]]


class _PositionedRecorder(Protocol):
    """What the shared store logic needs beyond ``ApplicationRecorder``: a stream read
    that returns notification ids (``select_events`` drops them), and the stream's
    current version."""

    def select_stream(self, originator_id: str, gt: int) -> Sequence[Notification]: ...

    def current_version(self, originator_id: str) -> int: ...


class RecorderEventStore(EventStore):
    """The ``EventStore`` logic shared by all backends; subclasses supply the recorder.

    ``poll_interval``: how often waiters re-read the head to notice appends made by other
    processes; ``None`` when no other process can append (memory).
    """

    #: Driver exceptions that may escape eventsourcing's own error translation.
    _driver_errors: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        recorder: ApplicationRecorder,
        codec: EventCodec,
        *,
        poll_interval: float | None,
    ) -> None:
        self._recorder = recorder
        self._positioned: _PositionedRecorder = recorder  # type: ignore[assignment]
        self._codec = codec
        self._poll_interval = poll_interval
        self._cond = threading.Condition()
        self._observed_head = 0  # highest position known to be committed
        self._next_poll = 0.0  # monotonic time of the next shared head poll
        self._poll_requested = True  # first waiter reads the real head
        self._closed = False
        # Set by backends that group-commit (SQLite, PostgreSQL); None: append in place.
        self._committer: GroupCommitter | None = None

    # -- EventStore -------------------------------------------------------------------

    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Any],
        meta: Any,
    ) -> list[Recorded]:
        stored = self._encode(stream_id, expected_version, events, meta)
        if not stored:
            return []
        ids = self._write(stream_id, expected_version, stored)
        return _recorded(stream_id, ids, stored, events, meta)

    def append_async(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[Any],
        meta: Any,
    ) -> Future[list[Recorded]]:
        if self._committer is None:  # appends in place: done on return
            return super().append_async(stream_id, expected_version, events, meta)
        stored = self._encode(stream_id, expected_version, events, meta)
        future: Future[list[Recorded]] = Future()
        if not stored:
            future.set_result([])
            return future
        events = list(events)

        def done(outcome: Outcome) -> None:
            if isinstance(outcome, list):
                future.set_result(_recorded(stream_id, outcome, stored, events, meta))
            else:
                future.set_exception(outcome)

        try:
            if self._closed:
                raise StoreUnavailable(
                    f"cannot append to stream {stream_id}: the event store is closed"
                )
            self._committer.submit_async(stream_id, expected_version, stored, done)
        except StoreError as exc:
            future.set_exception(exc)
        return future

    def _encode(
        self, stream_id: str, expected_version: int, events: Sequence[Any], meta: Any
    ) -> list[StoredEvent]:
        """The events as stored, checked and encoded before anything touches the
        database: an unregistered type or an unencodable value is a programming error
        and must not leave half a batch."""
        if not stream_id:
            raise ValueError("stream_id must be a non-empty string")
        if expected_version < 0:
            raise ValueError(f"expected_version must be >= 0, not {expected_version}")
        stored = []
        for offset, event in enumerate(events, start=1):
            topic, state = self._codec.encode(event, meta)
            stored.append(
                StoredEvent(
                    originator_id=stream_id,
                    originator_version=expected_version + offset,
                    topic=topic,
                    state=state,
                )
            )
        return stored

    def _write(
        self, stream_id: str, expected_version: int, stored: Sequence[StoredEvent]
    ) -> Sequence[int]:
        """Write one append durably and wake this process's waiters; its positions."""
        if self._closed:
            raise StoreUnavailable(
                f"cannot append to stream {stream_id}: the event store is closed"
            )
        if self._committer is not None:
            return self._committer.submit(stream_id, expected_version, stored)
        with self._guard(f"append to stream {stream_id}"):
            if self._positioned.current_version(stream_id) != expected_version:
                raise ConcurrencyConflict(stream_id, expected_version)
            try:
                ids = self._recorder.insert_events(stored)
            except IntegrityError as exc:
                raise ConcurrencyConflict(stream_id, expected_version) from exc
        if ids is None or len(ids) != len(stored):  # a recorder bug, not an outage
            raise RuntimeError(
                f"appended {len(stored)} events to stream {stream_id} but the recorder "
                f"returned positions {ids!r}"
            )
        self._advance(max(ids))
        return ids

    def read_stream(self, stream_id: str, after_version: int = 0) -> list[Recorded]:
        with self._guard(f"read stream {stream_id}"):
            rows = self._positioned.select_stream(stream_id, after_version)
        return [self._decode(n) for n in rows]

    def read_all(
        self, after: int = 0, limit: int = 1000, types: Sequence[str] = ()
    ) -> list[Recorded]:
        if limit <= 0:
            return []
        with self._guard("read the log"):
            rows = self._recorder.select_notifications(
                start=max(after, 0),
                limit=limit,
                topics=tuple(types),
                inclusive_of_start=False,
            )
        return [self._decode(n) for n in rows]

    def head(self) -> int:
        with self._guard("read the log's head"):
            head = self._recorder.max_notification_id() or 0
        self._advance(head)
        return head

    def wait_for_append(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._cond:
                if self._closed:
                    raise StoreUnavailable("the event store is closed")
                if self._observed_head > after:
                    return True
                now = time.monotonic()
                poll_due = self._poll_requested or (
                    self._poll_interval is not None and now >= self._next_poll
                )
                if not poll_due:
                    remaining = deadline - now
                    if remaining <= 0:
                        return False
                    if self._poll_interval is not None:
                        remaining = min(remaining, self._next_poll - now)
                    self._cond.wait(remaining)
                    continue
                # This thread polls for everyone; the others keep waiting on the condition.
                self._poll_requested = False
                self._next_poll = now + (self._poll_interval or 0.0)
            try:
                self.head()  # advances the observed head and wakes the others
            except StoreUnavailable as exc:
                log.debug("head poll failed (will retry): %s", exc)
                if time.monotonic() >= deadline:
                    return False

    def close(self) -> None:
        """Stop taking appends, finish those already queued for group commit (their
        callers get their real outcome), then release connections and threads."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._committer is not None:
            self._committer.close()
        self._close_backend()

    def commit_stats(self) -> dict[str, int]:
        """Group commit counters since the store was opened: ``batches`` committed,
        ``appends`` and ``events`` they held (all 0 on a store that appends in place).
        ``appends / batches`` is the mean batch size."""
        if self._committer is None:
            return {"batches": 0, "appends": 0, "events": 0}
        return self._committer.stats()

    # -- for subclasses ---------------------------------------------------------------

    def _close_backend(self) -> None:
        """Release connections and threads; called once."""

    def _request_poll(self) -> None:
        """Something may have been appended elsewhere: make the next waiter read the head
        now instead of at its next poll."""
        with self._cond:
            self._poll_requested = True
            self._cond.notify_all()

    # -- internals --------------------------------------------------------------------

    def _advance(self, position: int) -> None:
        with self._cond:
            if position > self._observed_head:
                self._observed_head = position
                self._cond.notify_all()

    def _decode(self, n: Notification) -> Recorded:
        try:
            kind, meta, event = self._codec.decode(n.topic, n.state)
        except CorruptEvent as exc:
            raise CorruptEvent(
                f"position {n.id} (stream {n.originator_id} version {n.originator_version}): {exc}"
            ) from exc
        return Recorded(
            position=n.id,
            stream_id=str(n.originator_id),
            version=n.originator_version,
            kind=kind,
            type=n.topic,
            meta=meta,
            event=event,
        )

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn every database failure into ``StoreUnavailable`` (ours pass through)."""
        if self._closed:
            raise StoreUnavailable(f"cannot {action}: the event store is closed")
        with _translate_errors(action, self._driver_errors):
            yield


def _recorded(
    stream_id: str, ids: Sequence[int], stored: Sequence[StoredEvent], events: Sequence[Any],
    meta: Any,
) -> list[Recorded]:
    return [
        Recorded(
            position=position,
            stream_id=stream_id,
            version=s.originator_version,
            kind=getattr(type(event), "kind", ""),
            type=s.topic,
            meta=meta,
            event=event,
        )
        for position, s, event in zip(ids, stored, events, strict=True)
    ]


@contextlib.contextmanager
def _translate_errors(
    action: str, driver_errors: tuple[type[BaseException], ...]
) -> Iterator[None]:
    """Database failures of any layer (eventsourcing's, the driver's) -> StoreUnavailable."""
    try:
        yield
    except StoreError:
        raise
    except EventSourcingError as exc:  # PersistenceError, pool closed or exhausted, ...
        raise StoreUnavailable(f"cannot {action}: {exc}") from exc
    except driver_errors as exc:
        raise StoreUnavailable(f"cannot {action}: {exc}") from exc


# ------------------------------------------------------------------------- memory ------


class _MemoryRecorder(POPOApplicationRecorder):
    """The POPO recorder plus positioned stream reads (it keeps an index per stream)."""

    def select_stream(self, originator_id: str, gt: int) -> Sequence[Notification]:
        with self._database_lock:
            index = self._stored_events_index.get(originator_id, {})
            out = []
            for version, i in index.items():  # insertion order is version order
                if version > gt:
                    s = self._stored_events[i]
                    out.append(
                        Notification(
                            id=i + 1,
                            originator_id=s.originator_id,
                            originator_version=s.originator_version,
                            topic=s.topic,
                            state=s.state,
                        )
                    )
            return out

    def current_version(self, originator_id: str) -> int:
        with self._database_lock:
            return max(self._stored_events_index.get(originator_id, {}), default=0)


class MemoryEventStore(RecorderEventStore):
    """The log in plain Python objects: for unit tests and throwaway runs."""

    def __init__(self, registry: Registry, meta_type: type[Any]) -> None:
        super().__init__(_MemoryRecorder(), EventCodec(registry, meta_type), poll_interval=None)


# ------------------------------------------------------------------------- SQLite ------


class _DurableSQLitePool(SQLiteConnectionPool):
    """eventsourcing's pool, plus per-connection pragmas.

    ``synchronous`` is a per-connection setting that defaults to NORMAL under WAL, which
    may lose the last commits on power loss; berthd promises an append is durable when it
    returns, so every connection gets FULL before first use.
    """

    def __init__(self, *, pragmas: Sequence[str], **kwargs: Any) -> None:
        self._pragmas = tuple(pragmas)
        super().__init__(**kwargs)

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        try:
            for statement in self._pragmas:
                # eventsourcing 9.5 keeps the sqlite3 connection in ``_sqlite_conn``.
                conn._sqlite_conn.execute(statement).close()
        except sqlite3.Error as exc:
            conn.close()
            raise InterfaceError(exc) from exc
        return conn


class _DurableSQLiteDatastore(SQLiteDatastore):
    """``SQLiteDatastore`` with text stream ids and the pragma-setting pool."""

    def __init__(
        self,
        db_name: str,
        *,
        pragmas: Sequence[str],
        lock_timeout: int,
        pool_timeout: float,
    ) -> None:
        super().__init__(db_name, originator_id_type="text")
        self.pool.close()  # the default pool never opened a connection; replace it
        self.pool = _DurableSQLitePool(
            pragmas=pragmas,
            db_name=db_name,
            lock_timeout=lock_timeout,
            pool_size=5,
            max_overflow=10,
            pool_timeout=pool_timeout,
        )


class _SQLiteRecorder(SQLiteApplicationRecorder):
    """The SQLite recorder plus positioned stream reads (the rowid is the position)."""

    def __init__(self, datastore: SQLiteDatastore, events_table_name: str) -> None:
        super().__init__(datastore, events_table_name)
        table = self.events_table_name
        self._select_stream_sql = (
            f"SELECT rowid, originator_id, originator_version, topic, state FROM {table} "
            "WHERE originator_id = ? AND originator_version > ? ORDER BY originator_version"
        )
        self._current_version_sql = (
            f"SELECT MAX(originator_version) FROM {table} WHERE originator_id = ?"
        )

    def select_stream(self, originator_id: str, gt: int) -> Sequence[Notification]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self._select_stream_sql, (originator_id, gt))
            return [
                Notification(
                    id=row["rowid"],
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=row["state"],
                )
                for row in c.fetchall()
            ]

    def current_version(self, originator_id: str) -> int:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self._current_version_sql, (originator_id,))
            value: int | None = c.fetchone()[0]
            return value or 0


class _IntegrityRefusal(Exception):
    """The primary key refused an insert of a batch that passed the version check (the
    batch was rolled back): retry its appends one transaction each."""


class _SQLiteBatchWriter:
    """Group commit on SQLite: the writer thread's own connection (same pragmas as the
    pool's), one ``BEGIN IMMEDIATE`` transaction per batch.

    ``BEGIN IMMEDIATE`` takes the database's write lock up front (waiting up to
    ``lock_timeout`` for another process's), so the versions read next cannot change
    before the commit. While the previous batch's callers wait to be told (see
    ``_group_commit``), it is tried without waiting first.
    """

    def __init__(
        self,
        db_name: str,
        *,
        table: str,
        insert_statement: str,
        pragmas: Sequence[str],
        lock_timeout: int,
    ) -> None:
        self._db_name = db_name
        self._table = table
        self._insert = insert_statement
        self._pragmas = tuple(pragmas)
        self._lock_timeout = lock_timeout
        self._conn: sqlite3.Connection | None = None
        self._versions_sql: dict[int, str] = {}

    def commit(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        try:
            return self._transaction(batch, release)
        except _IntegrityRefusal:
            release()
            log.warning("group commit: primary key refused a checked batch; retrying one by one")
            return [self._alone(p) for p in batch]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _alone(self, p: PendingAppend) -> Outcome:
        try:
            return self._transaction([p], Release())[0]
        except _IntegrityRefusal:
            return p.conflict()
        except StoreUnavailable as exc:
            out = StoreUnavailable(f"cannot append to stream {p.stream_id}: {exc}")
            out.__cause__ = exc.__cause__
            return out

    def _transaction(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        try:
            conn = self._connection()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self._db_name} for writing: {exc}") from exc
        try:
            self._begin(conn, release)
            accepted = plan(batch, self._current_versions(conn, {p.stream_id for p in batch}))
            outcomes: list[Outcome] = []
            cursor = conn.cursor()
            insert = self._insert
            for p, ok in zip(batch, accepted, strict=True):
                if not ok:
                    outcomes.append(p.conflict())
                    continue
                ids = []
                for s in p.events:
                    cursor.execute(
                        insert, (s.originator_id, s.originator_version, s.topic, s.state)
                    )
                    ids.append(cursor.lastrowid or 0)
                outcomes.append(ids)
            if not any(accepted):  # all refused: that is decided, whatever the rollback does
                self._rollback(conn)
                return outcomes
            release()
            conn.execute("COMMIT")
            return outcomes
        except sqlite3.IntegrityError as exc:
            self._rollback(conn)
            raise _IntegrityRefusal from exc
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StoreUnavailable(str(exc)) from exc
        except BaseException:
            self._rollback(conn)
            raise

    def _begin(self, conn: sqlite3.Connection, release: Release) -> None:
        """``BEGIN IMMEDIATE``; while a committed batch waits to be told, first without
        waiting for another process's write lock: if it is taken, tell them, then wait."""
        if not release.pending:
            conn.execute("BEGIN IMMEDIATE")
            return
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            busy = False
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            busy = True
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._lock_timeout * 1000}")
        if busy:
            release()
            conn.execute("BEGIN IMMEDIATE")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self._db_name,
                uri=True,
                check_same_thread=False,
                isolation_level=None,  # transactions are ours: BEGIN IMMEDIATE ... COMMIT
                timeout=self._lock_timeout,
            )
            try:
                for statement in self._pragmas:
                    conn.execute(statement).close()
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the connection is in doubt: use a new one
            log.warning("rollback failed (%s); reopening the writer connection", exc)
            self.close()

    def _current_versions(self, conn: sqlite3.Connection, streams: set[str]) -> dict[str, int]:
        """Each stream's last version, one query per 512 streams. ``MAX`` in a correlated
        subquery is one index seek per stream (``GROUP BY`` would scan whole streams);
        the id list is padded to a power of two so few statements are ever prepared."""
        ids = list(streams)
        out: dict[str, int] = {}
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            size = 1 << (len(chunk) - 1).bit_length()
            sql = self._versions_sql.get(size)
            if sql is None:
                sql = self._versions_sql[size] = (
                    f"SELECT v.column1, (SELECT MAX(originator_version) FROM {self._table} "
                    "WHERE originator_id = v.column1) FROM (VALUES "
                    + ",".join(["(?)"] * size)
                    + ") AS v"
                )
            for stream_id, version in conn.execute(sql, chunk + [chunk[-1]] * (size - len(chunk))):
                out[stream_id] = version or 0
        return out


class SQLiteEventStore(RecorderEventStore):
    """The log in one SQLite file (WAL, synchronous=FULL): berthd's default store.

    Appends are group-committed by one writer thread with a connection of its own;
    reads use a pool of connections. Several processes may open the same file; SQLite
    serialises their writes and the store's head poll (``poll_interval``) wakes
    followers for each other's appends. ``lock_timeout`` (seconds) bounds the wait for
    another process's write lock. ``pragmas`` are extra ``PRAGMA`` statements run on
    every connection, the writer's included (e.g. ``"PRAGMA cache_size=-65536"``).
    """

    _driver_errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        registry: Registry,
        meta_type: type[Any],
        *,
        poll_interval: float = 0.25,
        lock_timeout: int = 10,
        pragmas: Sequence[str] = (),
    ) -> None:
        db_name = os.fspath(path)
        if not db_name or SQLiteConnectionPool.detect_memory_mode(db_name):
            raise ValueError(
                f"{db_name!r} is not a file path: use open_store('memory') for a store "
                "that is not on disk"
            )
        if not db_name.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(db_name))
            if not os.path.isdir(parent):
                raise StoreUnavailable(
                    f"cannot open {db_name}: directory {parent} does not exist "
                    "(create the data directory first)"
                )
        self.path = db_name
        all_pragmas = ("PRAGMA synchronous=FULL", *pragmas)
        self.datastore = _DurableSQLiteDatastore(
            db_name,
            pragmas=all_pragmas,
            lock_timeout=lock_timeout,
            pool_timeout=float(lock_timeout) * 2,
        )
        recorder = _SQLiteRecorder(self.datastore, "stored_events")
        super().__init__(recorder, EventCodec(registry, meta_type), poll_interval=poll_interval)
        try:
            with self._guard(f"create the events table in {db_name}"):
                recorder.create_table()  # also puts the file in WAL mode
        except BaseException:
            self.datastore.close()
            raise
        self._committer = GroupCommitter(
            _SQLiteBatchWriter(
                db_name,
                table=recorder.events_table_name,
                insert_statement=recorder.insert_events_statement,
                pragmas=all_pragmas,
                lock_timeout=lock_timeout,
            ),
            on_commit=self._advance,
            name=os.path.basename(db_name),
        )

    def pragmas(self) -> dict[str, Any]:
        """``synchronous`` and ``journal_mode`` as a pooled connection sees them (for
        health checks and tests)."""
        out: dict[str, Any] = {}
        with (
            self._guard("read pragmas"),
            self.datastore.transaction(commit=False) as c,
        ):
            for name in ("synchronous", "journal_mode"):
                c.execute(f"PRAGMA {name}")
                out[name] = c.fetchone()[0]
        return out

    def _close_backend(self) -> None:
        self.datastore.close()


# --------------------------------------------------------------------- PostgreSQL ------


def _sweeping_check(
    sweep: weakref.WeakMethod[Callable[[], None]],
) -> Callable[[psycopg.Connection[Any]], None]:
    """The pool's pre-ping. psycopg_pool sleeps 1 s, 2 s, 4 s... between consecutive dead
    connections in one checkout, so after a server restart a pool full of dead
    connections would stall or time out calls one by one; the first dead one found makes
    the store drop every dead idle connection at once. (A weak reference: the pool must
    not keep the store alive.)"""

    def check(conn: psycopg.Connection[Any]) -> None:
        try:
            psycopg_pool.ConnectionPool.check_connection(conn)
        except psycopg.Error:
            method = sweep()
            if method is not None:
                method()
            raise

    return check


def _unretried(method: Any) -> Any:
    """The function under eventsourcing's ``@retry``: retrying an insert whose commit
    outcome is unknown is unsafe, and ten retries of a read make an outage take a minute
    to surface. A stale pooled connection is handled by ``pre_ping`` instead."""
    return getattr(method, "__wrapped__", method)


_PG_INSERT_EVENTS = _unretried(PostgresApplicationRecorder.insert_events)
_PG_SELECT_NOTIFICATIONS = _unretried(PostgresApplicationRecorder.select_notifications)
_PG_MAX_NOTIFICATION_ID = _unretried(PostgresApplicationRecorder.max_notification_id)


class _PostgresRecorder(PostgresApplicationRecorder):
    """The PostgreSQL recorder, without blind retries, plus positioned stream reads."""

    def __init__(self, datastore: PostgresDatastore, events_table_name: str) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        table = SQL("{}.{}").format(Identifier(datastore.schema), Identifier(events_table_name))
        self._select_stream_sql = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {} WHERE originator_id = %s AND originator_version > %s "
            "ORDER BY originator_version"
        ).format(table)
        self._current_version_sql = SQL(
            "SELECT MAX(originator_version) AS version FROM {} WHERE originator_id = %s"
        ).format(table)

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        result: Sequence[int] | None = _PG_INSERT_EVENTS(self, stored_events, **kwargs)
        return result

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        result: Sequence[Notification] = _PG_SELECT_NOTIFICATIONS(
            self, start, limit, stop, topics, inclusive_of_start=inclusive_of_start
        )
        return result

    def max_notification_id(self) -> int | None:
        result: int | None = _PG_MAX_NOTIFICATION_ID(self)
        return result

    def select_stream(self, originator_id: str, gt: int) -> Sequence[Notification]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_stream_sql, (originator_id, gt), prepare=True)
            return [
                Notification(
                    id=row["notification_id"],
                    originator_id=row["originator_id"],
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
                for row in curs.fetchall()
            ]

    def current_version(self, originator_id: str) -> int:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._current_version_sql, (originator_id,), prepare=True)
            row = curs.fetchone()
            return int(row["version"] or 0) if row else 0


class _PostgresBatchWriter:
    """Group commit on PostgreSQL: the writer thread's own connection, one transaction
    per batch in two round trips: ``BEGIN``, the recorder's table lock and the versions
    read; then one ``INSERT ... SELECT FROM unnest(...)``, ``NOTIFY`` and ``COMMIT``.
    Each round trip is one multi-statement query with parameters bound client-side
    (psycopg's ``ClientCursor``; its quoting is psycopg's own): pipeline mode would
    give the same two round trips but busy-polls the socket while it waits, holding
    the GIL the appending threads need. The previous batch's callers (see
    ``_group_commit``) are told before the first round trip: a server that stops
    answering must not hold up appends that are already committed.

    A connection found dead in the first round trip (a server restart since the last
    batch) is replaced and the batch retried once: nothing can have been written yet.
    A failure in the second round trip is reported, never retried: the ``COMMIT`` may
    have been applied.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        schema: str,
        table: str,
        channel: str,
        lock_timeout: int,
    ) -> None:
        self._connect = connect
        self._lock_timeout = f"{lock_timeout}s"
        name = SQL("{}.{}").format(Identifier(schema), Identifier(table))
        versions = SQL(
            "SELECT s.id, (SELECT max(originator_version) FROM {} WHERE originator_id = s.id) "
            "FROM unnest(%s::text[]) AS s(id)"
        ).format(name)
        self._begin_sql = SQL("BEGIN; LOCK TABLE {} IN EXCLUSIVE MODE; {}").format(name, versions)
        self._insert_sql = SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state) "
            "SELECT i, v, t, s FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bytea[]) "
            "WITH ORDINALITY AS r(i, v, t, s, o) ORDER BY o "
            "RETURNING originator_id, originator_version, notification_id; "
            "NOTIFY {}; COMMIT"
        ).format(name, Identifier(channel))
        self._conn: psycopg.Connection[Any] | None = None
        self._cursor: psycopg.ClientCursor[Any] | None = None

    def commit(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        try:
            return self._transaction(batch, release)
        except _IntegrityRefusal:
            release()
            log.warning("group commit: primary key refused a checked batch; retrying one by one")
            return [self._alone(p) for p in batch]

    def close(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _alone(self, p: PendingAppend) -> Outcome:
        try:
            return self._transaction([p], Release())[0]
        except _IntegrityRefusal:
            return p.conflict()
        except StoreUnavailable as exc:
            out = StoreUnavailable(f"cannot append to stream {p.stream_id}: {exc}")
            out.__cause__ = exc.__cause__
            return out

    def _transaction(self, batch: Sequence[PendingAppend], release: Release) -> list[Outcome]:
        release()
        streams = list(dict.fromkeys(p.stream_id for p in batch))
        retried = False
        while True:
            conn, cursor = self._connection()
            try:
                cursor.execute(self._begin_sql, (streams,))
                while cursor.nextset():  # BEGIN, LOCK, then the versions
                    pass
                rows = cursor.fetchall()
                break
            except psycopg.Error as exc:
                self._abandon(conn)
                if not retried and self._conn is None:  # nothing was written: safe to retry
                    retried = True
                    log.info("writer connection lost (%s); retrying the batch on a new one", exc)
                    continue
                raise StoreUnavailable(str(exc)) from exc
        accepted = plan(batch, {stream_id: version or 0 for stream_id, version in rows})
        events = [s for p, ok in zip(batch, accepted, strict=True) if ok for s in p.events]
        if not events:  # all refused: that is decided, whatever the rollback does
            self._abandon(conn)
            return [p.conflict() for p in batch]
        try:
            cursor.execute(
                self._insert_sql,
                (
                    [s.originator_id for s in events],
                    [s.originator_version for s in events],
                    [s.topic for s in events],
                    [s.state for s in events],
                ),
            )
            positions = {(i, v): n for i, v, n in cursor.fetchall()}  # the INSERT's rows
        except psycopg.errors.IntegrityError as exc:
            self._abandon(conn)
            raise _IntegrityRefusal from exc
        except psycopg.Error as exc:
            self._abandon(conn)
            raise StoreUnavailable(str(exc)) from exc
        return [
            [positions[(p.stream_id, s.originator_version)] for s in p.events]
            if ok
            else p.conflict()
            for p, ok in zip(batch, accepted, strict=True)
        ]

    def _connection(self) -> tuple[psycopg.Connection[Any], psycopg.ClientCursor[Any]]:
        conn, cursor = self._conn, self._cursor
        if conn is not None and cursor is not None and not conn.closed:
            return conn, cursor
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect for writing: {exc}") from exc
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (self._lock_timeout,))
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot set up the writer connection: {exc}") from exc
        self._conn, self._cursor = conn, psycopg.ClientCursor(conn)
        return self._conn, self._cursor

    def _abandon(self, conn: psycopg.Connection[Any]) -> None:
        """After a failed statement: roll back, or drop a connection that cannot."""
        if not conn.closed and not conn.broken:
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                return
            except psycopg.Error as exc:
                log.info("rollback failed (%s); dropping the writer connection", exc)
        self.close()


class PostgresEventStore(RecorderEventStore):
    """The log in a PostgreSQL table, ``schema.table`` (both created if missing).

    Several daemons may share one database; give each deployment its own schema.
    Appends are group-committed by one writer thread with a connection of its own
    (outside the pool, which serves reads). A dedicated connection LISTENs on the recorder's NOTIFY channel so that waiters wake
    at once for appends by other processes; the head poll covers the time that
    connection is being re-established.
    """

    _driver_errors = (psycopg.Error,)

    def __init__(
        self,
        registry: Registry,
        meta_type: type[Any],
        *,
        dbname: str,
        host: str = "127.0.0.1",
        port: int = 5432,
        user: str = "",
        password: str = "",
        schema: str = "public",
        table: str = "stored_events",
        pool_size: int = 5,
        max_overflow: int = 10,
        connect_timeout: float = 5.0,
        lock_timeout: int = 10,
        poll_interval: float = 0.5,
        listen: bool = True,
    ) -> None:
        self._conninfo: dict[str, Any] = {
            "dbname": dbname,
            "host": host,
            "port": port,
            "user": user,
            "password": password,
        }
        self.schema = schema
        self.table = table
        self._connect_timeout = connect_timeout
        where = f"{host}:{port}/{dbname} ({schema}.{table})"
        with (
            _translate_errors(f"open the event store at {where}", self._driver_errors),
            self._connect() as setup,
            self._advisory_lock(setup),
        ):
            setup.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
            self.datastore = PostgresDatastore(
                dbname=dbname,
                host=host,
                port=port,
                user=user,
                password=password,
                connect_timeout=connect_timeout,
                idle_in_transaction_session_timeout=60,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pre_ping=True,
                lock_timeout=lock_timeout,
                schema=schema,
                originator_id_type="text",
            )
            self._sweeping = threading.Lock()
            # eventsourcing passes psycopg_pool's plain check_connection for pre_ping;
            # ours also sweeps the pool (see _sweeping_check). No public setter exists.
            self.datastore.pool._check = _sweeping_check(weakref.WeakMethod(self._sweep_pool))
            try:
                recorder = _PostgresRecorder(self.datastore, table)
                recorder.create_table()
            except BaseException:
                self.datastore.close()
                raise
        super().__init__(recorder, EventCodec(registry, meta_type), poll_interval=poll_interval)
        self._channel = recorder.channel_name
        self._committer = GroupCommitter(
            _PostgresBatchWriter(
                self._connect,
                schema=schema,
                table=table,
                channel=self._channel,
                lock_timeout=lock_timeout,
            ),
            on_commit=self._advance,
            name=f"{schema}.{table}",
        )
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        if listen:
            self._listener = threading.Thread(
                target=self._listen, name=f"berthd-store-listen-{table}", daemon=True
            )
            self._listener.start()

    @classmethod
    def from_url(
        cls, url: str, registry: Registry, meta_type: type[Any], **overrides: Any
    ) -> PostgresEventStore:
        """``postgresql://user:pass@host:port/db?schema=s&table=t&pool_size=n``."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL: {url!r}")
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise ValueError(f"PostgreSQL URL names no database: {url!r}")
        kwargs: dict[str, Any] = {
            "dbname": dbname,
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 5432,
            "user": unquote(parts.username or ""),
            "password": unquote(parts.password or ""),
        }
        converters: dict[str, Any] = {
            "schema": str,
            "table": str,
            "pool_size": int,
            "max_overflow": int,
            "connect_timeout": float,
            "lock_timeout": int,
            "poll_interval": float,
        }
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in converters:
                raise ValueError(
                    f"unknown PostgreSQL URL parameter {key!r}; known: {', '.join(converters)}"
                )
            kwargs[key] = converters[key](value)
        kwargs.update(overrides)
        return cls(registry, meta_type, **kwargs)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            **self._conninfo, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
        )

    @contextlib.contextmanager
    def _advisory_lock(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Serialise schema and table creation between processes starting together
        (``IF NOT EXISTS`` is not race-free in PostgreSQL's catalogs)."""
        key = zlib.crc32(f"berthd-events:{self.schema}.{self.table}".encode())
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def _listen(self) -> None:
        """Turn NOTIFYs from any process's appends into an immediate head poll.

        This connection is also the store's early warning of a server restart: when it
        drops, the pool's idle connections are almost certainly dead too, so they are
        swept at once rather than discovered one checkout at a time.
        """
        channel = self._channel
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(SQL("LISTEN {}").format(Identifier(channel)))
                    backoff = 0.1
                    self._request_poll()  # appends may have happened while disconnected
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=0.2, stop_after=1):
                            self._request_poll()
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                log.info("LISTEN connection lost (%s); polling until it is back", exc)
                self._sweep_pool()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _sweep_pool(self) -> None:
        """Drop dead idle connections from the pool; it reconnects in the background."""
        if not self._sweeping.acquire(blocking=False):
            return  # another thread is sweeping
        try:
            self.datastore.pool.check()
        except Exception as exc:  # a closed or never-opened pool: nothing to sweep
            log.debug("pool sweep skipped: %s", exc)
        finally:
            self._sweeping.release()

    def _close_backend(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
            if self._listener.is_alive():
                log.warning("the store's LISTEN thread did not stop within 5 s")
        self.datastore.close()


# ------------------------------------------------------------------------ factory ------


def open_store(url: str, registry: Registry, *, meta_type: type[Any] | None = None) -> EventStore:
    """Open the store ``url`` names, creating its tables if missing.

    - ``"memory"``: in-process, gone on exit.
    - a filesystem path, or ``"sqlite:///abs/path.db"``: SQLite.
    - ``"postgresql://user:pass@host:port/db"`` (optional ``?schema=&table=&pool_size=``).

    ``registry`` maps event type names to classes (``berthd.domain.registry_of``);
    ``meta_type`` defaults to ``berthd.domain.base.Meta``, imported here only so that
    the stores themselves stay independent of the domain package.
    """
    if meta_type is None:
        from berthd.domain.base import Meta

        meta_type = Meta
    if url in ("memory", "memory://"):
        return MemoryEventStore(registry, meta_type)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresEventStore.from_url(url, registry, meta_type)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path.startswith("/"):
            raise ValueError(f"SQLite URLs take an absolute path (sqlite:///abs/path.db): {url!r}")
        return SQLiteEventStore(path, registry, meta_type)
    if "://" in url or not url:
        raise ValueError(
            f"unsupported store URL {url!r}: use 'memory', a file path, "
            "'sqlite:///abs/path.db' or 'postgresql://user:pass@host:port/db'"
        )
    return SQLiteEventStore(os.path.expanduser(url), registry, meta_type)
