"""Workflows end to end: a real controller, simulated agents, broker, database.

Runs on amqtt and Mosquitto, SQLite and PostgreSQL. The agents are
``agent_sim`` agents in the test's event loop; the controller runs in the
loop too, or as a child process where a test SIGKILLs it.
"""

import asyncio
import contextlib
import itertools
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from agent_sim.app import run as run_agents
from agent_sim.settings import Settings as AgentSettings
from controller.db import Agent, Workflow
from controller.engine import Engine
from controller.kb import KBCatalog
from controller.store import make_engine, upgrade
from schemas import decode
from schemas.bus import BusClient
from schemas.messages import (
    LookupKind,
    LookupReply,
    LookupRequest,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import AgentChannel, RpcMethod, Topics
from schemas.views import FINAL_WORKFLOW_STATES, WorkflowView
from tests.support.controller_rig import (
    Bus,
    bus,
    controller_settings,
    running_controller,
)
from tests.support.infra import BrokerHandle
from tests.support.wait import async_wait_until

TOPICS = Topics()
SHIPPED_RUNS: list[tuple[str, dict[str, object]]] = [
    ("dns-flush-kb", {"name": "example.org"}),
    ("disk-cleanup-kb", {"path": "/tmp", "older_than_days": 3}),
    ("service-restart-kb", {"service": "nginx"}),
    ("collect-diagnostics-kb", {}),
]


class Db:
    """Workflow views and agent ids straight from the controller's database."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        self.views = Engine(KBCatalog.load(), TOPICS)

    def _online(self) -> list[str]:
        with Session(self.engine) as session:
            query = sa.select(Agent.id).where(Agent.status == "online")
            return sorted(session.scalars(query))

    async def online_agents(self, count: int) -> list[str]:
        async def enough() -> list[str]:
            ids = await asyncio.to_thread(self._online)
            return ids if len(ids) >= count else []

        return await async_wait_until(enough, timeout_s=20, what="agents online")

    def _workflows(self) -> list[WorkflowView]:
        with Session(self.engine) as session:
            ids = session.scalars(sa.select(Workflow.id).order_by(Workflow.id))
            return [self.views.workflow_view(session, i) for i in ids]

    async def workflows(self) -> list[WorkflowView]:
        return await asyncio.to_thread(self._workflows)

    async def wait_all_final(self, count: int, timeout_s: float) -> list[WorkflowView]:
        async def done() -> list[WorkflowView]:
            views = await self.workflows()
            final = [v for v in views if v.status in FINAL_WORKFLOW_STATES]
            return views if len(final) == count else []

        return await async_wait_until(done, timeout_s=timeout_s, what="workflows end")

    async def steps_done(self) -> int:
        views = await self.workflows()
        return sum(1 for v in views for s in v.steps if s.status == "succeeded")


@pytest.fixture
def db(db_url: str) -> Iterator[Db]:
    # The controller migrates on start too; doing it first lets the test poll
    # tables before a controller child process is up.
    upgrade(db_url)
    database = Db(db_url)
    yield database
    database.engine.dispose()


@contextlib.asynccontextmanager
async def agents(
    broker: BrokerHandle, state_dir: Path, count: int, latency_ms: float = 0
) -> AsyncIterator[None]:
    settings = AgentSettings(
        mqtt_url=broker.url,
        count=count,
        state_dir=state_dir,
        heartbeat_s=1,
        latency_ms=latency_ms,
        seed=7,
        summary_interval_s=0,
        reconnect_min_s=0.1,
        reconnect_max_s=1,
    )
    task = asyncio.create_task(run_agents(settings))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def trigger(
    b: Bus, agent_id: str, kb_id: str, params: dict[str, object]
) -> WorkflowView:
    request = b.new_request(
        TriggerRequest, agent_id=agent_id, kb_id=kb_id, params=params
    )
    reply = await b.request(RpcMethod.TRIGGER, request, TriggerReply)
    assert reply.error is None, reply.error
    assert reply.workflow is not None
    return reply.workflow


def assert_each_step_ran_once(views: list[WorkflowView]) -> None:
    for view in views:
        assert view.status == "succeeded", view
        for step in view.steps:
            (attempt,) = step.attempts
            assert attempt.status == "succeeded", (view.kb_id, step)
            assert attempt.output


async def test_each_shipped_kb_runs_to_success_over_mqtt(
    broker: BrokerHandle, db_url: str, db: Db, tmp_path: Path
) -> None:
    settings = controller_settings(broker, db_url)
    async with (
        running_controller(settings) as rig,
        bus(broker) as b,
        agents(broker, tmp_path / "agents", count=1),
    ):
        (agent_id,) = await db.online_agents(1)
        triggered = [
            await trigger(b, agent_id, kb_id, params) for kb_id, params in SHIPPED_RUNS
        ]
        # One workflow at a time on an agent: the others wait, in order.
        assert [w.status for w in triggered][1:] == ["queued"] * 3
        views = await db.wait_all_final(len(SHIPPED_RUNS), timeout_s=30)

        # Counted once each transition is committed, before its publishes.
        async def all_counted() -> bool:
            finished = rig.metrics.value(
                "kbbus_workflows_finished_total", {"status": "succeeded"}
            )
            return finished == len(SHIPPED_RUNS)

        await async_wait_until(
            all_counted, timeout_s=5, what="every finished workflow counted"
        )

    steps = sum(len(v.steps) for v in views)
    m = rig.metrics
    assert (
        m.value("kbbus_step_duration_seconds_count", {"status": "succeeded"}) == steps
    )
    assert m.value("kbbus_step_duration_seconds_sum", {"status": "succeeded"}) > 0
    # Every step's task, and the clear after each workflow, reached the broker.
    assert m.value("kbbus_messages_published_total", {"kind": "tasks"}) >= steps
    assert m.value("kbbus_messages_published_total", {"kind": "events"}) > 0
    assert m.value("kbbus_db_batch_size_sum", {"channel": "results"}) >= steps
    assert m.value("kbbus_db_transaction_seconds_count", {"channel": "results"}) >= 1

    assert_each_step_ran_once(views)
    by_id = {v.workflow_id: v for v in views}
    ordered = [by_id[w.workflow_id] for w in triggered]
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.finished_at is not None
        assert later.started_at is not None
        assert earlier.finished_at <= later.started_at
    finished = [e for e in b.events if e.kind == "workflow.finished"]
    assert sorted(e.workflow_id or "" for e in finished) == sorted(by_id)


@contextlib.asynccontextmanager
async def controller_process(
    broker: BrokerHandle, db_url: str, client_id: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "--mqtt-url",
        broker.url,
        "--db-url",
        db_url,
        "--client-id",
        client_id,
        "--tick-interval-s",
        "0.2",
        "--log-level",
        "WARNING",
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class Watch:
    """Every task and result on the bus, as the broker delivers them."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.results: list[TaskResult] = []

    def answered(self) -> set[str]:
        return {r.task_id for r in self.results}

    def unanswered(self) -> set[str]:
        return set(self.tasks) - self.answered()


@contextlib.asynccontextmanager
async def bus_watch(broker: BrokerHandle) -> AsyncIterator[Watch]:
    watch = Watch()
    async with BusClient(broker.url, f"watch-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(TOPICS.all_agents(AgentChannel.RESULTS), qos=1)
        await client.subscribe(TOPICS.all_agents(AgentChannel.TASKS), qos=1)

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                if message.topic.value.endswith("/results"):
                    watch.results.append(decode(TaskResult, payload))
                elif payload:
                    task = decode(Task, payload)
                    watch.tasks[task.task_id] = task

        reader = asyncio.create_task(read())
        try:
            yield watch
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


async def controller_answers(b: Bus) -> None:
    async def answered() -> bool:
        request = b.new_request(LookupRequest, kind=LookupKind.KBS)
        try:
            await b.request(RpcMethod.LOOKUP, request, LookupReply, timeout_s=0.5)
        except TimeoutError:
            return False
        return True

    await async_wait_until(answered, timeout_s=20, what="controller answers")


@pytest.mark.slow
async def test_sigkilled_controller_finishes_every_workflow_after_restart(
    broker: BrokerHandle, db_url: str, db: Db, tmp_path: Path
) -> None:
    client_id = f"kbbus-controller-kill-{uuid.uuid4().hex[:8]}"
    async with (
        contextlib.AsyncExitStack() as stack,
        bus(broker) as b,
        bus_watch(broker) as watch,
    ):
        async with controller_process(broker, db_url, client_id) as first:
            await controller_answers(b)
            await stack.enter_async_context(
                agents(broker, tmp_path / "agents", count=2, latency_ms=150)
            )
            agent_ids = await db.online_agents(2)
            for agent_id in agent_ids:
                for kb_id, params in SHIPPED_RUNS[1::2]:
                    await trigger(b, agent_id, kb_id, params)

            # Kill while an agent has a task in hand: its result then comes
            # while no controller listens.
            async def mid_workflow() -> set[str]:
                in_hand = watch.unanswered()
                return in_hand if in_hand and await db.steps_done() >= 2 else set()

            in_hand = await async_wait_until(
                mid_workflow, timeout_s=20, what="a task in an agent's hands"
            )
            first.kill()
            await first.wait()

        async def answered_while_down() -> bool:
            return bool(in_hand & watch.answered())

        await async_wait_until(answered_while_down, timeout_s=10, what="late result")

        async with controller_process(broker, db_url, client_id):
            views = await db.wait_all_final(4, timeout_s=40)

    assert_each_step_ran_once(views)
    # An agent that sees a task again answers with the stored result: every
    # result of one task is the same result, so no task ran twice.
    by_task: dict[str, set[object]] = {}
    for result in watch.results:
        by_task.setdefault(result.task_id, set()).add(result.finished_at)
    assert all(len(times) == 1 for times in by_task.values()), by_task
    task_ids = {a.task_id for v in views for s in v.steps for a in s.attempts}
    assert task_ids <= set(by_task)
