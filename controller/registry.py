"""Agents: registration and look-ups (runs inside the caller's transaction).

Registration is a sign of life: a registering agent is online from then on,
until its Will, a clean shutdown or the presence sweep says otherwise. The
agent's connection epoch is left alone here; only status messages move it.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import CursorResult, Executable, func, select, update
from sqlalchemy.orm import Session

from controller.db import ACTIVE_WORKFLOW_STATES, Agent, Workflow
from schemas.messages import RegisterRequest
from schemas.views import AgentView

ONLINE = "online"
OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Registration:
    agent: AgentView
    created: bool
    came_online: bool


def rowcount(session: Session, statement: Executable) -> int:
    """Rows matched by an UPDATE or DELETE run in ``session``."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)
    return result.rowcount


def agent_view(agent: Agent) -> AgentView:
    return AgentView(
        agent_id=agent.id,
        hostname=agent.hostname,
        ip_address=agent.ip_address,
        os=agent.os,
        status=ONLINE if agent.status == ONLINE else OFFLINE,
        epoch=agent.epoch,
        last_seen_at=agent.last_seen_at,
        registered_at=agent.registered_at,
    )


def register(session: Session, request: RegisterRequest, now: datetime) -> Registration:
    """Create the agent, or update a known one's details; either way keep its id.

    A new id that another controller inserts at the same moment makes the
    commit fail with ``IntegrityError``; ``Store`` re-runs this and the second
    run finds the agent.
    """
    agent_id = request.agent_id or str(uuid.uuid4())
    agent = session.get(Agent, agent_id)
    if agent is None:
        agent = Agent(
            id=agent_id,
            hostname=request.hostname,
            ip_address=request.ip_address,
            os=request.os,
            status=ONLINE,
            epoch=0,
            last_seen_at=now,
            registered_at=now,
            updated_at=now,
        )
        session.add(agent)
        session.flush()
        return Registration(agent_view(agent), created=True, came_online=True)

    details = {
        "hostname": request.hostname,
        "ip_address": request.ip_address,
        "os": request.os,
    }
    if any(getattr(agent, k) != v for k, v in details.items()):
        session.execute(
            update(Agent).where(Agent.id == agent_id).values(**details, updated_at=now)
        )
    # Compare-and-set on the status: the sweep or a Will may race with us.
    came_online = (
        rowcount(
            session,
            update(Agent)
            .where(Agent.id == agent_id, Agent.status == OFFLINE)
            .values(status=ONLINE, last_seen_at=now, updated_at=now),
        )
        == 1
    )
    if not came_online:
        session.execute(
            update(Agent).where(Agent.id == agent_id).values(last_seen_at=now)
        )
    session.refresh(agent)
    return Registration(agent_view(agent), created=False, came_online=came_online)


def get_agent(session: Session, agent_id: str) -> AgentView | None:
    agent = session.get(Agent, agent_id)
    return None if agent is None else agent_view(agent)


def list_agents(session: Session, status: str | None, limit: int) -> list[AgentView]:
    query = select(Agent).order_by(Agent.registered_at, Agent.id).limit(limit)
    if status is not None:
        query = query.where(Agent.status == status)
    return [agent_view(a) for a in session.scalars(query)]


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Agent.status, func.count()).group_by(Agent.status))
    return {status: count for status, count in rows}


def count_active(session: Session) -> dict[str, int]:
    """Workflows queued or running, by status (the status index answers it)."""
    rows = session.execute(
        select(Workflow.status, func.count())
        .where(Workflow.status.in_(ACTIVE_WORKFLOW_STATES))
        .group_by(Workflow.status)
    )
    return {status: count for status, count in rows}
