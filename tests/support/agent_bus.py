"""A stand-in for the controller's bus side, for the agent tests.

It answers ``rpc/register`` the way docs/protocol.md says, publishes retained
tasks, and records every result, status and heartbeat it sees. It checks what
agents send; it does not run workflows.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import aiomqtt

from schemas import decode, encode
from schemas.messages import (
    AgentStatus,
    RegisterReply,
    RegisterRequest,
    Task,
    TaskResult,
    utcnow,
)
from schemas.topics import AgentChannel, RpcMethod, Topics
from schemas.views import AgentView
from tests.support.infra import BrokerHandle


def make_task(
    agent_id: str,
    action: str = "echo",
    args: dict[str, object] | None = None,
    *,
    timeout_s: float = 30.0,
    expires_in_s: float | None = None,
) -> Task:
    now = utcnow()
    expires_in_s = timeout_s if expires_in_s is None else expires_in_s
    return Task(
        task_id=uuid.uuid4().hex,
        agent_id=agent_id,
        workflow_id=uuid.uuid4().hex,
        kb_id="test-kb",
        step_id="step",
        step_index=0,
        attempt=1,
        action=action,
        args=args or {},
        timeout_s=timeout_s,
        expires_at=now + timedelta(seconds=expires_in_s),
    )


class AgentBus:
    """What the fake controller has seen, and how to hand agents tasks."""

    def __init__(self, client: aiomqtt.Client, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.registrations: list[RegisterRequest] = []
        self.results: list[TaskResult] = []
        self.statuses: list[AgentStatus] = []
        self.heartbeats: list[str] = []
        self.changed = asyncio.Event()

    async def publish_task(self, task: Task) -> None:
        await self.client.publish(
            self.topics.tasks(task.agent_id), encode(task), qos=1, retain=True
        )

    async def clear_task(self, agent_id: str) -> None:
        await self.client.publish(self.topics.tasks(agent_id), b"", qos=1, retain=True)

    async def wait_for(
        self, predicate: Callable[["AgentBus"], bool], timeout_s: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` holds, woken by every message seen."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

    def results_for(self, task_id: str) -> list[TaskResult]:
        return [r for r in self.results if r.task_id == task_id]

    def statuses_of(self, agent_id: str) -> list[AgentStatus]:
        return [s for s in self.statuses if s.agent_id == agent_id]

    def online(self, agent_id: str) -> bool:
        statuses = self.statuses_of(agent_id)
        return bool(statuses) and statuses[-1].state == "online"

    async def _serve(self) -> None:
        async for message in self.client.messages:
            topic = message.topic.value
            payload = message.payload
            assert isinstance(payload, bytes)
            if topic == self.topics.rpc(RpcMethod.REGISTER):
                await self._register(payload)
            elif payload:
                agent = self.topics.parse_agent(topic)
                if agent.channel is AgentChannel.RESULTS:
                    self.results.append(decode(TaskResult, payload))
                elif agent.channel is AgentChannel.STATUS:
                    self.statuses.append(decode(AgentStatus, payload))
                elif agent.channel is AgentChannel.HEARTBEAT:
                    self.heartbeats.append(agent.agent_id)
            self.changed.set()

    async def _register(self, payload: bytes) -> None:
        request = decode(RegisterRequest, payload)
        self.registrations.append(request)
        view = AgentView(
            agent_id=request.agent_id or str(uuid.uuid4()),
            hostname=request.hostname,
            status="offline",
            registered_at=utcnow(),
        )
        reply = RegisterReply(request_id=request.request_id, agent=view)
        await self.client.publish(request.reply_to, encode(reply), qos=1)


@contextlib.asynccontextmanager
async def agent_bus(
    broker: BrokerHandle, root: str = "kbbus/v1"
) -> AsyncIterator[AgentBus]:
    topics = Topics(root)
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"fake-controller-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(
            [
                (topics.rpc(RpcMethod.REGISTER), 1),
                (topics.all_agents(AgentChannel.RESULTS), 1),
                (topics.all_agents(AgentChannel.STATUS), 1),
                (topics.all_agents(AgentChannel.HEARTBEAT), 0),
            ]
        )
        bus = AgentBus(client, topics)
        serving = asyncio.create_task(bus._serve())
        try:
            yield bus
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await serving
