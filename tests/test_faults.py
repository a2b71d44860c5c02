"""Faults survived: processes killed for real, a broker and a database restarted.

Every test runs real processes (controller, agents, bridge) against Mosquitto
with persistence and PostgreSQL, breaks one thing mid-workflow, and ends with
the same audit (``tests.support.system.check_no_loss``), read from the
controller's tables and from the agents' own state files: every workflow
finished, each step executed once, every result an agent produced is the one
in the database. Network faults are in ``test_faults_network.py``.
"""

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from controller.store import upgrade
from kbbus.stack import Process
from schemas import decode
from schemas.bus import BusClient
from schemas.messages import AgentState, AgentStatus, ResultStatus, Task, TaskResult
from schemas.topics import AgentChannel, Topics
from tests.support.controller_rig import bus
from tests.support.infra import BrokerHandle, free_port, fresh_postgres_database
from tests.support.pg_cluster import private_postgres
from tests.support.system import (
    FAULT_KB_STEPS,
    AgentRecord,
    Audit,
    Children,
    agents_process,
    bridge_process,
    check_no_loss,
    controller_answers,
    controller_process,
    http_agents_process,
    read_records,
    stop,
    trigger,
    write_kbs,
)
from tests.support.wait import async_wait_until

TOPICS = Topics()
pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        # Migrated first, so the audit can read the tables before the
        # controller process is up.
        upgrade(url)
        yield url


@pytest.fixture
def kb_dir(tmp_path: Path) -> Path:
    return write_kbs(tmp_path / "kbs")


def client_id() -> str:
    return f"kbbus-controller-fault-{uuid.uuid4().hex[:8]}"


async def test_controller_sigkilled_twice_mid_workflow_loses_nothing(
    mosquitto_broker: BrokerHandle, pg_url: str, kb_dir: Path, tmp_path: Path
) -> None:
    """Invariant: a controller SIGKILLed mid-workflow (twice) and restarted
    finishes every workflow; each step ran exactly once (one attempt, the
    agent's result equal to the database's); every result an agent produced,
    many of them while no controller ran, is in the database."""
    broker = mosquitto_broker
    state_dir = tmp_path / "agents"
    audit = Audit(pg_url, [state_dir])
    cid = client_id()

    def new_controller() -> Process:
        return controller_process(
            tmp_path, broker.url, pg_url, client_id=cid, kb_dir=kb_dir
        )

    with Children() as children:
        async with bus(broker) as b:
            controller = children.start(new_controller())
            await controller_answers(b)
            children.start(
                agents_process(tmp_path, broker.url, state_dir, count=4, latency_ms=250)
            )
            agent_ids = await audit.online(4)
            for agent_id in agent_ids * 2:
                await trigger(b, agent_id)
            total = len(agent_ids) * 2
            answered_while_down = 0
            for finished_before_kill in (3, 10):

                async def progressed(n: int = finished_before_kill) -> bool:
                    return await audit.steps_finished() >= n

                await async_wait_until(progressed, timeout_s=30, what="progress")
                await stop(controller, signal.SIGKILL)
                # Agents keep answering while no controller runs: let results
                # pile up in the broker for the controller's session.
                before = await audit.snapshot(records=True)
                await asyncio.sleep(1.0)
                after = await audit.snapshot(records=True)
                answered_while_down += after.results() - before.results()
                controller = children.start(new_controller())
                await controller_answers(b)
            snap = await audit.all_final(total, timeout_s=60)
    audit.close()
    check_no_loss(snap)
    assert len(snap.workflows) == total
    # Else the kills missed the point: no result waited for a controller.
    assert answered_while_down > 0


