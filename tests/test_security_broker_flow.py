"""Enrolment end to end with a real controller, on amqtt and on Mosquitto.

An agent connects with the enrolment account, registers with the token, gets
its own credentials, reconnects as itself and runs a workflow; registrations
without the token, or re-registrations of a known id with only the token, are
refused and counted. On Mosquitto the controller creates each agent's account
through the dynamic-security plugin (``--mosquitto-dynsec``).
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent_sim.fleet import Fleet
from agent_sim.runtime import MqttAgent
from agent_sim.settings import Settings as AgentSettings
from agent_sim.store import AgentState as AgentStateFile
from agent_sim.store import state_path
from controller.settings import Settings
from schemas import decode, encode
from schemas.access import (
    BRIDGE_USERNAME,
    CONTROLLER_USERNAME,
    ENROL_USERNAME,
    enrol_reply_topic,
)
from schemas.messages import (
    AgentState,
    AgentStatus,
    ErrorCode,
    LookupKind,
    LookupReply,
    LookupRequest,
    RegisterReply,
    RegisterRequest,
    ResultStatus,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod, Topics
from schemas.views import FINAL_WORKFLOW_STATES
from tests.support.controller_rig import Bus, running_controller
from tests.support.secure import ROOT, SecuredBroker, secured_broker
from tests.support.wait import async_wait_until

TOPICS = Topics(ROOT)
TIMEOUT_S = 10.0


@pytest.fixture(params=["amqtt", "mosquitto"])
def secure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecuredBroker]:
    with secured_broker(request.param, tmp_path) as broker:
        yield broker


def secure_settings(broker: SecuredBroker, db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        mqtt_url=broker.service_url(CONTROLLER_USERNAME),
        db_url=db_url,
        client_id=f"kbbus-controller-test-{uuid.uuid4().hex[:8]}",
        enrolment_token=broker.enrolment_token,
        open_enrolment=False,
        agent_secret=broker.agent_secret,
        mosquitto_dynsec=broker.kind == "mosquitto",
        signing_key_dir=tmp_path / "keys",
        sweep_interval_s=0.2,
        tick_interval_s=0.2,
        heartbeat_flush_ms=50.0,
        reconnect_min_s=0.1,
        reconnect_max_s=1.0,
    )


@contextlib.asynccontextmanager
async def service_bus(broker: SecuredBroker) -> AsyncIterator[Bus]:
    """The test as the bridge account: requests and replies."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    async with broker.client(broker.service_url(BRIDGE_USERNAME), name) as client:
        b = Bus(client, TOPICS, name)
        await client.subscribe(b.reply_to, qos=1)
        reader = asyncio.create_task(b._read())
        try:
            yield b
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


async def enrol(broker: SecuredBroker, agent_id: str, **fields: Any) -> RegisterReply:
    """Register ``agent_id`` over the enrolment account; the reply."""
    client_id = f"kbbus-enrol-{uuid.uuid4().hex}"
    reply_to = enrol_reply_topic(ROOT, client_id)
    url = broker.url(ENROL_USERNAME, broker.enrolment_token)
    async with broker.client(url, client_id) as client:
        await client.subscribe(reply_to, qos=1)
        request = RegisterRequest(
            request_id=uuid.uuid4().hex,
            reply_to=reply_to,
            hostname="enrolling-host",
            agent_id=agent_id,
            **fields,
        )
        await client.publish(TOPICS.rpc(RpcMethod.REGISTER), encode(request), qos=1)
        async with asyncio.timeout(TIMEOUT_S):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return decode(RegisterReply, message.payload)
    raise AssertionError("no reply")


