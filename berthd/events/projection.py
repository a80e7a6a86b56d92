"""Read models fed from the global log, and the runner that feeds them.

A ``Projection`` turns events into a read model the HTTP API answers from. The
``ProjectionRunner`` applies every event of the log, in position order, to each of its
projections, on one background thread; it also tells listeners (the WebSocket fan-out)
about each event once the projections reflect it. ``wait_for(position)`` is how a write
gets read-your-writes: the HTTP layer appends, then waits until the runner has applied
the returned position before answering from a projection.

Guarantees:

- Each event is applied to each projection once, in position order, by one thread at a
  time (the runner thread, or the caller of ``catch_up``/``rebuild``; they exclude each
  other). Readers of a projection run concurrently on other threads: a projection must
  make its updates atomic for them (a lock, or swapping immutable values).
- A projection or a listener that raises is logged with the position and skipped for that
  event; the others, and the runner, carry on. ``failures`` counts such errors per
  projection; ``rebuild()`` is the way to recover a projection after a fix.
- Listeners see every event exactly once, in order, on the applying thread, after the
  projections and ``position`` reflect it. A rebuild replays history into the projections
  but does not announce those events again.
- A store outage does not stop the runner: it logs and retries with backoff.

Checkpoints: a projection that declares ``checkpoint_fields`` can be saved, with the
position it reflects, to a ``CheckpointDir`` (``save_checkpoints()``: periodically by the
runner thread and on a clean stop) and restored at boot (``restore_checkpoints()``), after
which only the tail of the log is replayed into it. ``_apply_one`` skips a restored
projection for positions it already reflects. A checkpoint is used only if it is intact
(checksum), of the same schema (``checkpoint_version`` and the msgspec schema of its
fields) and of this log (the event at its position is the one it was taken after);
anything else is logged and that projection is replayed from the start. A checkpoint can
make a boot faster, never prevent one.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from berthd.events.store import EventStore, Recorded

__all__ = ["CheckpointDir", "Listener", "Projection", "ProjectionRunner"]

log = logging.getLogger(__name__)

Listener = Callable[[Recorded], None]


class Projection(abc.ABC):
    """A read model built by folding the log.

    ``name`` identifies it among a runner's projections and keys its checkpoints.

    A projection is checkpointed if it lists its state in ``checkpoint_fields``
    (attribute name -> type, as msgspec encodes and decodes it); every other attribute it
    holds must be a lock, or it is replayed in full at each boot (a warning says so), so
    that state added later cannot be silently lost. Bump ``checkpoint_version`` when what
    ``apply`` makes of the events changes without the fields' types changing.
    """

    name: str
    checkpoint_version: ClassVar[int] = 1
    checkpoint_fields: ClassVar[dict[str, Any]] = {}
    checkpoint_derived: ClassVar[frozenset[str]] = frozenset()  # rebuilt by restore_state

    def checkpoint_state(self) -> dict[str, Any]:
        """The values of ``checkpoint_fields``, taken while nothing is applied."""
        return {f: getattr(self, f) for f in self.checkpoint_fields}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take ``state`` (as ``checkpoint_state`` gave it, decoded) as the current one."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            for f, value in state.items():
                setattr(self, f, value)
            return
        with lock:
            for f, value in state.items():
                setattr(self, f, value)

    @abc.abstractmethod
    def apply(self, rec: Recorded) -> None:
        """Fold one event in. Must ignore event types it does not handle (including
        ``berthd.events.codec.UndecodedEvent``), and must not block on I/O: every other
        projection and every subscriber waits for it."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything, as before the first event (used by ``rebuild``)."""


_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition)
_CHECKPOINT_FORMAT = 1


class _Checkpoint(msgspec.Struct, array_like=True):
    """One checkpoint file: a header the loader checks, then the state's bytes."""

    format: int
    name: str
    schema: str  # checkpoint_version and a hash of the fields' msgspec JSON schema
    position: int  # the last event the state reflects
    stream_id: str  # ... which is this event (the log must still have it there)
    version: int
    crc32: int  # of ``state``
    state: bytes


