"""Soak: workflows triggered without pause while agents join, leave and fail.

A controller and fleets of simulated agents run as processes on Mosquitto and
PostgreSQL. One fleet has chaos on (agents dropped without goodbye, frozen
past their keepalive, restarted cleanly, and 5% of actions failing); a second
fleet joins midway and leaves with SIGTERM; a third is SIGKILLed and comes
back. Triggers go to random online agents the whole time. At the end the
leavers come back, and the audit reads both sides: every triggered workflow
is in a final state, the database holds exactly the workflows triggered, and
every result is the same in the database and in its agent's own records.

The short run (about 25 s) is part of the default suite; ``make soak`` runs
the long one, ``KBBUS_SOAK_S`` seconds of triggering (default 180).
"""

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.store import upgrade
from kbbus.stack import Process
from schemas.views import FINAL_WORKFLOW_STATES
from tests.support.controller_rig import Bus, bus
from tests.support.infra import BrokerHandle, fresh_postgres_database
from tests.support.system import (
    FAULT_KB_ID,
    Audit,
    Children,
    Snapshot,
    agents_process,
    check_records,
    controller_answers,
    controller_process,
    stop,
    trigger,
    write_kbs,
)

SHORT_S = 12.0
LONG_S = float(os.environ.get("KBBUS_SOAK_S", "180"))
CHAOS = [
    "--chaos-every-s", "2",
    "--chaos-drop", "0.1",
    "--chaos-freeze", "0.05",
    "--chaos-restart", "0.05",
    "--chaos-down-s", "1.5",
    "--fail-rate", "0.05",
    "--latency-dist", "uniform",
]  # fmt: skip


class Soak:
    def __init__(self, b: Bus, audit: Audit, seed: int) -> None:
        self.b = b
        self.audit = audit
        self.rng = random.Random(seed)
        self.triggered: set[str] = set()

    async def trigger_for(self, duration_s: float, every_s: float = 0.1) -> None:
        """Trigger on a random online agent every ``every_s`` seconds."""
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            snap = await self.audit.snapshot()
            online = sorted(a for a, s in snap.agents.items() if s == "online")
            if online:
                view = await trigger(self.b, self.rng.choice(online), FAULT_KB_ID)
                self.triggered.add(view.workflow_id)
            await asyncio.sleep(every_s)


async def soak(
    broker: BrokerHandle, db_url: str, tmp_path: Path, seconds: float
) -> Snapshot:
    """Run the soak for ``seconds`` of triggering; return the final audit."""
    upgrade(db_url)
    dirs = {name: tmp_path / name for name in ("chaos", "joiners", "killed")}
    audit = Audit(db_url, dirs.values())
    phase_s = seconds / 3

    def fleet(name: str, count: int, *extra: str) -> Process:
        return agents_process(
            tmp_path,
            broker.url,
            dirs[name],
            count=count,
            latency_ms=150,
            keepalive_s=2,
            heartbeat_s=1,
            name=name,
            extra=extra,
        )

    with Children() as children:
        async with bus(broker) as b:
            children.start(
                controller_process(
                    tmp_path,
                    broker.url,
                    db_url,
                    client_id=f"kbbus-controller-soak-{uuid.uuid4().hex[:8]}",
                    kb_dir=write_kbs(tmp_path / "kbs"),
                    offline_after_s=10,
                )
            )
            await controller_answers(b)
            children.start(fleet("chaos", 12, *CHAOS))
            killed = children.start(fleet("killed", 4))
            await audit.online(16)
            run = Soak(b, audit, seed=int(time.time()))
            # Phase 1: the chaos fleet and the doomed fleet.
            await run.trigger_for(phase_s)
            # Phase 2: a fleet joins; the doomed one is SIGKILLed.
            joiners = children.start(fleet("joiners", 4))
            await stop(killed, signal.SIGKILL)
            await run.trigger_for(phase_s)
            # Phase 3: the joiners leave cleanly; the killed come back.
            await stop(joiners, signal.SIGTERM)
            children.start(fleet("killed", 4))
            await run.trigger_for(phase_s)
            # The end: everyone back, so every queued workflow can run.
            children.start(fleet("joiners", 4))
            snap = await audit.all_final(len(run.triggered), timeout_s=120)
    audit.close()
    final = {s for _, s in snap.workflows.values()}
    assert final <= FINAL_WORKFLOW_STATES
    # Counts on both sides: the database has exactly the workflows triggered.
    assert set(snap.workflows) == run.triggered
    check_records(snap)
    statuses = [s for _, s in snap.workflows.values()]
    results = snap.results()
    print(
        f"soak: {seconds:.0f}s, {len(run.triggered)} workflows "
        f"({statuses.count('succeeded')} succeeded, {statuses.count('failed')} "
        f"failed), {len(snap.steps)} attempts, {results} results on the agents' side"
    )
    # Most work succeeds; 5% of actions fail, and a step is retried twice.
    assert statuses.count("succeeded") >= 0.8 * len(statuses)
    assert len(run.triggered) >= seconds  # about ten a second when idle
    return snap


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.mark.mosquitto
@pytest.mark.postgres
@pytest.mark.timeout(150)
async def test_soak_short(
    mosquitto_broker: BrokerHandle, pg_url: str, tmp_path: Path
) -> None:
    """The soak, short enough for every run of the suite."""
    await soak(mosquitto_broker, pg_url, tmp_path, SHORT_S)


@pytest.mark.soak
@pytest.mark.mosquitto
@pytest.mark.postgres
@pytest.mark.timeout(LONG_S + 300)
async def test_soak_long(
    mosquitto_broker: BrokerHandle, pg_url: str, tmp_path: Path
) -> None:
    """The soak for ``KBBUS_SOAK_S`` seconds (``make soak``)."""
    await soak(mosquitto_broker, pg_url, tmp_path, LONG_S)
