"""Faults survived: processes killed for real, a broker and a database restarted.

Every test runs real processes (controller, agents, bridge) against Mosquitto
with persistence and PostgreSQL, breaks one thing mid-workflow, and ends with
the same audit (``tests.support.system.check_no_loss``), read from the
controller's tables and from the agents' own state files: every workflow
finished, each step executed once, every result an agent produced is the one
in the database. Network faults are in ``test_faults_network.py``.
"""

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.store import upgrade
from kbbus.stack import Process
from tests.support.controller_rig import bus
from tests.support.infra import BrokerHandle, fresh_postgres_database
from tests.support.system import (
    Audit,
    Children,
    agents_process,
    check_no_loss,
    controller_answers,
    controller_process,
    read_records,
    stop,
    trigger,
    write_kbs,
)
from tests.support.wait import async_wait_until

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