class _StateCodec:
    """Encodes one projection class's ``checkpoint_fields`` (msgpack), built once."""

    def __init__(self, cls: type[Projection]) -> None:
        fields = list(cls.checkpoint_fields.items())
        self.struct = msgspec.defstruct(f"{cls.__name__}Checkpoint", fields, array_like=True)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(self.struct)
        described = msgspec.json.encode(msgspec.json.schema(self.struct))
        digest = hashlib.sha256(described).hexdigest()[:16]
        self.schema = f"{cls.checkpoint_version}:{digest}"

    def encode(self, state: dict[str, Any]) -> bytes:
        return self.encoder.encode(self.struct(**state))

    def decode(self, data: bytes) -> dict[str, Any]:
        value = self.decoder.decode(data)
        return {f: getattr(value, f) for f in value.__struct_fields__}


_codecs: dict[type[Projection], _StateCodec] = {}
_codecs_lock = threading.Lock()


def _codec_of(p: Projection) -> _StateCodec | None:
    """The state codec of ``p``, or None when ``p`` is not (fully) checkpointable."""
    if not p.checkpoint_fields:
        return None
    uncovered = sorted(
        k
        for k, v in vars(p).items()
        if k not in p.checkpoint_fields and k not in p.checkpoint_derived and not isinstance(v, _LOCK_TYPES)
    )
    if uncovered:
        log.warning(
            "projection %s holds state outside its checkpoint_fields (%s): not checkpointed",
            p.name,
            ", ".join(uncovered),
        )
        return None
    with _codecs_lock:
        codec = _codecs.get(type(p))
        if codec is None:
            codec = _codecs[type(p)] = _StateCodec(type(p))
        return codec


