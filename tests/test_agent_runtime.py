"""The MQTT agent runtime against a real broker and a fake controller."""

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent_sim.core import ERROR_CANCELED, ERROR_EXPIRED, ERROR_INTERRUPTED
from agent_sim.runtime import MqttAgent
from agent_sim.settings import Settings
from agent_sim.store import AgentState, state_path
from schemas.messages import ResultStatus
from tests.support.agent_bus import AgentBus, agent_bus, make_task
from tests.support.infra import BrokerHandle, free_port
from tests.support.wait import async_wait_until


@pytest.fixture
def settings(broker: BrokerHandle, tmp_path: Path) -> Settings:
    return Settings(
        mqtt_url=broker.url,
        state_dir=tmp_path / "agents",
        heartbeat_s=0.3,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        register_timeout_s=2,
    )


@contextlib.asynccontextmanager
async def running(agent: MqttAgent) -> AsyncIterator[MqttAgent]:
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def online(fake: AgentBus, agent_id: str) -> bool:
    return fake.online(agent_id)


async def test_registers_goes_online_heartbeats_and_says_goodbye(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        agent = MqttAgent(settings)
        async with running(agent):
            await fake.wait_for(lambda f: online(f, agent.agent_id))
            await fake.wait_for(lambda f: f.heartbeats.count(agent.agent_id) >= 2)
        await fake.wait_for(lambda f: not online(f, agent.agent_id))
    [request] = fake.registrations
    assert request.agent_id == agent.agent_id
    assert request.reply_to == f"kbbus/v1/replies/{agent.agent_id}"
    up, down = fake.statuses_of(agent.agent_id)
    assert down.reason == "shutdown"
    assert up.epoch == down.epoch == agent.state.last_epoch


async def test_keeps_its_id_and_raises_its_epoch_across_restarts(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        first = MqttAgent(settings)
        async with running(first):
            await fake.wait_for(lambda f: online(f, first.agent_id))
        second = MqttAgent(settings)
        assert second.agent_id == first.agent_id
        async with running(second):
            await fake.wait_for(lambda f: len(f.statuses_of(first.agent_id)) == 3)
    epochs = [s.epoch for s in fake.statuses_of(first.agent_id)]
    assert epochs[0] == epochs[1] < epochs[2]


async def test_a_redelivered_task_is_answered_not_run_again(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        agent = MqttAgent(settings)
        async with running(agent):
            await fake.wait_for(lambda f: online(f, agent.agent_id))
            task = make_task(agent.agent_id, "echo", {"message": "hello"})
            await fake.publish_task(task)
            await fake.wait_for(lambda f: len(f.results_for(task.task_id)) == 1)
            await fake.publish_task(task)  # the broker redelivers it
            await fake.wait_for(lambda f: len(f.results_for(task.task_id)) == 2)
        assert agent.counters.tasks_done == 1
        assert agent.counters.duplicates == 1
        first, again = fake.results_for(task.task_id)
        assert first == again
        assert first.status is ResultStatus.SUCCEEDED
        assert first.output == "hello"

        # A new process with the same state file: the retained task arrives
        # on subscribe and is answered from the file.
        restarted = MqttAgent(settings)
        async with running(restarted):
            await fake.wait_for(lambda f: len(f.results_for(task.task_id)) == 3)
        assert restarted.counters.tasks_done == 0
        assert fake.results_for(task.task_id)[2] == first


async def test_an_expired_task_is_refused(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        agent = MqttAgent(settings)
        async with running(agent):
            await fake.wait_for(lambda f: online(f, agent.agent_id))
            task = make_task(agent.agent_id, "echo", expires_in_s=-1)
            await fake.publish_task(task)
            await fake.wait_for(lambda f: bool(f.results_for(task.task_id)))
    [result] = fake.results_for(task.task_id)
    assert result.status is ResultStatus.FAILED
    assert result.error == ERROR_EXPIRED
    assert agent.counters.tasks_done == 0


async def test_clearing_the_task_cancels_the_running_one(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        agent = MqttAgent(settings)
        async with running(agent):
            await fake.wait_for(lambda f: online(f, agent.agent_id))
            task = make_task(agent.agent_id, "sleep", {"seconds": 60})
            await fake.publish_task(task)
            await _until(lambda: agent.core.running_task_id == task.task_id)
            await fake.clear_task(agent.agent_id)
            await _until(lambda: agent.core.running_task_id is None)
            stored = agent.state.result_of(task.task_id)
            assert stored is not None
            assert ERROR_CANCELED in stored
            # Seen again, the canceled task is not started again.
            await fake.publish_task(task)
            await fake.wait_for(lambda f: bool(f.results_for(task.task_id)))
            assert agent.core.running_task_id is None


async def test_an_agent_reconnecting_after_a_broker_restart_gets_its_task(
    broker: BrokerHandle, settings: Settings
) -> None:
    agent = MqttAgent(settings)
    async with running(agent):
        async with agent_bus(broker) as fake:
            await fake.wait_for(lambda f: online(f, agent.agent_id))
        connects = agent.counters.connects
        broker.restart()
        async with agent_bus(broker) as fake:
            # Published while the agent may still be backing off: it arrives
            # either retained on subscribe or live, and must arrive once.
            task = make_task(agent.agent_id, "echo", {"message": "after restart"})
            await fake.publish_task(task)
            await fake.wait_for(lambda f: bool(f.results_for(task.task_id)), 15)
            assert agent.counters.connects > connects
            [result] = fake.results_for(task.task_id)
            assert result.output == "after restart"
    assert agent.counters.tasks_done == 1


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[BrokerHandle]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    # Run as root, Mosquitto drops to the "mosquitto" user, which cannot write
    # its database into the test's directory: without this it loses retained
    # messages on restart, silently.
    handle = BrokerHandle("mosquitto", free_port(), workdir=workdir)
    handle.extra_conf.append("user root")
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


async def test_a_task_retained_across_a_mosquitto_restart_reaches_the_agent(
    persistent_mosquitto: BrokerHandle, tmp_path: Path
) -> None:
    broker = persistent_mosquitto
    settings = Settings(mqtt_url=broker.url, state_dir=tmp_path / "agents")
    agent = MqttAgent(settings)
    async with agent_bus(broker) as fake:
        async with running(agent):
            await fake.wait_for(lambda f: online(f, agent.agent_id))
        task = make_task(agent.agent_id, "echo", {"message": "kept"})
        await fake.publish_task(task)
    broker.restart()
    async with (
        agent_bus(broker) as fake,
        running(MqttAgent(settings)) as restarted,
    ):
        await fake.wait_for(lambda f: bool(f.results_for(task.task_id)))
    assert restarted.counters.tasks_done == 1
    assert fake.results_for(task.task_id)[0].output == "kept"


def spawn_agent(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent_sim",
            "--mqtt-url",
            settings.mqtt_url,
            "--state-dir",
            str(settings.state_dir),
            "--keepalive-s",
            "5",
            "--log-level",
            "WARNING",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


async def test_the_will_marks_a_killed_agent_offline(
    broker: BrokerHandle, settings: Settings
) -> None:
    async with agent_bus(broker) as fake:
        proc = spawn_agent(settings)
        try:
            path = state_path(settings.state_dir, 0)
            await _until(lambda: path.exists(), 15)
            state = AgentState.load(path)
            assert state is not None
            agent_id = state.agent_id
            await fake.wait_for(lambda f: online(f, agent_id), 15)
            # A running task when it dies: after a restart it is not run again.
            task = make_task(agent_id, "sleep", {"seconds": 60})
            await fake.publish_task(task)
            await _until(lambda: task.task_id in _started(path))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        await fake.wait_for(lambda f: not online(f, agent_id))
        up, will = fake.statuses_of(agent_id)
        assert will.reason == "will"
        assert will.epoch == up.epoch

        restarted = MqttAgent(settings)
        async with running(restarted):
            await fake.wait_for(lambda f: bool(f.results_for(task.task_id)))
        # The session's queued copy and the retained copy may both arrive: each
        # gets the same stored answer.
        result, *again = fake.results_for(task.task_id)
        assert result.status is ResultStatus.FAILED
        assert result.error == ERROR_INTERRUPTED
        assert all(r == result for r in again)
        assert restarted.counters.tasks_done == 0


def _started(path: Path) -> list[str]:
    state = AgentState.load(path)
    return list(state.started or []) if state else []


async def _until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    async def check() -> bool:
        return predicate()

    await async_wait_until(check, timeout_s=timeout_s, what=what)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    # Leaked sockets (amqtt leaves some when a client vanishes) then fail the
    # test that leaked them, not whichever test the collector runs in next.
    yield
    gc.collect()
