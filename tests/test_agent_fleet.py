"""The fleet simulator: many paho agents on one loop, with chaos knobs."""

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent_sim.fleet import Fleet
from agent_sim.settings import Settings
from schemas.messages import ResultStatus
from tests.support.agent_bus import AgentBus, agent_bus, make_task
from tests.support.infra import BrokerHandle

COUNT = 20


@pytest.fixture
def settings(broker: BrokerHandle, tmp_path: Path) -> Settings:
    return Settings(
        mqtt_url=broker.url,
        state_dir=tmp_path / "agents",
        count=COUNT,
        heartbeat_s=0.5,
        keepalive_s=1,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        register_timeout_s=2,
        ramp_per_s=0,
        summary_interval_s=0,
        seed=7,
    )


@contextlib.asynccontextmanager
async def running(fleet: Fleet) -> AsyncIterator[Fleet]:
    task = asyncio.create_task(fleet.run())
    try:
        async with asyncio.timeout(15):
            await fleet.all_connected.wait()
        yield fleet
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def all_online(bus: AgentBus, fleet: Fleet) -> bool:
    return all(bus.online(a.agent_id) for a in fleet.agents)


async def test_a_fleet_registers_runs_tasks_and_goes_offline_cleanly(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as bus:
        fleet = Fleet(settings)
        async with running(fleet):
            await bus.wait_for(lambda b: all_online(b, fleet))
            assert fleet.counters.online == COUNT
            assert {r.agent_id for r in bus.registrations} == {
                a.agent_id for a in fleet.agents
            }
            tasks = [
                make_task(a.agent_id, "dns.resolve", {"name": "x"})
                for a in fleet.agents
            ]
            for task in tasks:
                await bus.publish_task(task)
            await bus.wait_for(lambda b: len(b.results) >= COUNT)
            await bus.wait_for(lambda b: len(set(b.heartbeats)) == COUNT)
        await bus.wait_for(
            lambda b: not any(b.online(a.agent_id) for a in fleet.agents)
        )
    assert fleet.counters.tasks_done == COUNT
    assert {r.task_id for r in bus.results} == {t.task_id for t in tasks}
    assert all(r.status is ResultStatus.SUCCEEDED for r in bus.results)
    for agent in fleet.agents:
        last = bus.statuses_of(agent.agent_id)[-1]
        assert (last.reason, last.epoch) == ("shutdown", agent.epoch)


async def test_chaos_drop_and_freeze_fire_the_will_and_agents_come_back(
    broker: BrokerHandle, settings: Settings
) -> None:
    settings = settings.model_copy(update={"chaos_down_s": 0.2})
    async with agent_bus(broker) as bus:
        fleet = Fleet(settings)
        async with running(fleet):
            await bus.wait_for(lambda b: all_online(b, fleet))
            dropped, frozen, restarted = fleet.agents[:3]
            epochs = {a.agent_id: a.epoch for a in (dropped, frozen, restarted)}
            dropped.drop()
            frozen.freeze()
            restarted.restart()

            def will_of(agent_id: str) -> bool:
                return any(
                    s.reason == "will" and s.epoch == epochs[agent_id]
                    for s in bus.statuses_of(agent_id)
                )

            # A drop is seen at once; a freeze after 1.5 x keepalive (1 s).
            await bus.wait_for(lambda b: will_of(dropped.agent_id))
            await bus.wait_for(lambda b: will_of(frozen.agent_id), 10)
            assert not will_of(restarted.agent_id)
            assert any(
                s.reason == "shutdown" for s in bus.statuses_of(restarted.agent_id)
            )
            for agent in (dropped, frozen):
                fleet.loop.call_soon(agent.recover)
            # Every one of them comes back online with a newer epoch.
            await bus.wait_for(
                lambda b: all(
                    b.online(aid) and b.statuses_of(aid)[-1].epoch > epoch
                    for aid, epoch in epochs.items()
                ),
                10,
            )


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    # Leaked sockets (amqtt leaves some when a client vanishes) then fail the
    # test that leaked them, not whichever test the collector runs in next.
    yield
    gc.collect()
