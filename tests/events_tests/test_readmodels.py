"""Read models fed from a real (in-memory) log: kernels and results."""

from __future__ import annotations

from berthd.domain import EVENT_TYPES
from berthd.domain import kernel as k
from berthd.domain.base import Meta
from berthd.events import open_store
from berthd.events.readmodels import KernelsView, ResultsView

META = Meta(timestamp="2026-11-22T10:00:00.000Z")


def test_kernels_and_results_views() -> None:
    store = open_store("memory", EVENT_TYPES)
    try:
        store.append("k1", 0, [
            k.KernelCreateRequested(id="k1", name="calc", language="python", container_id="c1", owner="key1"),
            k.KernelStarted(started_at="t"),
            k.ExecutionStarted(result_id="r1", code="1+1", started_at="t1"),
        ], META)
        kernels, results = KernelsView(), ResultsView()
        for rec in store.read_all():
            kernels.apply(rec)
            results.apply(rec)
        running = results.get("r1")
        assert running is not None and running.finished is None and running.owner == "key1"
        assert kernels.get("calc") is not None and kernels.kernel_of("c1") == "k1"
        assert kernels.counts() == {"busy": 1}
        recs = store.append("k1", 3, [
            k.ExecutionFinished(result_id="r1", status="ok", return_value="2", execution_count=1),
            k.KernelDestroyRequested(), k.KernelDestroyed(),
        ], META)
        for rec in recs:
            kernels.apply(rec)
            results.apply(rec)
        done = results.get("r1")
        assert done is not None and done.finished is not None and done.finished.return_value == "2"
        assert done.kernel_id == "k1" and done.owner == "key1" and done.started_at == "t1"
        assert kernels.get("calc") is None and not kernels.name_taken("calc") and kernels.kernel_of("c1") is None
        assert kernels.get("k1") is not None and kernels.counts() == {"destroyed": 1}
    finally:
        store.close()
