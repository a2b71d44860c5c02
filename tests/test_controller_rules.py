"""The presence and registration rules on a real database, without a broker."""

import io
import json
import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from controller.logs import JsonFormatter, TextFormatter
from controller.presence import (
    HeartbeatBuffer,
    Outcome,
    Reason,
    apply_status,
    sweep,
    touch,
    transition_effects,
)
from controller.registry import register
from controller.rpc import valid_reply_to
from controller.store import Store, upgrade
from schemas import decode
from schemas.messages import AgentState, AgentStatus, RegisterRequest, utcnow
from schemas.topics import Topics


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    upgrade(db_url)
    s = Store(db_url)
    yield s
    s.close()


def _register(store: Store, agent_id: str) -> None:
    request = RegisterRequest(
        request_id="r", reply_to="kbbus/v1/replies/t", hostname="h", agent_id=agent_id
    )
    store.transact(lambda s: register(s, request, utcnow()))


def _status(
    store: Store, agent_id: str, state: AgentState, epoch: int, reason: str = "will"
) -> Outcome:
    message = AgentStatus(agent_id=agent_id, state=state, epoch=epoch, reason=reason)
    outcome, _ = store.transact(lambda s: apply_status(s, message, utcnow()))
    return outcome


def _row(store: Store, agent_id: str) -> tuple[str, int]:
    from controller.db import Agent

    def read(s: Session) -> tuple[str, int]:
        agent = s.get(Agent, agent_id)
        assert agent is not None
        return agent.status, agent.epoch

    return store.transact(read)


def test_epochs_order_status_messages(store: Store) -> None:
    _register(store, "a1")
    on, off = AgentState.ONLINE, AgentState.OFFLINE
    assert _status(store, "a1", on, 100) is Outcome.APPLIED
    assert _status(store, "a1", on, 100) is Outcome.UNCHANGED  # redelivered
    assert _status(store, "a1", on, 200) is Outcome.APPLIED  # reconnected
    assert _status(store, "a1", off, 100) is Outcome.STALE  # the old Will
    assert _row(store, "a1") == ("online", 200)
    assert _status(store, "a1", off, 200) is Outcome.APPLIED
    assert _status(store, "a1", off, 200) is Outcome.UNCHANGED
    # The online of a connection that has since ended does not revive it.
    assert _status(store, "a1", on, 200) is Outcome.STALE
    assert _row(store, "a1") == ("offline", 200)
    assert _status(store, "nobody", on, 1) is Outcome.UNKNOWN


def test_heartbeats_revive_and_the_sweep_times_out(store: Store) -> None:
    _register(store, "a1")
    _register(store, "a2")
    _status(store, "a2", AgentState.OFFLINE, 0)
    now = utcnow()
    touched = store.transact(lambda s: touch(s, {"a2": now, "ghost": now}, now))
    assert touched.unknown == ["ghost"]
    assert [t.agent_id for t in touched.revived] == ["a2"]
    assert touched.revived[0].reason == Reason.HEARTBEAT
    later = now + timedelta(seconds=31)
    gone = store.transact(lambda s: sweep(s, later, 30.0))
    assert sorted(t.agent_id for t in gone) == ["a1", "a2"]
    assert store.transact(lambda s: sweep(s, later, 30.0)) == []


def test_timeouts_publish_a_retained_status_and_wills_do_not(store: Store) -> None:
    topics = Topics()
    _register(store, "a1")
    later = utcnow() + timedelta(seconds=60)
    (timeout,) = store.transact(lambda s: sweep(s, later, 30.0))
    effects = transition_effects(topics, timeout)
    retained = [e for e in effects if e.retain]
    assert [e.topic for e in retained] == [topics.status("a1")]
    status = decode(AgentStatus, retained[0].payload)
    assert (status.state, status.reason) == (AgentState.OFFLINE, "timeout")
    _status(store, "a1", AgentState.ONLINE, 5, "connect")
    message = AgentStatus(agent_id="a1", state=AgentState.OFFLINE, epoch=5)
    _, will = store.transact(lambda s: apply_status(s, message, utcnow()))
    assert will is not None
    assert [e.retain for e in transition_effects(topics, will)] == [False]


def test_registering_again_keeps_the_id_and_comes_online(store: Store) -> None:
    _register(store, "a1")
    _status(store, "a1", AgentState.OFFLINE, 0)
    request = RegisterRequest(
        request_id="r", reply_to="kbbus/v1/replies/t", hostname="h2", agent_id="a1"
    )
    again = store.transact(lambda s: register(s, request, utcnow()))
    assert (again.agent.agent_id, again.created, again.came_online) == (
        "a1",
        False,
        True,
    )
    assert again.agent.hostname == "h2"


def test_reply_topics_must_lie_under_replies() -> None:
    topics = Topics()
    assert valid_reply_to(topics, "kbbus/v1/replies/bridge-1")
    assert valid_reply_to(topics, "kbbus/v1/replies/bridge-1/r2")
    for bad in (
        "kbbus/v1/agents/x/tasks",
        "kbbus/v1/replies/",
        "kbbus/v1/replies/+",
        "kbbus/v1/replies/#",
        "kbbus/v1/replies//x",
        "other/kbbus/v1/replies/x",
    ):
        assert not valid_reply_to(topics, bad), bad


def test_heartbeat_buffer_coalesces_per_agent() -> None:
    buffer = HeartbeatBuffer(max_agents=2)
    first, second = utcnow(), utcnow() + timedelta(seconds=1)
    buffer.add("a1", first)
    buffer.add("a1", second, ack="m1")
    assert len(buffer) == 1
    assert not buffer.full()
    buffer.add("a2", first)
    assert buffer.full()
    seen, acks = buffer.take()
    assert seen == {"a1": second, "a2": first}
    assert acks == ["m1"]
    assert len(buffer) == 0


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_log_lines_are_structured(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("kbbus.controller.test")
    logger.addHandler(handler)
    try:
        logger.warning("agent offline: agent_id=%s reason=%s", "a1", "will")
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    if isinstance(formatter, JsonFormatter):
        record = json.loads(line)
        assert record["logger"] == "kbbus.controller.test"
        assert record["msg"] == "agent offline: agent_id=a1 reason=will"
    else:
        assert " level=warning logger=kbbus.controller.test " in line
        assert 'msg="agent offline: agent_id=a1 reason=will"' in line
