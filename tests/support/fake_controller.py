"""A stand-in controller for bridge tests: answers requests, publishes tasks.

It speaks the protocol of ``docs/protocol.md`` from in-memory dicts: agents
register and heartbeat, a trigger makes a workflow of ``steps`` steps whose
tasks are published retained one after another as results come in, look-ups
answer from the same dicts. ``silent`` makes it ignore requests, to test the
bridge's deadlines; ``hold`` keeps it from advancing after a result.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt

from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentState,
    AgentStatus,
    CancelReply,
    CancelRequest,
    ErrorBody,
    ErrorCode,
    Event,
    EventKind,
    HeartbeatReply,
    HeartbeatRequest,
    LookupKind,
    LookupReply,
    LookupRequest,
    RegisterReply,
    RegisterRequest,
    Reply,
    Task,
    TaskCheckReply,
    TaskCheckRequest,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import AgentChannel, RpcMethod, Topics
from schemas.views import AgentView, AttemptView, KBView, StepView, WorkflowView

KB_IDS = ("dns-flush-kb", "disk-cleanup-kb")


@dataclass
class FakeWorkflow:
    workflow_id: str
    agent_id: str
    kb_id: str
    steps: int
    status: str = "running"
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    tasks: list[Task] = field(default_factory=list)
    results: list[TaskResult] = field(default_factory=list)

    def view(self) -> WorkflowView:
        steps = []
        for i in range(self.steps):
            attempts = []
            if i < len(self.tasks):
                done = self.results[i] if i < len(self.results) else None
                attempts.append(
                    AttemptView(
                        attempt=1,
                        task_id=self.tasks[i].task_id,
                        status=done.status.value if done else "dispatched",
                        exit_code=done.exit_code if done else None,
                        output=done.output if done else None,
                    )
                )
            status = attempts[0].status if attempts else "pending"
            steps.append(
                StepView(
                    index=i,
                    step_id=f"s{i}",
                    action="shell.run",
                    status=status,
                    attempts=attempts,
                )
            )
        return WorkflowView(
            workflow_id=self.workflow_id,
            agent_id=self.agent_id,
            kb_id=self.kb_id,
            status=self.status,
            created_at=self.created_at,
            steps=steps,
        )


class FakeController:
    def __init__(self, url: str, root: str = "kbbus/v1", steps: int = 2) -> None:
        self.url = url
        self.topics = Topics(root)
        self.steps = steps
        self.silent = False
        self.hold = False
        self.agents: dict[str, AgentView] = {}
        self.workflows: dict[str, FakeWorkflow] = {}
        self.tasks: dict[str, Task] = {}
        self.results: list[TaskResult] = []
        self.requests: list[tuple[RpcMethod, bytes]] = []
        self.heartbeats: list[str] = []
        #: Replies to use instead of the real handlers, by method.
        self.overrides: dict[RpcMethod, Callable[[Any], Reply]] = {}
        self._client: BusClient | None = None

    @property
    def client(self) -> BusClient:
        assert self._client is not None, "FakeController is not running"
        return self._client

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["FakeController"]:
        async with BusClient(self.url, f"fake-controller-{uuid.uuid4().hex[:8]}") as c:
            self._client = c
            await c.subscribe(self.topics.rpc_filter(), qos=1)
            await c.subscribe(self.topics.all_agents(AgentChannel.RESULTS), qos=1)
            loop = asyncio.create_task(self._loop(c))
            try:
                yield self
            finally:
                loop.cancel()
                # A test that stopped the broker has also ended the loop.
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await loop
                self._client = None

    async def _loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = bytes(message.payload)
            if topic.endswith("/results"):
                await self._on_result(decode(TaskResult, payload))
                continue
            method = self.topics.parse_rpc(topic)
            self.requests.append((method, payload))
            if self.silent:
                continue
            request_cls, handler = self._handlers[method]
            request = decode(request_cls, payload)
            if method in self.overrides:
                reply = self.overrides[method](request)
            else:
                reply = await handler(self, request)
            await client.publish(request.reply_to, encode(reply), qos=1)

    # --- helpers for tests ------------------------------------------------------
    def add_agent(self, agent_id: str | None = None) -> AgentView:
        view = AgentView(
            agent_id=agent_id or str(uuid.uuid4()),
            hostname="test-host",
            status="online",
            registered_at=datetime.now(UTC),
        )
        self.agents[view.agent_id] = view
        return view

    async def announce(self, agent_id: str) -> None:
        """Publish the agent's retained status, as the controller does."""
        status = AgentStatus(agent_id=agent_id, state=AgentState.ONLINE, epoch=0)
        await self.client.publish(
            self.topics.status(agent_id), encode(status), qos=1, retain=True
        )

    async def publish_task(
        self, agent_id: str, workflow_id: str = "wf-manual", step_index: int = 0
    ) -> Task:
        now = datetime.now(UTC)
        task = Task(
            task_id=uuid.uuid4().hex,
            agent_id=agent_id,
            workflow_id=workflow_id,
            kb_id="dns-flush-kb",
            step_id=f"s{step_index}",
            step_index=step_index,
            attempt=1,
            action="shell.run",
            args={"cmd": "echo hi"},
            timeout_s=30,
            issued_at=now,
            expires_at=now + timedelta(seconds=30),
        )
        self.tasks[task.task_id] = task
        await self.client.publish(
            self.topics.tasks(agent_id), encode(task), qos=1, retain=True
        )
        return task

    async def clear_task(self, agent_id: str) -> None:
        await self.client.publish(self.topics.tasks(agent_id), b"", qos=1, retain=True)

    async def publish_event(self, event: Event) -> None:
        if event.workflow_id is not None:
            topic = self.topics.workflow_event(event.workflow_id, event.kind.value)
        else:
            assert event.agent_id is not None
            topic = self.topics.agent_event(event.agent_id, event.kind.value)
        await self.client.publish(topic, encode(event), qos=1)

    # --- request handlers ---------------------------------------------------------
    async def _register(self, req: RegisterRequest) -> Reply:
        view = AgentView(
            agent_id=req.agent_id or str(uuid.uuid4()),
            hostname=req.hostname,
            ip_address=req.ip_address,
            os=req.os,
            status="online",
            last_seen_at=datetime.now(UTC),
            registered_at=datetime.now(UTC),
        )
        self.agents[view.agent_id] = view
        await self.announce(view.agent_id)
        return RegisterReply(request_id=req.request_id, agent=view)

    async def _heartbeat(self, req: HeartbeatRequest) -> Reply:
        if req.agent_id not in self.agents:
            return HeartbeatReply(
                request_id=req.request_id, error=_err(ErrorCode.NOT_FOUND, "agent")
            )
        self.heartbeats.append(req.agent_id)
        return HeartbeatReply(request_id=req.request_id)

    async def _trigger(self, req: TriggerRequest) -> Reply:
        if req.agent_id not in self.agents:
            return TriggerReply(
                request_id=req.request_id, error=_err(ErrorCode.NOT_FOUND, "agent")
            )
        if req.kb_id not in KB_IDS:
            return TriggerReply(
                request_id=req.request_id, error=_err(ErrorCode.NOT_FOUND, "KB")
            )
        wf = FakeWorkflow(uuid.uuid4().hex, req.agent_id, req.kb_id, self.steps)
        self.workflows[wf.workflow_id] = wf
        wf.tasks.append(await self.publish_task(req.agent_id, wf.workflow_id, 0))
        return TriggerReply(request_id=req.request_id, workflow=wf.view(), created=True)

    async def _task_check(self, req: TaskCheckRequest) -> Reply:
        task = self.tasks.get(req.task_id)
        error = None
        if req.agent_id not in self.agents or task is None:
            error = _err(ErrorCode.NOT_FOUND, "agent or task")
        elif task.agent_id != req.agent_id:
            error = _err(ErrorCode.CONFLICT, "another agent's task")
        return TaskCheckReply(request_id=req.request_id, error=error)

    async def _cancel(self, req: CancelRequest) -> Reply:
        wf = self.workflows.get(req.workflow_id)
        if wf is None:
            return CancelReply(
                request_id=req.request_id, error=_err(ErrorCode.NOT_FOUND, "workflow")
            )
        wf.status = "canceled"
        await self.clear_task(wf.agent_id)
        return CancelReply(request_id=req.request_id, workflow=wf.view())

    async def _lookup(self, req: LookupRequest) -> Reply:
        rid = req.request_id
        if req.kind is LookupKind.AGENT:
            found = self.agents.get(req.id or "")
            if found is None:
                return LookupReply(request_id=rid, error=_err(ErrorCode.NOT_FOUND, "x"))
            return LookupReply(request_id=rid, agents=[found])
        if req.kind is LookupKind.AGENTS:
            return LookupReply(request_id=rid, agents=list(self.agents.values()))
        if req.kind is LookupKind.WORKFLOW:
            wf = self.workflows.get(req.id or "")
            if wf is None:
                return LookupReply(request_id=rid, error=_err(ErrorCode.NOT_FOUND, "x"))
            return LookupReply(request_id=rid, workflows=[wf.view()])
        if req.kind is LookupKind.WORKFLOWS:
            views = [
                w.view()
                for w in self.workflows.values()
                if req.agent_id in (None, w.agent_id)
            ]
            return LookupReply(request_id=rid, workflows=views)
        kbs = [KBView(kb_id=k, title=k, steps=[{"id": "s0"}]) for k in KB_IDS]
        return LookupReply(request_id=rid, kbs=kbs)

    async def _on_result(self, result: TaskResult) -> None:
        self.results.append(result)
        task = self.tasks.get(result.task_id)
        if task is None or self.hold:
            return
        wf = self.workflows.get(task.workflow_id)
        if wf is None or wf.status != "running":
            return
        if any(r.task_id == result.task_id for r in wf.results):
            return  # a duplicate changes nothing
        wf.results.append(result)
        if result.status.value == "failed":
            wf.status = "failed"
        elif len(wf.results) < wf.steps:
            index = len(wf.results)
            wf.tasks.append(await self.publish_task(wf.agent_id, wf.workflow_id, index))
            return
        else:
            wf.status = "succeeded"
        await self.clear_task(wf.agent_id)
        await self.publish_event(
            Event(
                kind=EventKind.WORKFLOW_FINISHED,
                agent_id=wf.agent_id,
                workflow_id=wf.workflow_id,
                data={"status": wf.status},
            )
        )

    _handlers: dict[RpcMethod, tuple[type[Any], Any]] = {
        RpcMethod.REGISTER: (RegisterRequest, _register),
        RpcMethod.HEARTBEAT: (HeartbeatRequest, _heartbeat),
        RpcMethod.TRIGGER: (TriggerRequest, _trigger),
        RpcMethod.TASK_CHECK: (TaskCheckRequest, _task_check),
        RpcMethod.CANCEL: (CancelRequest, _cancel),
        RpcMethod.LOOKUP: (LookupRequest, _lookup),
    }


def _err(code: ErrorCode, what: str) -> ErrorBody:
    return ErrorBody(code=code, message=f"fake controller: unknown or refused {what}")