class CheckpointDir:
    """Projection checkpoints as files ``<name>.ckpt`` in one directory, each replaced
    atomically (write, fsync, rename)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / f"{name}.ckpt"

    def read(self, name: str) -> bytes | None:
        try:
            return self.file(name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.file(name)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def remove(self, name: str) -> None:
        self.file(name).unlink(missing_ok=True)


_HEADER = msgspec.msgpack.Decoder(_Checkpoint)
_ENCODER = msgspec.msgpack.Encoder()


class ProjectionRunner:
    """Feeds ``projections`` from ``store``'s log on a daemon thread.

    ``batch_size``: events read per query. ``idle_wait``: the longest the thread sleeps
    in one ``wait_for_append`` call when caught up, which bounds how long ``stop()``
    takes; the store wakes it at once on an append, so this is not a polling interval.

    ``checkpoints``: where ``restore_checkpoints``/``save_checkpoints`` keep them (None:
    never). The runner thread saves them once ``checkpoint_every`` events were applied
    since the last save and ``checkpoint_interval`` seconds passed.
    """

    def __init__(
        self,
        store: EventStore,
        projections: Sequence[Projection],
        *,
        batch_size: int = 500,
        idle_wait: float = 0.1,
        max_backoff: float = 5.0,
        checkpoints: CheckpointDir | None = None,
        checkpoint_every: int = 50_000,
        checkpoint_interval: float = 60.0,
    ) -> None:
        names = [p.name for p in projections]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate projection names: {', '.join(duplicates)}")
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self._store = store
        self._projections = tuple(projections)
        self._batch_size = batch_size
        self._idle_wait = idle_wait
        self._max_backoff = max_backoff
        # Held while applying: makes the runner thread, catch_up() and rebuild() take
        # turns, so events are applied once each and in order.
        self._apply_lock = threading.RLock()
        # Guards _position; notified on every applied event, for wait_for().
        self._cond = threading.Condition()
        self._position = 0
        self._announced = 0  # highest position handed to listeners; never goes back
        self._listeners: tuple[Listener, ...] = ()  # replaced, never mutated
        self._listeners_lock = threading.Lock()
        self._failures: Counter[str] = Counter()
        self._failures_lock = threading.Lock()  # not the apply lock: a rebuild is long
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._checkpoints = checkpoints
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._skip: dict[str, int] = {}  # restored projection -> position it reflects
        self._skip_below = 0  # max of _skip: positions above it are applied to all
        self._last: tuple[str, int] = ("", 0)  # stream and version of the last applied event
        self._saved_position = 0
        self._saved_at = time.monotonic()
        self._save_lock = threading.Lock()

    # -- state ----------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The position of the last event applied to the projections (0: none). Goes
        back to 0 while ``rebuild()`` runs."""
        with self._cond:
            return self._position

    @property
    def projections(self) -> tuple[Projection, ...]:
        return self._projections

    def projection(self, name: str) -> Projection:
        """The projection called ``name`` (KeyError if none)."""
        for p in self._projections:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def failures(self) -> dict[str, int]:
        """Errors raised by each projection's ``apply`` since start (for health/metrics)."""
        with self._failures_lock:
            return dict(self._failures)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Follow the log from the current position (0, or where ``catch_up`` got to)."""
        if self.running:
            raise RuntimeError("the projection runner is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="berthd-projections", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following and join the thread (a no-op if not running)."""
        self._stopping.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("projection runner did not stop within %.1f s", timeout)
        else:
            self._thread = None

    # -- waiting --------------------------------------------------------------------

    def wait_for(self, position: int, timeout: float) -> bool:
        """Block until the projections have applied ``position`` (True) or ``timeout``
        seconds pass (False). Woken by each applied event, not by polling."""
        with self._cond:
            return self._cond.wait_for(lambda: self._position >= position, timeout)

    # -- synchronous application ----------------------------------------------------

    def catch_up(self) -> int:
        """Apply, on the calling thread, everything in the log beyond ``position``;
        returns how many events were applied. Safe while the runner thread runs."""
        with self._apply_lock:
            return sum(self._drain().values())

    def rebuild(self) -> dict[str, int]:
        """Reset every projection and replay the whole log into them, on the calling
        thread; returns how many events of each type were replayed. Listeners are not
        told about events they have already seen. Safe while the runner thread runs
        (it waits, then continues from where the rebuild ended)."""
        with self._apply_lock:
            for p in self._projections:
                try:
                    p.reset()
                except Exception:
                    self._count_failure(p.name)
                    log.exception("projection %s failed to reset", p.name)
            self._skip, self._skip_below = {}, 0
            with self._cond:
                self._position = 0
            return dict(self._drain())

    # -- checkpoints ----------------------------------------------------------------

    def restore_checkpoints(self) -> dict[str, int]:
        """Before the first event is applied: restore each projection from its checkpoint
        where one is usable, and start from the lowest position any projection reflects.
        Returns the position each projection was restored at (0: it will be replayed
        from the start). Never raises for a bad checkpoint: it is logged and ignored."""
        if self._checkpoints is None:
            return {p.name: 0 for p in self._projections}
        with self._apply_lock:
            if self._position:
                raise RuntimeError("restore_checkpoints() must come before any event is applied")
            restored = {p.name: self._restore_one(p) for p in self._projections}
            start = min(restored.values(), default=0)
            self._skip = {n: pos for n, pos in restored.items() if pos > start}
            self._skip_below = max(self._skip.values(), default=0)
            with self._cond:
                self._position = start
            self._announced = start
            self._saved_position = start
            return restored

    def save_checkpoints(self) -> int:
        """Save every checkpointable projection at the current position; returns how
        many were saved. Their states are encoded between events, holding the apply lock;
        the files are written after it is released. A projection that failed on an
        event since start is not saved (its old checkpoint is removed): the next boot
        rebuilds it."""
        if self._checkpoints is None:
            return 0
        blobs: list[tuple[str, bytes | None]] = []  # None: remove
        with self._apply_lock:
            position = self._position
            if position == 0 or self._last[0] == "":
                return 0
            stream_id, version = self._last
            failures = self.failures
            for p in self._projections:
                if p.name in self._skip:  # its checkpoint is still ahead of the runner
                    continue
                codec = _codec_of(p)
                if codec is None or failures.get(p.name):
                    blobs.append((p.name, None))
                    continue
                try:
                    state = codec.encode(p.checkpoint_state())
                except Exception:
                    log.exception("cannot encode the checkpoint of projection %s", p.name)
                    blobs.append((p.name, None))
                    continue
                blobs.append((p.name, _ENCODER.encode(_Checkpoint(
                    format=_CHECKPOINT_FORMAT, name=p.name, schema=codec.schema, position=position,
                    stream_id=stream_id, version=version, crc32=zlib.crc32(state), state=state,
                ))))
            self._saved_position = position
            self._saved_at = time.monotonic()
        saved = 0
        with self._save_lock:  # two saves must not interleave their files
            for name, blob in blobs:
                try:
                    if blob is None:
                        self._checkpoints.remove(name)
                    else:
                        self._checkpoints.write(name, blob)
                        saved += 1
                except Exception:
                    log.exception("cannot save the checkpoint of projection %s", name)
        return saved

    def _restore_one(self, p: Projection) -> int:
        assert self._checkpoints is not None
        try:
            data = self._checkpoints.read(p.name)
            if data is None:
                return 0
            codec = _codec_of(p)
            if codec is None:
                return 0
            ck = _HEADER.decode(data)
            why = ""
            if ck.format != _CHECKPOINT_FORMAT or ck.name != p.name or ck.schema != codec.schema:
                why = "from another version of this projection"
            elif zlib.crc32(ck.state) != ck.crc32:
                why = "corrupt (checksum)"
            else:
                at = self._store.read_all(after=ck.position - 1, limit=1)
                if not at or (at[0].position, at[0].stream_id, at[0].version) != (
                        ck.position, ck.stream_id, ck.version):
                    why = "not of this log"
            if why:
                log.warning("checkpoint of projection %s is %s: replaying it in full", p.name, why)
                return 0
            p.restore_state(codec.decode(ck.state))
            log.info("projection %s restored at position %d", p.name, ck.position)
            return ck.position
        except Exception as exc:
            log.warning("checkpoint of projection %s is unreadable (%s): replaying it in full",
                        p.name, exc)
            try:
                p.reset()
            except Exception:
                self._count_failure(p.name)
                log.exception("projection %s failed to reset", p.name)
            return 0

    def _maybe_save(self) -> None:
        """On the runner thread, between batches: periodic checkpoints."""
        if (
            self._checkpoints is not None
            and self._position - self._saved_position >= self._checkpoint_every
            and time.monotonic() - self._saved_at >= self._checkpoint_interval
        ):
            self.save_checkpoints()

    # -- listeners ------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(rec)`` after each new event is applied, on the applying thread.
        It must return quickly and never block (hand the event to a queue)."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``; a no-op if it was not added."""
        with self._listeners_lock:
            listeners = list(self._listeners)
            if callback in listeners:
                listeners.remove(callback)
            self._listeners = tuple(listeners)

    # -- internals ------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                with self._apply_lock:
                    # Read under the lock: a rebuild may have moved the position since
                    # the last batch, and a batch must continue from the current one.
                    batch = self._store.read_all(after=self._position, limit=self._batch_size)
                    for rec in batch:
                        self._apply_one(rec)
                self._maybe_save()
                if not batch:
                    self._store.wait_for_append(self._position, timeout=self._idle_wait)
                backoff = 0.0
            except Exception as exc:
                first = backoff == 0.0
                backoff = min(max(backoff * 2, 0.1), self._max_backoff)
                # The traceback once per outage; then one line per retry.
                log.log(
                    logging.ERROR if first else logging.WARNING,
                    "projection runner at position %d cannot read the log (%s); retrying in %.1f s",
                    self._position,
                    exc,
                    backoff,
                    exc_info=first,
                )
                self._stopping.wait(backoff)

    def _count_failure(self, name: str) -> None:
        with self._failures_lock:
            self._failures[name] += 1

    def _drain(self) -> Counter[str]:
        """Apply everything up to the head as it is now (caller holds the apply lock)."""
        counts: Counter[str] = Counter()
        while True:
            batch = self._store.read_all(after=self._position, limit=self._batch_size)
            if not batch:
                return counts
            for rec in batch:
                self._apply_one(rec)
                counts[rec.type] += 1

    def _apply_one(self, rec: Recorded) -> None:
        """Apply one event to every projection, publish the position, then tell the
        listeners (caller holds the apply lock)."""
        skip = self._skip if rec.position <= self._skip_below else None
        for p in self._projections:
            if skip and rec.position <= skip.get(p.name, 0):
                continue
            try:
                p.apply(rec)
            except Exception:
                self._count_failure(p.name)
                log.exception(
                    "projection %s failed on %s at position %d (stream %s v%d); "
                    "it may be stale until rebuilt",
                    p.name,
                    rec.type,
                    rec.position,
                    rec.stream_id,
                    rec.version,
                )
        self._last = (rec.stream_id, rec.version)
        with self._cond:
            self._position = rec.position
            self._cond.notify_all()
        if self._skip and rec.position >= self._skip_below:
            self._skip = {}
        if rec.position <= self._announced:
            return
        self._announced = rec.position
        for callback in self._listeners:
            try:
                callback(rec)
            except Exception:
                log.exception(
                    "event listener %r failed on %s at position %d",
                    callback,
                    rec.type,
                    rec.position,
                )
