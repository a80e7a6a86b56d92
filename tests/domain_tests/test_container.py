"""Pure decide/evolve for containers: plain values, no fixtures, no I/O."""

from __future__ import annotations

import msgspec
import pytest

from berthd.domain import container as c
from berthd.domain.errors import Conflict, ValidationError

NOW = "2026-11-22T10:00:00.000Z"


def created(start: bool = True, **kw: object) -> c.ContainerState:
    cmd = c.CreateContainer(image="busybox", command=["sleep", "5"], start=start, **kw)  # type: ignore[arg-type]
    events = c.decide(None, cmd, now=NOW, new_id="abc123abc123", runtime="docker", owner="k1")
    state = c.replay(events)
    assert state is not None
    return state


def apply(state: c.ContainerState | None, *events: c.Event) -> c.ContainerState:
    for e in events:
        state = c.evolve(state, e)
    assert state is not None
    return state


def running() -> c.ContainerState:
    return apply(created(), c.ContainerCreated(), c.ContainerStartRequested(), c.ContainerStarted(started_at=NOW))


def test_create_records_intent_with_defaults() -> None:
    s = created()
    assert (s.status, s.pending, s.name, s.owner, s.version) == ("creating", "create", "berth-abc123abc123", "k1", 1)


def test_name_comes_from_the_command() -> None:
    assert created(name="web").name == "web"


def test_lifecycle_states() -> None:
    s = running()
    assert (s.status, s.pending, s.started_at) == ("running", None, NOW)
    stop = c.decide(s, c.StopContainer(timeout=3))
    assert stop == [c.ContainerStopRequested(timeout=3)]
    s = apply(s, *stop)
    assert (s.status, s.pending) == ("stopping", "stop")
    exited = c.observe_exit(s, 143, NOW)
    assert exited == [c.ContainerExited(exit_code=143, finished_at=NOW, reason="stopped")]
    s = apply(s, *exited)
    assert (s.status, s.pending, s.exit_code) == ("exited", None, 143)


def test_lifecycle_commands_refused_while_an_operation_is_pending() -> None:
    s = apply(running(), c.ContainerStopRequested())
    with pytest.raises(Conflict):
        c.decide(s, c.StartContainer())
    with pytest.raises(Conflict):
        c.decide(s, c.RestartContainer())


def test_kill_always_gets_through_while_stopping() -> None:
    s = apply(running(), c.ContainerStopRequested())
    assert c.decide(s, c.KillContainer(signal="SIGKILL")) == [c.ContainerKillRequested(signal="KILL")]


def test_exec_needs_a_running_container() -> None:
    with pytest.raises(Conflict):
        c.decide(apply(created(), c.ContainerCreated()), c.ExecInContainer(command=["true"]))
    events = c.decide(running(), c.ExecInContainer(command=["true"]), new_id="e1")
    assert events == [c.ExecStarted(exec_id="e1", command=["true"])]


def test_exec_does_not_block_stop() -> None:
    s = apply(running(), c.ExecStarted(exec_id="e1", command=["sleep", "60"]))
    assert s.execs_running == 1
    assert c.decide(s, c.StopContainer()) == [c.ContainerStopRequested(timeout=10.0)]


def test_remove_running_needs_force() -> None:
    with pytest.raises(Conflict):
        c.decide(running(), c.RemoveContainer())
    assert c.decide(running(), c.RemoveContainer(force=True)) == [c.ContainerRemoveRequested(force=True)]


def test_removed_is_final() -> None:
    s = apply(running(), c.ContainerRemoveRequested(force=True), c.ContainerRemoved())
    assert s.status == "removed"
    for cmd in (c.StartContainer(), c.KillContainer(), c.ExecInContainer(command=["true"])):
        with pytest.raises(Conflict):
            c.decide(s, cmd)


def test_exit_recorded_once() -> None:
    s = apply(running(), *c.observe_exit(running(), 0, NOW))
    assert s.status == "exited"
    assert c.observe_exit(s, 0, NOW) == []


def test_kill_reason() -> None:
    s = apply(running(), c.ContainerKillRequested(signal="KILL"))
    assert c.observe_exit(s, 137, NOW)[0].reason == "killed"  # type: ignore[attr-defined]


def test_restart_keeps_pending_across_its_exit() -> None:
    s = apply(running(), c.ContainerRestartRequested())
    assert c.observe_exit(s, 0, NOW) == []  # the restart's own outcome records it
    s = apply(s, c.ContainerExited(exit_code=0, finished_at=NOW, reason="restart"))
    assert (s.status, s.pending) == ("exited", "restart")
    s = apply(s, c.ContainerStarted(started_at="2026-11-22T10:00:01.000Z"))
    assert (s.status, s.pending) == ("running", None)


def test_failed_operation_returns_to_previous_status() -> None:
    s = apply(running(), c.ContainerStopRequested(),
              c.ContainerOperationFailed(operation="stop", reason="engine said no", status="running"))
    assert (s.status, s.pending, s.error) == ("running", None, "engine said no")


