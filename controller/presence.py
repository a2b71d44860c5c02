"""Presence: which agents are online, from status messages, heartbeats and a timer.

The rules (docs/protocol.md, "Presence"):

- A status message is applied only if its epoch is at least the stored one.
  An ``online`` needs a strictly newer epoch (a new connection); the same
  epoch again is a redelivery of a connection we already know, possibly one
  that has ended since. An ``offline`` (Will or clean shutdown) with an older
  epoch is the Will of an earlier connection arriving late: ignored.
- A heartbeat refreshes ``last_seen_at``; from an offline agent it brings the
  agent back online (HTTP agents have no status messages).
- The sweep marks offline, in one UPDATE, every online agent not seen for
  ``offline_after_s``.

Every transition is a compare-and-set on the row (status, epoch), so several
controllers can share the database: a lost race raises ``Conflict`` and the
whole transaction is re-run by ``Store``. The functions here only touch the
session; the caller publishes ``transition_effects`` after the commit.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from controller.db import Agent
from controller.effects import Publish
from controller.registry import OFFLINE, ONLINE, rowcount
from controller.store import Conflict
from schemas.codec import encode
from schemas.messages import AgentState, AgentStatus, Event, EventKind
from schemas.topics import Topics

# Core statements on the table: set-based writes need no ORM identity map.
_agents = cast(Table, Agent.__table__)


class Outcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    STALE = "stale"
    UNKNOWN = "unknown_agent"


class Reason(StrEnum):
    """Why an agent's presence changed; the ``reason`` of status and events."""

    CONNECT = "connect"
    WILL = "will"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"
    HEARTBEAT = "heartbeat"
    REGISTER = "register"


# The agent (online at connect) or the broker (its Will) already left a
# retained status for these; a second one from us could only overwrite a newer.
_RETAINED_BY_AGENT = frozenset({Reason.CONNECT, Reason.WILL, Reason.SHUTDOWN})


@dataclass(frozen=True, slots=True)
class Transition:
    agent_id: str
    state: AgentState
    epoch: int
    reason: str
    #: online -> online with a newer epoch: the agent reconnected.
    reconnect: bool = False


def apply_status(
    session: Session, status: AgentStatus, now: datetime
) -> tuple[Outcome, Transition | None]:
    row = session.execute(
        select(Agent.status, Agent.epoch).where(Agent.id == status.agent_id)
    ).one_or_none()
    if row is None:
        return Outcome.UNKNOWN, None
    stored_status, stored_epoch = row
    if status.state is AgentState.ONLINE:
        if status.epoch <= stored_epoch:
            return (
                Outcome.UNCHANGED if stored_status == ONLINE else Outcome.STALE
            ), None
        values = {"status": ONLINE, "epoch": status.epoch, "last_seen_at": now}
        reason = Reason.CONNECT
    else:
        if status.epoch < stored_epoch:
            return Outcome.STALE, None
        if status.epoch == stored_epoch and stored_status == OFFLINE:
            return Outcome.UNCHANGED, None
        values = {"status": OFFLINE, "epoch": status.epoch}
        reason = Reason.SHUTDOWN if status.reason == Reason.SHUTDOWN else Reason.WILL
    matched = rowcount(
        session,
        update(Agent)
        .where(
            Agent.id == status.agent_id,
            Agent.status == stored_status,
            Agent.epoch == stored_epoch,
        )
        .values(**values, updated_at=now),
    )
    if matched != 1:
        raise Conflict(status.agent_id)
    transition = Transition(
        status.agent_id,
        status.state,
        status.epoch,
        reason,
        reconnect=status.state is AgentState.ONLINE and stored_status == ONLINE,
    )
    return Outcome.APPLIED, transition


@dataclass(frozen=True, slots=True)
class Touched:
    """What a batch of heartbeats did."""

    updated: int
    unknown: list[str]
    revived: list[Transition]