async def test_agent_sigkilled_mid_step_finishes_the_step_once(
    mosquitto_broker: BrokerHandle, pg_url: str, kb_dir: Path, tmp_path: Path
) -> None:
    """Invariant: an agent SIGKILLed while a step runs, restarted with its
    state file, gets its retained task again and does not run it again: the
    killed attempt ends once (``failed``, interrupted, the agent's own
    record), the retry succeeds, every other step ran once."""
    broker = mosquitto_broker
    state_dir = tmp_path / "agents"
    audit = Audit(pg_url, [state_dir])

    def new_agent() -> Process:
        return agents_process(tmp_path, broker.url, state_dir, count=1, latency_ms=800)

    with Children() as children:
        async with bus(broker) as b:
            children.start(
                controller_process(
                    tmp_path, broker.url, pg_url, client_id=client_id(), kb_dir=kb_dir
                )
            )
            await controller_answers(b)
            agent = children.start(new_agent())
            (agent_id,) = await audit.online(1)
            await trigger(b, agent_id)
            await trigger(b, agent_id)

            async def running() -> list[str]:
                records = await asyncio.to_thread(read_records, [state_dir])
                record = records.get(agent_id)
                return record.started if record and len(record.finished) >= 1 else []

            (killed_task,) = await async_wait_until(
                running, timeout_s=30, what="a step running on the agent"
            )
            await stop(agent, signal.SIGKILL)
            children.start(new_agent())
            snap = await audit.all_final(2, timeout_s=60)
    audit.close()
    check_no_loss(snap, retries_allowed=True)
    killed = next(s for s in snap.steps if s.task_id == killed_task)
    assert killed.status == "failed"
    assert killed.error is not None
    assert killed.error.startswith("interrupted")
    retried = [
        s
        for s in snap.steps_of(killed.workflow_id)
        if s.step_index == killed.step_index
    ]
    assert [
        (s.attempt, s.status) for s in sorted(retried, key=lambda s: s.attempt)
    ] == [
        (1, "failed"),
        (2, "succeeded"),
    ]
    others = [
        s
        for s in snap.steps
        if s.step_index != killed.step_index or (s.workflow_id != killed.workflow_id)
    ]
    assert all(s.attempt == 1 and s.status == "succeeded" for s in others), others


async def test_postgres_restart_while_results_and_heartbeats_flow(
    mosquitto_broker: BrokerHandle, kb_dir: Path, tmp_path: Path
) -> None:
    """Invariant: with PostgreSQL down, the controller waits and retries (it
    does not crash, it acknowledges nothing it has not committed) and catches
    up once the database is back. Twice: a clean stop, then a crash of the
    database during which the controller is SIGKILLed too, so the results it
    held unacknowledged must come back from the broker. No result is lost,
    no step runs twice."""
    broker = mosquitto_broker
    state_dir = tmp_path / "agents"
    cid = client_id()
    with private_postgres() as pg, Children() as children:
        upgrade(pg.url)
        audit = Audit(pg.url, [state_dir])

        def new_controller() -> Process:
            return controller_process(
                tmp_path, broker.url, pg.url, client_id=cid, kb_dir=kb_dir
            )

        async with bus(broker) as b:
            controller = children.start(new_controller())
            await controller_answers(b)
            children.start(
                agents_process(
                    tmp_path,
                    broker.url,
                    state_dir,
                    count=4,
                    latency_ms=250,
                    heartbeat_s=0.3,
                )
            )
            agent_ids = await audit.online(4)
            for agent_id in agent_ids * 3:
                await trigger(b, agent_id)
            total = len(agent_ids) * 3

            async def finished(n: int) -> None:
                async def enough() -> bool:
                    return await audit.steps_finished() >= n

                await async_wait_until(enough, timeout_s=30, what=f"{n} steps")

            async def results() -> int:
                records = await asyncio.to_thread(read_records, [state_dir])
                return sum(len(r.finished) for r in records.values())

            async def answered_since(before: int) -> None:
                """Until the agents answered more (the database is down)."""

                async def more() -> bool:
                    return await results() > before

                await async_wait_until(more, timeout_s=10, what="results while down")

            await finished(3)
            # 1. A clean stop: the controller retries until it is back.
            before = await results()
            await asyncio.to_thread(pg.stop, "fast")
            await answered_since(before)
            assert controller.alive()
            await asyncio.to_thread(pg.start)
            await finished(12)
            # 2. A crash, and the controller killed while it waits.
            before = await results()
            await asyncio.to_thread(pg.stop, "immediate")
            await answered_since(before)
            await stop(controller, signal.SIGKILL)
            await asyncio.to_thread(pg.start)
            children.start(new_controller())
            snap = await audit.all_final(total, timeout_s=60)
        audit.close()
    log = (tmp_path / "controller.log").read_text()
    assert "database unavailable" in log
    assert "database available again" in log
    check_no_loss(snap)
    assert len(snap.workflows) == total


