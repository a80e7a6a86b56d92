"""Sessions, pure: policy prefixes word for word, expiry from the given time, denial
recorded, activity extending the TTL, and replay."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from berthd.domain import session as se
from berthd.domain.errors import Conflict, ExpiredSession, PolicyDenied, ValidationError

T0 = "2026-01-01T00:00:00.000Z"
T1 = "2026-01-01T00:00:30.000Z"
LATE = "2026-01-01T01:00:00.000Z"


def opened(**kw: object) -> se.SessionState:
    events = se.decide(None, se.CreateSession(ttl_seconds=60, **kw), now=T0,  # type: ignore[arg-type]
                       expires_at="2026-01-01T00:01:00.000Z", new_id="s1", owner="k1")
    state = se.replay(events)
    assert state is not None
    return state


@pytest.mark.parametrize(("argv", "ok"), [
    (["kubectl", "get", "pods"], True),
    (["kubectl", "get"], True),
    (["kubectl", "delete", "pod"], False),
    (["kubectl", "getx"], False),
    (["kubectl"], False),
    (["ls"], True),
    (["ls", "-la", "/"], True),
    (["lsof"], False),
    (["sh", "-c", "echo 'a b'"], True),
    (["sh", "-c"], False),
])
def test_policy_matches_argv_prefixes_word_for_word(argv: list[str], ok: bool) -> None:
    policy = se.Policy(allow=["kubectl get", "ls", "sh -c \"echo 'a b'\""])
    assert se.allowed(policy, argv) is ok


def test_no_policy_or_no_allow_list_allows_everything() -> None:
    assert se.allowed(None, ["rm", "-rf", "/"])
    assert se.allowed(se.Policy(), ["anything"])
    assert not se.allowed(se.Policy(allow=[]), ["ls"])
    assert not se.allowed(se.Policy(allow=["'unterminated"]), ["'unterminated"])


def test_open_records_everything_and_replays() -> None:
    s = opened(name="agent", metadata={"a": 1}, policy=se.Policy(allow=["ls"]))
    assert (s.id, s.name, s.status, s.owner, s.ttl_seconds) == ("s1", "agent", "active", "k1", 60)
    assert s.created_at == s.last_activity == T0 and s.expires_at == "2026-01-01T00:01:00.000Z"
    assert s.kernel_id is None and s.commands_executed == 0 and s.metadata == {"a": 1}
    with pytest.raises(Conflict):
        se.decide(s, se.CreateSession(), now=T0, new_id="s1")


def test_a_denied_command_is_recorded_and_refused() -> None:
    s = opened(policy=se.Policy(allow=["ls"]))
    events = se.decide(s, se.ExecuteInSession(command=["rm", "-rf", "/"]), now=T1)
    assert events == [se.CommandDenied(command=["rm", "-rf", "/"], at=T1,
                                       reason="not in the session's policy allow list")]
    error = se.refusal(events, s)
    assert isinstance(error, PolicyDenied) and error.code == "POLICY_DENIED" and error.details["allow"] == ["ls"]
    after = se.evolve(s, events[0])
    assert after is not None and after.commands_executed == 0 and after.status == "active"
    assert se.decide(s, se.ExecuteInSession(command=["ls", "-l"]), now=T1) == []
    assert se.decide(s, se.ExecuteInSession(code="1"), now=T1) == []


def test_exactly_one_of_code_or_command() -> None:
    s = opened()
    for cmd in (se.ExecuteInSession(), se.ExecuteInSession(code="1", command=["ls"])):
        with pytest.raises(ValidationError):
            se.decide(s, cmd, now=T1)


def test_expiry_is_decided_from_the_given_time() -> None:
    s = opened()
    assert not se.due_to_expire(s, T1)
    assert se.due_to_expire(s, s.expires_at) and se.due_to_expire(s, LATE)
    assert se.decide(s, se.ExpireSession(), now=T1) == []
    for cmd in (se.ExecuteInSession(code="1"), se.ExecuteWithRetry(code="1"), se.ExpireSession()):
        events = se.decide(s, cmd, now=LATE)
        assert events == [se.SessionExpired(at=LATE)]
    error = se.refusal([se.SessionExpired(at=LATE)], s)
    assert isinstance(error, ExpiredSession) and error.status == 409 and error.code == "SESSION_EXPIRED"
    gone = se.evolve(s, se.SessionExpired(at=LATE))
    assert gone is not None and gone.status == "expired" and not se.due_to_expire(gone, LATE)
    with pytest.raises(ExpiredSession):
        se.decide(gone, se.ExecuteInSession(code="1"), now=LATE)
    assert se.decide(gone, se.ExpireSession(), now=LATE) == []
    assert se.decide(gone, se.CloseSession(), now=LATE) == []  # already over: nothing to close


def test_a_busy_session_does_not_expire() -> None:
    # an execution running or waiting is activity: its end moves expires_at instead
    s = opened()
    for cmd in (se.ExpireSession(), se.ExecuteInSession(code="1"), se.ExecuteWithRetry(code="1")):
        assert se.decide(s, cmd, now=LATE, busy=True) == []
    assert se.decide(s, se.CloseSession(), now=LATE, busy=True) == [se.SessionClosed(at=LATE)]


def test_activity_extends_the_ttl() -> None:
    s = opened()
    s = se.evolve(s, se.SessionKernelAttached(kernel_id="k", container_id="c"))
    assert s is not None and (s.kernel_id, s.container_id) == ("k", "c")
    later = se.expiry(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC), s.ttl_seconds)
    assert later == datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC)
    s = se.evolve(s, se.CommandExecuted(result_id="r", mode="code", status="ok", executed_at=T1,
                                        expires_at="2026-01-01T00:01:30.000Z"))
    assert s is not None and s.commands_executed == 1 and s.last_activity == T1
    assert not se.due_to_expire(s, "2026-01-01T00:01:00.000Z")


def test_close() -> None:
    s = opened()
    events = se.decide(s, se.CloseSession(), now=T1)
    assert events == [se.SessionClosed(at=T1)]
    closed = se.evolve(s, events[0])
    assert closed is not None and closed.status == "closed"
    with pytest.raises(Conflict) as info:
        se.decide(closed, se.ExecuteInSession(code="1"), now=T1)
    assert not isinstance(info.value, ExpiredSession)
    assert se.decide(closed, se.ExpireSession(), now=LATE) == []
