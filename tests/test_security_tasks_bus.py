"""Signed tasks end to end: the real controller, a real MQTT agent, a broker.

Workflows run with signed tasks; forged, misaddressed, expired and replayed
envelopes put on the agent's task topic are refused and reported on its
results topic; a key rotation reaches the agent through the retained key set,
without a new registration, and the next workflow runs on the new key.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_sim.runtime import MqttAgent
from agent_sim.settings import Settings as AgentSettings
from agent_sim.trust import Mode
from controller.signing import Keyring, rotate
from schemas import decode, encode
from schemas.messages import (
    LookupKind,
    LookupReply,
    LookupRequest,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
    utcnow,
)
from schemas.signing import b64url, canonical_task
from schemas.topics import RpcMethod, Topics
from tests.support.controller_rig import (
    Bus,
    bus,
    controller_settings,
    running_controller,
)
from tests.support.infra import BrokerHandle
from tests.support.wait import async_wait_until

ROOT = "kbbus/v1"


@dataclass
class Seen:
    results: list[TaskResult] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    registrations: int = 0


@contextlib.asynccontextmanager
async def watching(
    broker: BrokerHandle, agent_id: str
) -> AsyncIterator[tuple[aiomqtt.Client, Seen]]:
    topics = Topics(ROOT)
    seen = Seen()
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"watch-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(
            [
                (topics.results(agent_id), 1),
                (topics.tasks(agent_id), 1),
                (topics.rpc(RpcMethod.REGISTER), 1),
            ]
        )

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                topic = message.topic.value
                if topic == topics.results(agent_id):
                    seen.results.append(decode(TaskResult, payload))
                elif topic == topics.tasks(agent_id) and payload:
                    seen.tasks.append(decode(Task, payload))
                elif topic == topics.rpc(RpcMethod.REGISTER):
                    seen.registrations += 1

        reader = asyncio.create_task(read())
        try:
            yield client, seen
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


async def run_workflow(b: Bus, agent_id: str) -> str:
    trigger = b.new_request(
        TriggerRequest, agent_id=agent_id, kb_id="dns-flush-kb", params={}
    )
    reply = await b.request(RpcMethod.TRIGGER, trigger, TriggerReply)
    assert reply.workflow is not None, reply.error
    workflow_id = reply.workflow.workflow_id

    status = "queued"

    async def finished() -> bool:
        nonlocal status
        lookup = b.new_request(LookupRequest, kind=LookupKind.WORKFLOW, id=workflow_id)
        answer = await b.request(RpcMethod.LOOKUP, lookup, LookupReply)
        assert answer.workflows is not None
        status = answer.workflows[0].status
        return status not in ("queued", "running")

    await async_wait_until(finished, timeout_s=15, what="workflow finished")
    return status


async def result_of(seen: Seen, task_id: str, start: int, what: str) -> TaskResult:
    def found() -> list[TaskResult]:
        return [r for r in seen.results[start:] if r.task_id == task_id]

    async def reported() -> bool:
        return bool(found())

    await async_wait_until(reported, timeout_s=10, what=f"refusal '{what}' reported")
    return found()[0]


def a_task(agent_id: str, *, expires_in_s: float = 30) -> Task:
    now = utcnow()
    return Task(
        task_id=str(uuid.uuid4()),
        agent_id=agent_id,
        workflow_id="wf-forged",
        kb_id="dns-flush-kb",
        step_id="flush",
        step_index=0,
        attempt=1,
        action="echo",
        args={"text": "hello"},
        timeout_s=30,
        issued_at=now,
        expires_at=now + timedelta(seconds=expires_in_s),
    )


def signed_by(key: Ed25519PrivateKey, key_id: str, task: Task, nonce: str) -> Task:
    unsigned = task.model_copy(update={"key_id": key_id, "nonce": nonce})
    signature = b64url(key.sign(canonical_task(unsigned)))
    return unsigned.model_copy(update={"signature": signature})


async def test_signed_tasks_refusals_and_rotation_over_the_bus(
    broker: BrokerHandle, sqlite_url: str, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    settings = controller_settings(
        broker, sqlite_url, signing_key_dir=key_dir, signing_key_check_s=0.1
    )
    agent = MqttAgent(
        AgentSettings(
            mqtt_url=broker.url,
            state_dir=tmp_path / "agent",
            heartbeat_s=0.5,
            reconnect_min_s=0.1,
            reconnect_max_s=1.0,
        )
    )
    agent_id = agent.agent_id
    topics = Topics(ROOT)
    async with (
        running_controller(settings),
        bus(broker) as b,
        watching(broker, agent_id) as (client, seen),
    ):
        running = asyncio.create_task(agent.run())
        try:

            async def registered() -> bool:
                return agent.registered and agent.trust.mode is Mode.SIGNED

            await async_wait_until(registered, timeout_s=15, what="agent registered")
            keyring = Keyring.load(key_dir)
            assert agent.trust.key_ids == keyring.key_ids
            assert await run_workflow(b, agent_id) == "succeeded"
            first_tasks = list(seen.tasks)
            assert first_tasks
            assert {t.key_id for t in first_tasks} == {keyring.active_key_id}

            # Envelopes nobody should accept, each on the agent's own topic.
            mallory = Ed25519PrivateKey.generate()
            done = first_tasks[0]
            assert done.nonce is not None
            key = keyring._keys[0]
            forged = signed_by(
                mallory, keyring.active_key_id, a_task(agent_id), "n-forged"
            )
            misaddressed = keyring.sign_task(a_task("some-other-agent"))
            expired = keyring.sign_task(a_task(agent_id, expires_in_s=-5))
            replayed = signed_by(key.private, key.key_id, done, "n-other")
            for task, error in [
                (forged, "refused: bad signature"),
                (misaddressed, "refused: misaddressed"),
                (expired, "refused: expired"),
                (replayed, "refused: replayed"),
            ]:
                before = len(seen.results)
                await client.publish(
                    topics.tasks(agent_id), encode(task), qos=1, retain=True
                )

                result = await result_of(seen, task.task_id, before, error)
                assert (result.agent_id, result.status) == (agent_id, "failed")
                assert result.error == error
            await client.publish(topics.tasks(agent_id), b"", qos=1, retain=True)
            assert agent.core.counters.tasks_done == len(first_tasks)

            # Rotation: no new registration, the agent learns the key from the
            # retained set, and the next workflow's tasks carry it.
            registrations = seen.registrations
            new_id = rotate(key_dir)

            async def learnt() -> bool:
                return agent.trust.key_ids[:1] == [new_id]

            await async_wait_until(learnt, timeout_s=10, what="agent trusts new key")
            seen.tasks.clear()
            assert await run_workflow(b, agent_id) == "succeeded"
            assert seen.tasks
            assert {t.key_id for t in seen.tasks} == {new_id}
            assert seen.registrations == registrations
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