async def test_registration_needs_the_token_and_known_ids_their_own_password(
    secure: SecuredBroker, sqlite_url: str, tmp_path: Path
) -> None:
    settings = secure_settings(secure, sqlite_url, tmp_path)
    agent_id = str(uuid.uuid4())
    async with running_controller(settings) as rig:
        for token in (None, "wrong-token"):
            refused = await enrol(secure, agent_id, enrolment_token=token)
            assert refused.error is not None
            assert refused.error.code is ErrorCode.UNAUTHORIZED
            assert refused.agent is None
        assert rig.rejected("unauthorized", "rpc") == 2

        reply = await enrol(secure, agent_id, enrolment_token=secure.enrolment_token)
        assert reply.error is None
        assert reply.agent is not None
        credentials = reply.agent.credentials or {}
        assert credentials["mqtt_username"] == agent_id
        password = credentials["mqtt_password"]
        assert secure.agent_url(agent_id) == secure.url(agent_id, password)

        # The token alone no longer admits this id: it would hand anyone who
        # holds the token this agent's credentials.
        again = await enrol(secure, agent_id, enrolment_token=secure.enrolment_token)
        assert again.error is not None
        assert again.error.code is ErrorCode.UNAUTHORIZED
        own = await enrol(secure, agent_id, mqtt_password=password)
        assert own.error is None
        assert own.agent is not None
        assert rig.rejected("unauthorized", "rpc") == 3


async def run_agent(broker: SecuredBroker, agent_id: str, password: str) -> None:
    """A minimal agent on its own account: online, then answer every task."""
    url = broker.url(agent_id, password)
    async with broker.client(url, agent_id) as client:
        await client.subscribe(TOPICS.tasks(agent_id), qos=1)
        status = AgentStatus(agent_id=agent_id, state=AgentState.ONLINE, epoch=1)
        await client.publish(TOPICS.status(agent_id), encode(status), 1, True)
        seen: set[str] = set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            if not message.payload:
                continue
            task = decode(Task, message.payload)
            if task.task_id in seen:
                continue
            seen.add(task.task_id)
            result = TaskResult(
                agent_id=agent_id,
                task_id=task.task_id,
                status=ResultStatus.SUCCEEDED,
                exit_code=0,
                output=f"ran {task.action}",
            )
            await client.publish(TOPICS.results(agent_id), encode(result), qos=1)


async def test_enrolled_agent_reconnects_as_itself_and_runs_a_workflow(
    secure: SecuredBroker, db_url: str, tmp_path: Path
) -> None:
    settings = secure_settings(secure, db_url, tmp_path)
    agent_id = str(uuid.uuid4())
    async with running_controller(settings), service_bus(secure) as ops:
        reply = await enrol(secure, agent_id, enrolment_token=secure.enrolment_token)
        assert reply.agent is not None
        assert reply.agent.credentials is not None
        password = reply.agent.credentials["mqtt_password"]
        agent = asyncio.create_task(run_agent(secure, agent_id, password))
        try:
            trigger = ops.new_request(
                TriggerRequest, agent_id=agent_id, kb_id="dns-flush-kb"
            )
            started = await ops.request(RpcMethod.TRIGGER, trigger, TriggerReply)
            assert started.workflow is not None, started.error
            workflow_id = started.workflow.workflow_id

            async def finished() -> str | None:
                if agent.done():
                    agent.result()  # raises what stopped the agent
                lookup = ops.new_request(
                    LookupRequest, kind=LookupKind.WORKFLOW, id=workflow_id
                )
                got = await ops.request(RpcMethod.LOOKUP, lookup, LookupReply)
                view = got.workflows[0] if got.workflows else None
                if view is None or view.status not in FINAL_WORKFLOW_STATES:
                    return None
                return view.status

            status = await async_wait_until(
                finished, timeout_s=30, what=f"workflow {workflow_id} finished"
            )
        finally:
            agent.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await agent
    assert status == "succeeded"


