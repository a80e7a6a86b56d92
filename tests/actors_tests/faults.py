"""A real log with one injected fault: the commit of the next intent event of a given
type fails, at once or a little later (as a commit nobody waited for does). For the
actors' pipelined appends (``EventStore.append_async``); everything else goes to the
real store underneath."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from berthd.events.store import EventStore, Recorded, StoreUnavailable


class FailingIntent(EventStore):
    """``store``, except that the next ``append_async`` holding an event of type
    ``event_type`` fails with ``StoreUnavailable`` after ``after`` seconds (None: at once),
    and nothing of it is appended. ``arm()`` to fail the next one."""

    def __init__(self, store: EventStore, event_type: type[Any], after: float | None = None) -> None:
        self.store = store
        self.event_type = event_type
        self.after = after
        self.armed = False
        self.failed = 0

    def arm(self) -> None:
        self.armed = True

    def append_async(self, stream_id: str, expected_version: int, events: Sequence[Any],
                     meta: Any) -> Future[list[Recorded]]:
        if self.armed and any(isinstance(e, self.event_type) for e in events):
            self.armed = False
            self.failed += 1
            future: Future[list[Recorded]] = Future()
            error = StoreUnavailable(f"cannot append to stream {stream_id}: disk I/O error (injected)")
            if self.after is None:
                future.set_exception(error)
            else:
                timer = threading.Timer(self.after, future.set_exception, (error,))
                timer.daemon = True
                timer.start()
            return future
        return self.store.append_async(stream_id, expected_version, events, meta)

    def append(self, stream_id: str, expected_version: int, events: Sequence[Any], meta: Any) -> list[Recorded]:
        return self.store.append(stream_id, expected_version, events, meta)

    def read_stream(self, stream_id: str, after_version: int = 0) -> list[Recorded]:
        return self.store.read_stream(stream_id, after_version)

    def read_all(self, after: int = 0, limit: int = 1000, types: Sequence[str] = ()) -> list[Recorded]:
        return self.store.read_all(after, limit, types)

    def head(self) -> int:
        return self.store.head()

    def wait_for_append(self, after: int, timeout: float) -> bool:
        return self.store.wait_for_append(after, timeout)

    def close(self) -> None:
        """The real store belongs to the test's fixture."""
