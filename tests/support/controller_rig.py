"""A real controller in the test's event loop, and a bus client to talk to it.

``running_controller`` starts ``controller.app.run`` against the test's broker
and database and waits until it is connected; ``Bus`` sends requests, collects
events and reads retained statuses; ``agent_row`` reads the database directly.
"""

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import sqlalchemy as sa

from controller.app import run
from controller.db import Agent
from controller.metrics import Metrics
from controller.settings import Settings
from controller.store import make_engine
from schemas import MessageError, decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentStatus,
    Event,
    RegisterReply,
    RegisterRequest,
    Reply,
    Request,
)
from schemas.topics import RpcMethod, Topics
from schemas.views import AgentView
from tests.support.infra import BrokerHandle
from tests.support.wait import async_wait_until

R = TypeVar("R", bound=Reply)
ROOT = "kbbus/v1"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Rig:
    settings: Settings
    metrics: Metrics
    task: "asyncio.Task[None]"

    def rejected(self, reason: str, channel: str) -> float:
        return self.metrics.value(
            "kbbus_messages_rejected_total", {"reason": reason, "channel": channel}
        )


def controller_settings(
    broker: BrokerHandle, db_url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": broker.url,
        "db_url": db_url,
        "client_id": f"kbbus-controller-test-{uuid.uuid4().hex[:8]}",
        "offline_after_s": 30.0,
        "sweep_interval_s": 0.2,
        "tick_interval_s": 0.2,
        "heartbeat_flush_ms": 50.0,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_controller(settings: Settings) -> AsyncIterator[Rig]:
    metrics = Metrics()
    task = asyncio.create_task(run(settings, metrics=metrics))

    async def connected() -> bool:
        if task.done():
            task.result()  # raises what stopped it
        return metrics.value("kbbus_controller_mqtt_connected") == 1

    try:
        await async_wait_until(connected, timeout_s=20, what="controller connected")
        yield Rig(settings, metrics, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Bus:
    """A test's own MQTT client: requests with replies, events, statuses."""

    def __init__(self, client: aiomqtt.Client, topics: Topics, name: str) -> None:
        self.client = client
        self.topics = topics
        self.reply_to = topics.reply(name)
        self.events: list[Event] = []
        self.statuses: dict[str, AgentStatus] = {}
        self._replies: dict[str, asyncio.Future[bytes]] = {}

    async def _read(self) -> None:
        async for message in self.client.messages:
            with contextlib.suppress(MessageError):
                self._on_message(message)

    def _on_message(self, message: aiomqtt.Message) -> None:
        """Sort a message; tests publish garbage too, which raises MessageError."""
        topic = message.topic.value
        payload = message.payload
        assert isinstance(payload, bytes)
        if topic == self.reply_to:
            request_id = decode(Reply, payload).request_id
            future = self._replies.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(payload)
        elif topic.startswith(f"{self.topics.root}/events/"):
            self.events.append(decode(Event, payload))
        elif topic.endswith("/status") and payload:
            status = decode(AgentStatus, payload)
            self.statuses[status.agent_id] = status

    async def request(
        self,
        method: RpcMethod,
        request: Request,
        reply_model: type[R],
        *,
        timeout_s: float = 5.0,
    ) -> R:
        future = await self.send(method, request)
        async with asyncio.timeout(timeout_s):
            return decode(reply_model, await future)

    async def send(self, method: RpcMethod, request: Request) -> asyncio.Future[bytes]:
        """Publish a request (the broker has it on return); its reply comes later."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[request.request_id] = future
        await self.client.publish(self.topics.rpc(method), encode(request), qos=1)
        return future

    def new_request(self, model: type[Request], **fields: Any) -> Any:
        return model(request_id=uuid.uuid4().hex, reply_to=self.reply_to, **fields)

    async def register(self, hostname: str = "host-1", **fields: Any) -> AgentView:
        request = self.new_request(RegisterRequest, hostname=hostname, **fields)
        reply = await self.request(RpcMethod.REGISTER, request, RegisterReply)
        assert reply.error is None, reply.error
        assert reply.agent is not None
        return reply.agent

    def events_of(self, kind: str, agent_id: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind and e.agent_id == agent_id]


@contextlib.asynccontextmanager
async def bus(broker: BrokerHandle, root: str = ROOT) -> AsyncIterator[Bus]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    async with BusClient(broker.url, name) as client:
        b = Bus(client, Topics(root), name)
        await client.subscribe(b.reply_to, qos=1)
        await client.subscribe(f"{root}/events/#", qos=1)
        await client.subscribe(f"{root}/agents/+/status", qos=1)
        reader = asyncio.create_task(b._read())
        try:
            yield b
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


@dataclass(frozen=True)
class AgentRow:
    status: str
    epoch: int
    last_seen_at: datetime | None
    hostname: str


class Db:
    """Direct reads of the controller's database, off the event loop."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)

    def _row(self, agent_id: str) -> AgentRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    Agent.status, Agent.epoch, Agent.last_seen_at, Agent.hostname
                ).where(Agent.id == agent_id)
            ).one_or_none()
        return None if row is None else AgentRow(*row)

    async def agent(self, agent_id: str) -> AgentRow | None:
        return await asyncio.to_thread(self._row, agent_id)

    async def count(self) -> int:
        def count() -> int:
            with self.engine.connect() as conn:
                return int(
                    conn.execute(sa.select(sa.func.count(Agent.id))).scalar_one()
                )

        return await asyncio.to_thread(count)

    async def wait_status(self, agent_id: str, status: str, timeout_s: float) -> None:
        async def reached() -> bool:
            row = await self.agent(agent_id)
            return row is not None and row.status == status

        await async_wait_until(
            reached, timeout_s=timeout_s, what=f"agent {agent_id} {status}"
        )

    async def wait_connected(self, agent_id: str, epoch: int, timeout_s: float) -> None:
        """Until the agent is online with the connection ``epoch``."""

        async def reached() -> bool:
            row = await self.agent(agent_id)
            return row is not None and (row.status, row.epoch) == ("online", epoch)

        await async_wait_until(
            reached, timeout_s=timeout_s, what=f"agent {agent_id} online at {epoch}"
        )

    def close(self) -> None:
        self.engine.dispose()


@contextlib.contextmanager
def database(db_url: str) -> Any:
    db = Db(db_url)
    try:
        yield db
    finally:
        db.close()


class AgentProcess:
    """``tests.support.mini_agent`` as a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, agent_id: str) -> None:
        self.proc = proc
        self.agent_id = agent_id
        self.epoch = 0

    @classmethod
    async def start(
        cls,
        broker: BrokerHandle,
        agent_id: str,
        *,
        keepalive_s: int = 10,
        heartbeat_s: float = 0.2,
    ) -> "AgentProcess":
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.mini_agent",
            "--url",
            broker.url,
            "--agent-id",
            agent_id,
            "--keepalive-s",
            str(keepalive_s),
            "--heartbeat-s",
            str(heartbeat_s),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        agent = cls(proc, agent_id)
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("ready epoch="), f"agent did not start: {line!r}"
        agent.epoch = int(line.strip().split("=", 1)[1])
        return agent

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def eventually(
    predicate: Callable[[], object], *, timeout_s: float = 5.0, what: str
) -> None:
    """Wait, without blocking the loop, until ``predicate()`` is truthy."""

    async def check() -> object:
        return predicate()

    await async_wait_until(check, timeout_s=timeout_s, what=what)
