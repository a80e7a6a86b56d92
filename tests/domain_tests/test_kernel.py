"""The kernel's pure core: decide and evolve with plain values."""

from __future__ import annotations

import pytest

from berthd.domain import kernel as k
from berthd.domain.errors import Conflict, DeadKernel, ValidationError

NOW = "2026-11-22T10:00:00.000Z"


def created(**kw: object) -> k.KernelState:
    events = k.decide(None, k.CreateKernel(name="calc", **kw), now=NOW, new_id="k1", owner="key1",  # type: ignore[arg-type]
                      container_id="c1", runtime="docker", image="python:3.11-slim")
    state = k.replay(events)
    assert state is not None
    return state


def apply(state: k.KernelState | None, *events: k.KernelEvent) -> k.KernelState:
    for e in events:
        state = k.evolve(state, e)
    assert state is not None
    return state


def test_create_records_the_sandbox_and_starts_as_starting() -> None:
    s = created()
    assert (s.id, s.name, s.container_id, s.runtime, s.image, s.owner) == (
        "k1", "calc", "c1", "docker", "python:3.11-slim", "key1")
    assert s.status == "starting" and s.version == 1 and s.last_activity == NOW
    assert apply(s, k.KernelStarted(started_at=NOW)).status == "idle"
    assert apply(s, k.KernelStartFailed(reason="no image")).status == "dead"


def test_default_name_and_duplicate_create() -> None:
    events = k.decide(None, k.CreateKernel(), new_id="k9", container_id="c9")
    assert events[0].name == "kernel-k9"  # type: ignore[attr-defined]
    with pytest.raises(Conflict):
        k.decide(created(), k.CreateKernel(), new_id="k1")


def test_execution_intent_and_outcome() -> None:
    s = apply(created(), k.KernelStarted(started_at=NOW))
    [started] = k.decide(s, k.ExecuteCode(code="x" * 100, timeout=5), now=NOW, new_id="r1", code_cap=10)
    assert isinstance(started, k.ExecutionStarted) and started.code == "x" * 10 and started.timeout == 5
    busy = apply(s, started)
    assert busy.status == "busy" and busy.current == "r1"
    with pytest.raises(Conflict):
        k.decide(busy, k.ExecuteCode(code="1"), new_id="r2")
    assert k.decide(busy, k.InterruptKernel()) == [k.KernelInterrupted(result_id="r1")]
    done = apply(busy, k.ExecutionFinished(result_id="r1", status="ok", execution_count=1, finished_at="T"))
    assert done.status == "idle" and done.current is None and done.execution_count == 1
    assert done.last_activity == "T"


def test_death_refuses_executions_until_restart() -> None:
    s = apply(created(), k.KernelStarted(started_at=NOW), k.ExecutionStarted(result_id="r1", code="boom"),
              k.ExecutionFinished(result_id="r1", status="dead"), k.KernelDied(reason="exit 3"))
    assert s.status == "dead" and s.error == "exit 3"
    with pytest.raises(DeadKernel):
        k.decide(s, k.ExecuteCode(code="1"), new_id="r2")
    [requested] = k.decide(s, k.RestartKernel())
    s = apply(s, requested)
    assert s.status == "restarting"
    with pytest.raises(Conflict):
        k.decide(s, k.RestartKernel())
    s = apply(s, k.KernelRestarted())
    assert s.status == "idle" and s.execution_count == 0 and s.error is None


def test_destroyed_is_final() -> None:
    s = apply(created(), k.KernelStarted(started_at=NOW))
    [requested] = k.decide(s, k.DestroyKernel())
    s = apply(s, requested, k.KernelDestroyed())
    assert s.status == "destroyed"
    # an execution's outcome recorded after the destroy does not bring the kernel back
    for status in ("dead", "error", "ok"):
        assert apply(s, k.ExecutionFinished(result_id="r", status=status)).status == "destroyed"
    for command in (k.ExecuteCode(code="1"), k.RestartKernel(), k.DestroyKernel(), k.InterruptKernel()):
        with pytest.raises(Conflict):
            k.decide(s, command)


def test_commands_on_nothing_are_refused() -> None:
    with pytest.raises(ValidationError):
        k.decide(None, k.ExecuteCode(code="1"))
    assert k.evolve(None, k.KernelStarted(started_at=NOW)) is None


def test_old_create_payload_has_no_runtime() -> None:
    s = k.replay([k.KernelCreateRequested(id="k1", name="k", language="python", container_id="c1")])
    assert s is not None and s.runtime == ""