async def test_simulated_agent_enrols_stores_its_credentials_and_runs_a_workflow(
    secure: SecuredBroker, sqlite_url: str, tmp_path: Path
) -> None:
    """agent_sim's MQTT agent: token once, then its own account, also after a
    restart without the token."""
    settings = secure_settings(secure, sqlite_url, tmp_path)
    state_dir = tmp_path / "agents"
    agent_settings = AgentSettings(
        mqtt_url=secure.anonymous_url,
        enrolment_token=secure.enrolment_token,
        state_dir=state_dir,
        heartbeat_s=0.5,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    async with running_controller(settings), service_bus(secure) as ops:
        agent = MqttAgent(agent_settings)
        running = asyncio.create_task(agent.run())
        try:
            stored = await async_wait_until(
                lambda: stored_password(state_dir),
                timeout_s=TIMEOUT_S,
                what="credentials in the agent's state file",
            )
            assert stored is not None
            expected = secure.agent_url(agent.agent_id)
            assert secure.url(agent.agent_id, stored) == expected
            status = await run_workflow(ops, agent.agent_id, running)
            # Its own registration must not get it kicked off the broker (a
            # dynamic-security password reset did that on every registration).
            assert agent.counters.reconnects == 0
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        assert status == "succeeded"

        # Restarted without the token: it logs in with what it stored.
        again = MqttAgent(agent_settings.model_copy(update={"enrolment_token": None}))
        assert again.agent_id == agent.agent_id
        running = asyncio.create_task(again.run())
        try:
            assert await run_workflow(ops, again.agent_id, running) == "succeeded"
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def stored_password(state_dir: Path) -> str | None:
    state = AgentStateFile.load(state_path(state_dir, 0))
    return None if state is None else state.mqtt_password


async def run_workflow(ops: Bus, agent_id: str, running: "asyncio.Task[None]") -> str:
    """Trigger dns-flush-kb on ``agent_id`` and wait for its final status."""
    trigger = ops.new_request(TriggerRequest, agent_id=agent_id, kb_id="dns-flush-kb")
    started = await ops.request(RpcMethod.TRIGGER, trigger, TriggerReply)
    assert started.workflow is not None, started.error
    workflow_id = started.workflow.workflow_id

    async def finished() -> str | None:
        if running.done():
            running.result()
        lookup = ops.new_request(
            LookupRequest, kind=LookupKind.WORKFLOW, id=workflow_id
        )
        got = await ops.request(RpcMethod.LOOKUP, lookup, LookupReply)
        view = got.workflows[0] if got.workflows else None
        if view is None or view.status not in FINAL_WORKFLOW_STATES:
            return None
        return view.status

    status = await async_wait_until(
        finished, timeout_s=30, what=f"workflow {workflow_id} finished"
    )
    assert status is not None
    return status


async def test_simulated_fleet_enrols_every_agent(
    secure: SecuredBroker, sqlite_url: str, tmp_path: Path
) -> None:
    settings = secure_settings(secure, sqlite_url, tmp_path)
    state_dir = tmp_path / "fleet"
    fleet_settings = AgentSettings(
        mqtt_url=secure.anonymous_url,
        enrolment_token=secure.enrolment_token,
        state_dir=state_dir,
        count=3,
        heartbeat_s=0.5,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
        summary_interval_s=0,
    )
    async with running_controller(settings), service_bus(secure) as ops:
        fleet = Fleet(fleet_settings)
        running = asyncio.create_task(fleet.run())

        async def all_online() -> bool:
            if running.done():
                running.result()
            lookup = ops.new_request(LookupRequest, kind=LookupKind.AGENTS)
            got = await ops.request(RpcMethod.LOOKUP, lookup, LookupReply)
            # Registration alone shows an agent online (epoch 0); its own
            # connection's status, after enrolment, carries its epoch.
            return (
                sum(a.status == "online" and a.epoch > 0 for a in got.agents or []) == 3
                and fleet.all_online.is_set()
            )

        try:
            await async_wait_until(all_online, timeout_s=30, what="3 agents online")
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    for index in range(3):
        state = AgentStateFile.load(state_path(state_dir, index))
        assert state is not None
        assert state.mqtt_password is not None