async def retained(broker: BrokerHandle) -> dict[str, bytes]:
    """Every retained status and task on the broker now.

    A marker published after the subscription arrives after the retained
    messages the subscription brought, so its arrival means all are in.
    """
    marker = f"kbbus-test/marker/{uuid.uuid4().hex}"
    found: dict[str, bytes] = {}
    async with BusClient(broker.url, f"retained-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(
            [
                (TOPICS.all_agents(AgentChannel.STATUS), 1),
                (TOPICS.all_agents(AgentChannel.TASKS), 1),
                (marker, 1),
            ]
        )
        await client.publish(marker, b"x", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                if message.topic.value == marker:
                    break
                assert isinstance(message.payload, bytes)
                if message.retain and message.payload:
                    found[message.topic.value] = message.payload
    return found


def signal_all(processes: list[Process], sig: signal.Signals) -> None:
    for process in processes:
        process.signal(sig)


async def test_broker_restart_keeps_retained_messages_and_loses_no_result(
    mosquitto_broker: BrokerHandle, pg_url: str, kb_dir: Path, tmp_path: Path
) -> None:
    """Invariant: Mosquitto (persistence on) restarted twice mid-workflow:
    under load, the controller and the agents reconnect by themselves and no
    in-flight QoS 1 result is lost; with everyone frozen (SIGSTOP), every
    retained status and task is the same after the restart as before. Every
    workflow finishes, each step once."""
    broker = mosquitto_broker
    state_dir = tmp_path / "agents"
    audit = Audit(pg_url, [state_dir])
    with Children() as children:
        async with bus(broker) as b:
            controller = children.start(
                controller_process(
                    tmp_path, broker.url, pg_url, client_id=client_id(), kb_dir=kb_dir
                )
            )
            await controller_answers(b)
            agents = children.start(
                agents_process(tmp_path, broker.url, state_dir, count=4, latency_ms=250)
            )
            agent_ids = await audit.online(4)
            for agent_id in agent_ids * 2:
                await trigger(b, agent_id)
        total = len(agent_ids) * 2

        async def finished(n: int) -> None:
            async def enough() -> bool:
                return await audit.steps_finished() >= n

            await async_wait_until(enough, timeout_s=30, what=f"{n} steps")

        await finished(3)
        await asyncio.to_thread(broker.restart)
        await finished(10)
        signal_all([controller, agents], signal.SIGSTOP)
        try:
            frozen = await retained(broker)
            assert {t.rsplit("/", 1)[1] for t in frozen} == {"status", "tasks"}
            await asyncio.to_thread(broker.restart)
            after = await retained(broker)
        finally:
            signal_all([controller, agents], signal.SIGCONT)
        snap = await audit.all_final(total, timeout_s=60)
        assert len(await audit.online(4)) == 4
    audit.close()
    assert after.keys() == frozen.keys()
    for topic, payload in frozen.items():
        if topic.endswith("/tasks"):
            assert after[topic] == payload
        else:
            # Mosquitto publishes the Wills of the connected clients as it
            # shuts down: the status survives as that connection's Will.
            was, now = decode(AgentStatus, payload), decode(AgentStatus, after[topic])
            assert (now.state, now.reason, now.epoch) in {
                (was.state, was.reason, was.epoch),
                (AgentState.OFFLINE, "will", was.epoch),
            }
    check_no_loss(snap)
    assert len(snap.workflows) == total


class RawHttpAgent:
    """An HTTP agent written out by hand, to see every answer a poll gets."""

    def __init__(self, http: httpx.AsyncClient, agent_id: str) -> None:
        self.http = http
        self.agent_id = agent_id
        #: The answer to every poll: an HTTP status code or an error's name.
        self.answers: list[int | str] = []
        self.tasks: dict[str, Task] = {}
        self.results: dict[str, TaskResult] = {}

    @classmethod
    async def register(cls, http: httpx.AsyncClient) -> "RawHttpAgent":
        body = {"hostname": "raw-http", "ip_address": "127.0.0.1", "os": "test"}
        response = await http.post("/api/v1/agent/register", json=body)
        assert response.status_code == 201, response.text
        return cls(http, response.json()["agent_id"])

    async def parked(self) -> bool:
        """Whether the bridge has a long poll of ours waiting (its metric)."""
        try:
            text = (await self.http.get("/metrics")).text
        except httpx.HTTPError:
            return False
        return "kbbus_bridge_longpoll_waiters 1.0" in text

    async def run(self) -> None:
        while True:
            try:
                response = await self.http.get(
                    "/api/v1/agent/tasks",
                    params={"agent_id": self.agent_id, "timeout": 20},
                    timeout=25,
                )
            except httpx.HTTPError as exc:
                self.answers.append(type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            self.answers.append(response.status_code)
            if response.status_code == 200:
                await self._answer(decode(Task, response.content))
            elif response.status_code != 204:
                await asyncio.sleep(0.1)

    async def _answer(self, task: Task) -> None:
        self.tasks[task.task_id] = task
        result = self.results.get(task.task_id) or TaskResult(
            agent_id=self.agent_id,
            task_id=task.task_id,
            status=ResultStatus.SUCCEEDED,
            exit_code=0,
            output=f"raw {uuid.uuid4().hex}",
        )
        self.results[task.task_id] = result
        body = result.model_dump(mode="json", exclude_none=True)
        while True:
            try:
                response = await self.http.post(
                    "/api/v1/agent/tasks/results", json=body
                )
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            if response.status_code == 202:
                return
            await asyncio.sleep(0.1)

    def record(self) -> AgentRecord:
        return AgentRecord(self.agent_id, dict(self.results), [])


async def test_bridge_restart_with_long_polls_waiting_loses_no_task(
    mosquitto_broker: BrokerHandle, pg_url: str, kb_dir: Path, tmp_path: Path
) -> None:
    """Invariant: a long poll waiting when the bridge stops (SIGTERM, then
    SIGKILL) gets an error or an empty answer or its task, never a lost task:
    tasks dispatched while the bridge is down reach the agent after the
    restart. HTTP agents work across the restarts; every workflow finishes,
    each step once, every result from both kinds of agent in the database."""
    broker = mosquitto_broker
    state_dir = tmp_path / "http-agents"
    audit = Audit(pg_url, [state_dir])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with Children() as children:
        async with bus(broker) as b, httpx.AsyncClient(base_url=base) as http:
            children.start(
                controller_process(
                    tmp_path, broker.url, pg_url, client_id=client_id(), kb_dir=kb_dir
                )
            )
            await controller_answers(b)
            bridge = children.start(bridge_process(tmp_path, broker.url, port))
            await async_wait_until(bridge_ready(http), timeout_s=20, what="bridge up")
            raw = await RawHttpAgent.register(http)
            polling = asyncio.create_task(raw.run())
            try:
                children.start(
                    http_agents_process(
                        tmp_path, base, state_dir, count=2, latency_ms=250
                    )
                )
                others = [a for a in await audit.online(3) if a != raw.agent_id]
                for agent_id in others * 2:
                    await trigger(b, agent_id)
                total = len(others) * 2
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    await async_wait_until(raw.parked, what="a parked long poll")
                    answered = len(raw.answers)
                    await stop(bridge, sig)
                    # Dispatched while no bridge listens: retained, not lost.
                    await trigger(b, raw.agent_id)
                    total += 1
                    bridge = children.start(bridge_process(tmp_path, broker.url, port))
                    await async_wait_until(
                        bridge_ready(http), timeout_s=20, what="bridge back"
                    )
                    # The poll parked at the stop was answered somehow.
                    assert len(raw.answers) > answered
                snap = await audit.all_final(total, timeout_s=60)
            finally:
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
    audit.close()
    snap.records[raw.agent_id] = raw.record()
    check_no_loss(snap)
    assert all(a in (200, 204, 503) or isinstance(a, str) for a in raw.answers), (
        raw.answers
    )
    raw_tasks = {s.task_id for s in snap.steps if s.agent_id == raw.agent_id}
    assert len(raw_tasks) == 2 * FAULT_KB_STEPS
    assert raw_tasks <= set(raw.tasks)


def bridge_ready(http: httpx.AsyncClient) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        try:
            return (await http.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    return ready
