"""A network cut between the agents and the broker, longer than the keepalive.

The agents reach Mosquitto through a TCP proxy in the test (``TcpProxy``); the
controller connects directly. A cut freezes the link: sockets stay open,
nothing passes, so only the MQTT keepalive can notice.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.store import upgrade
from tests.support.controller_rig import bus
from tests.support.infra import BrokerHandle, fresh_postgres_database
from tests.support.proxy import tcp_proxy
from tests.support.system import (
    Audit,
    Children,
    agents_process,
    check_no_loss,
    controller_answers,
    controller_process,
    trigger,
    write_kbs,
)
from tests.support.wait import async_wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres, pytest.mark.timeout(120)]

KEEPALIVE_S = 2
AGENTS = 3


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        upgrade(url)
        yield url


async def test_cut_longer_than_keepalive_goes_offline_by_will_and_resumes(
    mosquitto_broker: BrokerHandle, pg_url: str, tmp_path: Path
) -> None:
    """Invariant: agents cut off for longer than 1.5 x keepalive go offline
    through their Will (not the controller's timer, set far beyond the cut),
    come back online with a newer epoch once the link is back, and their
    work resumes: workflows running at the cut and triggered during it all
    finish, each step once, every result in the database."""
    broker = mosquitto_broker
    state_dir = tmp_path / "agents"
    audit = Audit(pg_url, [state_dir])
    kb_dir = write_kbs(tmp_path / "kbs")
    with Children() as children:
        async with (
            tcp_proxy(broker.host, broker.port) as proxy,
            bus(broker) as b,
        ):
            children.start(
                controller_process(
                    tmp_path,
                    broker.url,
                    pg_url,
                    client_id=f"kbbus-controller-cut-{uuid.uuid4().hex[:8]}",
                    kb_dir=kb_dir,
                    offline_after_s=300,
                )
            )
            await controller_answers(b)
            children.start(
                agents_process(
                    tmp_path,
                    proxy.url,
                    state_dir,
                    count=AGENTS,
                    latency_ms=300,
                    keepalive_s=KEEPALIVE_S,
                    heartbeat_s=0.5,
                )
            )
            agent_ids = await audit.online(AGENTS)
            for agent_id in agent_ids * 2:
                await trigger(b, agent_id)

            async def progressed() -> bool:
                return await audit.steps_finished() >= 2

            await async_wait_until(progressed, timeout_s=30, what="progress")
            proxy.cut()

            async def all_offline() -> bool:
                snap = await audit.snapshot()
                return all(snap.agents[a] == "offline" for a in agent_ids)

            await async_wait_until(
                all_offline, timeout_s=5 * KEEPALIVE_S, what="offline by Will"
            )
            offline = [e for e in b.events if e.kind == "agent.offline"]
            assert {e.agent_id for e in offline} == set(agent_ids)
            assert {e.data.get("reason") for e in offline} == {"will"}
            # Triggered during the cut: queued until the agent is back.
            for agent_id in agent_ids:
                await trigger(b, agent_id)
            proxy.restore()
            await audit.online(AGENTS, timeout_s=30)
            snap = await audit.all_final(3 * AGENTS, timeout_s=60)
            online = [e for e in b.events if e.kind == "agent.online"]
            for agent_id in agent_ids:
                (will,) = [e for e in offline if e.agent_id == agent_id]
                back = [e for e in online if e.agent_id == agent_id and e.ts > will.ts]
                assert back, f"agent {agent_id} never came back online"
                assert back[-1].data["epoch"] > will.data["epoch"]
    audit.close()
    check_no_loss(snap)
    assert len(snap.workflows) == 3 * AGENTS