def touch(session: Session, seen: Mapping[str, datetime], now: datetime) -> Touched:
    """Write ``last_seen_at`` for every agent in ``seen``, in two statements.

    Offline agents among them come back online (compare-and-set on status).
    """
    if not seen:
        return Touched(0, [], [])
    known = {
        agent_id: (status, epoch)
        for agent_id, status, epoch in session.execute(
            select(Agent.id, Agent.status, Agent.epoch).where(Agent.id.in_(seen))
        )
    }
    unknown = [agent_id for agent_id in seen if agent_id not in known]
    if not known:
        return Touched(0, unknown, [])
    session.execute(
        update(_agents)
        .where(
            _agents.c.id == bindparam("b_id"),
            # Heartbeats may be flushed out of order by two controllers.
            (_agents.c.last_seen_at.is_(None))
            | (_agents.c.last_seen_at < bindparam("b_seen")),
        )
        .values(last_seen_at=bindparam("b_seen")),
        [{"b_id": agent_id, "b_seen": seen[agent_id]} for agent_id in known],
    )
    offline = [a for a, (status, _) in known.items() if status != ONLINE]
    revived: list[Transition] = []
    if offline:
        rows = session.execute(
            update(_agents)
            .where(_agents.c.id.in_(offline), _agents.c.status == OFFLINE)
            .values(status=ONLINE, updated_at=now)
            .returning(_agents.c.id, _agents.c.epoch)
        )
        revived = [
            Transition(agent_id, AgentState.ONLINE, epoch, Reason.HEARTBEAT)
            for agent_id, epoch in rows
        ]
    return Touched(len(known), unknown, revived)


def sweep(session: Session, now: datetime, offline_after_s: float) -> list[Transition]:
    """Mark offline, in one UPDATE, every online agent silent for too long."""
    cutoff = now - timedelta(seconds=offline_after_s)
    rows = session.execute(
        update(_agents)
        .where(_agents.c.status == ONLINE, _agents.c.last_seen_at < cutoff)
        .values(status=OFFLINE, updated_at=now)
        .returning(_agents.c.id, _agents.c.epoch)
    )
    return [
        Transition(agent_id, AgentState.OFFLINE, epoch, Reason.TIMEOUT)
        for agent_id, epoch in rows
    ]


def status_message(
    topics: Topics, agent_id: str, state: AgentState, epoch: int, reason: str
) -> Publish:
    """The retained status the controller publishes for an agent."""
    status = AgentStatus(agent_id=agent_id, state=state, reason=reason, epoch=epoch)
    return Publish(topics.status(agent_id), encode(status), qos=1, retain=True)


def agent_event(
    topics: Topics, kind: EventKind, agent_id: str, data: dict[str, object]
) -> Publish:
    event = Event(kind=kind, agent_id=agent_id, data=data)
    return Publish(topics.agent_event(agent_id, kind.value), encode(event), qos=1)


def transition_effects(topics: Topics, transition: Transition) -> list[Publish]:
    """The event of a transition, and its retained status unless already there."""
    kind = (
        EventKind.AGENT_ONLINE
        if transition.state is AgentState.ONLINE
        else EventKind.AGENT_OFFLINE
    )
    data: dict[str, object] = {"reason": transition.reason, "epoch": transition.epoch}
    effects = [agent_event(topics, kind, transition.agent_id, data)]
    if transition.reason not in _RETAINED_BY_AGENT:
        effects.insert(
            0,
            status_message(
                topics,
                transition.agent_id,
                transition.state,
                transition.epoch,
                transition.reason,
            ),
        )
    return effects


@dataclass
class HeartbeatBuffer:
    """Heartbeats coalesced per agent (the latest arrival wins) until a flush.

    ``acks`` holds the messages to acknowledge once the flush has committed
    (heartbeats sent with QoS 1).
    """

    max_agents: int
    seen: dict[str, datetime] = field(default_factory=dict)
    acks: list[object] = field(default_factory=list)

    def add(self, agent_id: str, at: datetime, ack: object | None = None) -> None:
        self.seen[agent_id] = at
        if ack is not None:
            self.acks.append(ack)

    def __len__(self) -> int:
        return len(self.seen)

    def full(self) -> bool:
        return len(self.seen) >= self.max_agents

    def take(self) -> tuple[dict[str, datetime], list[object]]:
        seen, acks = self.seen, self.acks
        self.seen, self.acks = {}, []
        return seen, acks