# ---------------------------------------------------------------- reconciliation

def seen(state: str, **kw: object) -> c.Observed:
    return c.Observed(state=state, **kw)  # type: ignore[arg-type]


def test_reconcile_create_interrupted_before_the_runtime() -> None:
    events = c.reconcile(created(), None, NOW)
    assert [type(e) for e in events] == [c.ContainerCreateFailed]
    assert apply(created(), *events).status == "removed"


def test_reconcile_create_that_happened_and_ran() -> None:
    events = c.reconcile(created(), seen("running", started_at=NOW), NOW)
    assert [type(e) for e in events] == [c.ContainerCreated, c.ContainerStarted]
    assert apply(created(), *events).status == "running"


def test_reconcile_exited_while_down() -> None:
    events = c.reconcile(running(), seen("exited", exit_code=3, started_at=NOW, finished_at=NOW), NOW)
    assert events == [c.ContainerExited(exit_code=3, finished_at=NOW, reason="reconciled")]


def test_reconcile_vanished_while_down() -> None:
    assert [type(e) for e in c.reconcile(running(), None, NOW)] == [c.ContainerLost]


def test_reconcile_nothing_changed() -> None:
    assert c.reconcile(running(), seen("running", started_at=NOW), NOW) == []


def test_reconcile_interrupted_stop_that_did_not_happen() -> None:
    s = apply(running(), c.ContainerStopRequested())
    events = c.reconcile(s, seen("running", started_at=NOW), NOW)
    assert apply(s, *events).status == "running"


def test_reconcile_remove_that_happened() -> None:
    s = apply(running(), c.ContainerRemoveRequested(force=True))
    assert apply(s, *c.reconcile(s, None, NOW)).status == "removed"


def test_reconcile_restart_interrupted_after_stop() -> None:
    s = apply(running(), c.ContainerRestartRequested())
    after = apply(s, *c.reconcile(s, seen("exited", exit_code=0, started_at=NOW, finished_at=NOW), NOW))
    assert (after.status, after.pending) == ("exited", None)


def test_every_reconcile_outcome_leaves_no_pending_operation() -> None:
    bases = [created(), running(), apply(running(), c.ContainerStopRequested()),
             apply(running(), c.ContainerRestartRequested()), apply(running(), c.ContainerRemoveRequested()),
             apply(created(), c.ContainerCreated(), c.ContainerStartRequested())]
    views = [None, seen("created"), seen("running", started_at="2026-11-22T11:00:00.000Z"),
             seen("exited", exit_code=1, started_at="2026-11-22T11:00:00.000Z", finished_at=NOW)]
    for base in bases:
        for view in views:
            after = apply(base, *c.reconcile(base, view, NOW))
            assert after.pending is None, (base.status, base.pending, view)


@pytest.mark.parametrize(("limits", "field"), [
    ({"memory_mb": 4}, "limits.memory_mb"), ({"memory_mb": 5}, "limits.memory_mb"),
    ({"cpus": 0.0001}, "limits.cpus"), ({"cpus": 0.009}, "limits.cpus"),
    ({"pids": 1}, "limits.pids"), ({"pids": 7}, "limits.pids"),
    ({"memory_mb": 512, "pids": 2}, "limits.pids"),
])
def test_create_refuses_limits_no_runtime_can_apply(limits: dict[str, object], field: str) -> None:
    # valid for the schema (the log decodes through it), refused before anything is recorded:
    # the runtimes would answer 502 (Docker: engine minimum 6 MB, CFS quota >= 1 ms per 100 ms;
    # local: the sandbox's own processes count against pids)
    body = msgspec.json.encode({"image": "busybox", "limits": limits})
    cmd = msgspec.json.decode(body, type=c.CreateContainer)
    with pytest.raises(ValidationError) as info:
        c.decide(None, cmd, now=NOW, new_id="abc123abc123", runtime="docker")
    assert info.value.status == 400 and info.value.code == "VALIDATION_ERROR"
    assert info.value.details.get("field") == field


def test_create_accepts_the_smallest_limits_every_runtime_applies() -> None:
    limits = c.Limits(memory_mb=c.MIN_MEMORY_MB, cpus=c.MIN_CPUS, pids=c.MIN_PIDS)
    assert (limits.memory_mb, limits.cpus, limits.pids) == (6, 0.01, 8)
    assert created(limits=limits).limits == limits


def test_events_recorded_with_smaller_limits_still_replay() -> None:
    # the minima hold for new creates only: a log written before them must still decode
    raw = msgspec.json.encode(c.ContainerCreateRequested(
        id="abc123abc123", name="old", image="busybox", runtime="local",
        limits=c.Limits(memory_mb=4, pids=2)))
    event = msgspec.json.decode(raw, type=c.ContainerCreateRequested)
    assert c.replay([event]).limits == c.Limits(memory_mb=4, pids=2)  # type: ignore[union-attr]
