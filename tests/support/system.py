"""A whole kbbus system as real processes, and the audit that checks it.

The fault, soak and bad-input suites start the controller, the bridge and the
agents as child processes (``python -m ...``) so they can be SIGKILLed,
SIGSTOPped and restarted for real. ``Audit`` then reads what happened from
both sides: the controller's tables and the agents' own state files.
"""

import asyncio
import signal
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from agent_sim.store import AgentState
from controller.db import Agent, StepExecution, Workflow
from controller.store import make_engine
from kbbus.stack import Process
from schemas import decode
from schemas.messages import (
    LookupKind,
    LookupReply,
    LookupRequest,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod
from schemas.views import FINAL_WORKFLOW_STATES, WorkflowView
from tests.support.controller_rig import Bus
from tests.support.wait import async_wait_until

REPO = Path(__file__).resolve().parents[2]

#: Steps whose simulated output is random (an address), so a step that ran
#: twice would leave the agent with an output the database does not have.
FAULT_KB = """\
v: 1
id: fault-kb
title: Three resolves, for fault tests
steps:
  - id: one
    action: dns.resolve
    args: {name: one.example}
    timeout_s: 60
    max_attempts: 3
    backoff_s: 0
  - id: two
    action: dns.resolve
    args: {name: two.example}
    timeout_s: 60
    max_attempts: 3
    backoff_s: 0
  - id: three
    action: dns.resolve
    args: {name: three.example}
    timeout_s: 60
    max_attempts: 3
    backoff_s: 0
"""
FAULT_KB_ID = "fault-kb"
FAULT_KB_STEPS = 3


def write_kbs(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fault-kb.yaml").write_text(FAULT_KB)
    return directory


def _python_m(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def controller_process(
    workdir: Path,
    mqtt_url: str,
    db_url: str,
    *,
    client_id: str,
    kb_dir: Path | None = None,
    metrics_port: int = 0,
    offline_after_s: float = 60.0,
    extra: Iterable[str] = (),
) -> Process:
    argv = _python_m(
        "controller",
        "--mqtt-url", mqtt_url,
        "--db-url", db_url,
        "--client-id", client_id,
        "--tick-interval-s", "0.2",
        "--sweep-interval-s", "0.5",
        "--offline-after-s", str(offline_after_s),
        "--heartbeat-flush-ms", "50",
        "--reconnect-min-s", "0.1",
        "--reconnect-max-s", "1",
        "--mqtt-keepalive-s", "5",
        "--metrics-port", str(metrics_port),
        *(["--kb-dir", str(kb_dir)] if kb_dir is not None else []),
        *extra,
    )  # fmt: skip
    return Process("controller", argv, workdir / "controller.log")


def agents_process(
    workdir: Path,
    mqtt_url: str,
    state_dir: Path,
    *,
    count: int,
    latency_ms: float = 0,
    keepalive_s: int = 5,
    heartbeat_s: float = 1,
    name: str = "agents",
    extra: Iterable[str] = (),
) -> Process:
    argv = _python_m(
        "agent_sim",
        "--mqtt-url", mqtt_url,
        "--count", str(count),
        "--state-dir", str(state_dir),
        "--latency-ms", str(latency_ms),
        "--keepalive-s", str(keepalive_s),
        "--heartbeat-s", str(heartbeat_s),
        "--max-finished", "10000",
        "--summary-interval-s", "0",
        "--reconnect-min-s", "0.1",
        "--reconnect-max-s", "1",
        "--ramp-per-s", "0",
        *extra,
    )  # fmt: skip
    return Process(name, argv, workdir / f"{name}.log")


def http_agents_process(
    workdir: Path,
    http_url: str,
    state_dir: Path,
    *,
    count: int,
    latency_ms: float = 0,
    poll_timeout_s: float = 30,
    name: str = "http-agents",
) -> Process:
    argv = _python_m(
        "agent_sim",
        "--http-url", http_url,
        "--count", str(count),
        "--state-dir", str(state_dir),
        "--latency-ms", str(latency_ms),
        "--heartbeat-s", "1",
        "--max-finished", "10000",
        "--summary-interval-s", "0",
        "--reconnect-min-s", "0.1",
        "--reconnect-max-s", "0.5",
        "--poll-timeout-s", str(poll_timeout_s),
        "--ramp-per-s", "0",
    )  # fmt: skip
    return Process(name, argv, workdir / f"{name}.log")


def bridge_process(workdir: Path, mqtt_url: str, port: int) -> Process:
    argv = _python_m(
        "bridge_http",
        "--mqtt-url", mqtt_url,
        "--port", str(port),
        "--request-timeout-s", "3",
        "--disconnect-check-s", "0.5",
    )  # fmt: skip
    return Process("bridge", argv, workdir / "bridge.log")


def start(process: Process) -> Process:
    process.start()
    return process


async def stop(process: Process, sig: signal.Signals | None = None) -> None:
    """Stop a child: SIGTERM with a grace period, or ``sig`` (say SIGKILL) now."""
    if sig is signal.SIGKILL:
        await asyncio.to_thread(process.kill)
    else:
        await asyncio.to_thread(process.stop, 10.0)


async def controller_answers(b: Bus, timeout_s: float = 30) -> None:
    """Until the controller answers a look-up: connected, migrated, consuming."""

    async def answered() -> bool:
        request = b.new_request(LookupRequest, kind=LookupKind.KBS)
        try:
            await b.request(RpcMethod.LOOKUP, request, LookupReply, timeout_s=0.5)
        except TimeoutError:
            return False
        return True

    await async_wait_until(answered, timeout_s=timeout_s, what="controller answers")


async def trigger(
    b: Bus,
    agent_id: str,
    kb_id: str = FAULT_KB_ID,
    params: dict[str, object] | None = None,
    timeout_s: float = 10,
) -> WorkflowView:
    request = b.new_request(
        TriggerRequest,
        agent_id=agent_id,
        kb_id=kb_id,
        params=params or {},
        idempotency_key=uuid.uuid4().hex,
    )
    reply = await b.request(
        RpcMethod.TRIGGER, request, TriggerReply, timeout_s=timeout_s
    )
    assert reply.error is None, reply.error
    assert reply.workflow is not None
    return reply.workflow


# --- the audit ----------------------------------------------------------------


@dataclass(frozen=True)
class StepRow:
    task_id: str
    workflow_id: str
    agent_id: str
    step_index: int
    attempt: int
    status: str
    output: str | None
    error: str | None


@dataclass(frozen=True)
class AgentRecord:
    """What one agent's state file says it finished: task id -> result."""

    agent_id: str
    finished: dict[str, TaskResult]
    started: list[str]


@dataclass
class Snapshot:
    workflows: dict[str, tuple[str, str]]  # id -> (agent_id, status)
    steps: list[StepRow]
    agents: dict[str, str]  # id -> status
    records: dict[str, AgentRecord] = field(default_factory=dict)

    def results(self) -> int:
        return sum(len(r.finished) for r in self.records.values())

    def final(self) -> int:
        return sum(1 for _, s in self.workflows.values() if s in FINAL_WORKFLOW_STATES)

    def steps_of(self, workflow_id: str) -> list[StepRow]:
        return [s for s in self.steps if s.workflow_id == workflow_id]


def read_records(state_dirs: Iterable[Path]) -> dict[str, AgentRecord]:
    records: dict[str, AgentRecord] = {}
    for state_dir in state_dirs:
        for path in sorted(state_dir.glob("agent-*.json")):
            state = AgentState.load(path, max_finished=10**9)
            assert state is not None, path
            finished = {
                task_id: decode(TaskResult, text)
                for task_id, text in state.finished.items()
            }
            records[state.agent_id] = AgentRecord(
                state.agent_id, finished, list(state.started or [])
            )
    return records


class Audit:
    """Reads the controller's tables (off the event loop) and the agents' files."""

    def __init__(self, db_url: str, state_dirs: Iterable[Path] = ()) -> None:
        self.engine = make_engine(db_url)
        self.state_dirs = list(state_dirs)

    def close(self) -> None:
        self.engine.dispose()

    def _read(self) -> Snapshot:
        with self.engine.connect() as conn:
            workflows = {
                r.id: (r.agent_id, r.status)
                for r in conn.execute(
                    sa.select(Workflow.id, Workflow.agent_id, Workflow.status)
                )
            }
            steps = [
                StepRow(*r)
                for r in conn.execute(
                    sa.select(
                        StepExecution.id,
                        StepExecution.workflow_id,
                        StepExecution.agent_id,
                        StepExecution.step_index,
                        StepExecution.attempt,
                        StepExecution.status,
                        StepExecution.output,
                        StepExecution.error,
                    )
                )
            ]
            agents = {
                r.id: r.status for r in conn.execute(sa.select(Agent.id, Agent.status))
            }
        return Snapshot(workflows, steps, agents)

    async def snapshot(self, *, records: bool = False) -> Snapshot:
        snap = await asyncio.to_thread(self._read)
        if records:
            snap.records = await asyncio.to_thread(read_records, self.state_dirs)
        return snap

    async def online(self, count: int, timeout_s: float = 30) -> list[str]:
        """Until ``count`` agents are online; their ids, sorted."""

        async def enough() -> list[str]:
            snap = await self.snapshot()
            ids = sorted(a for a, s in snap.agents.items() if s == "online")
            return ids if len(ids) >= count else []

        return await async_wait_until(
            enough, timeout_s=timeout_s, what=f"{count} agents online"
        )

    async def all_final(self, count: int, timeout_s: float) -> Snapshot:
        """Until ``count`` workflows exist and every one is in a final state."""

        async def done() -> Snapshot | None:
            snap = await self.snapshot()
            if len(snap.workflows) >= count and snap.final() == len(snap.workflows):
                return snap
            return None

        await async_wait_until(
            done, timeout_s=timeout_s, what=f"{count} workflows final"
        )
        return await self.snapshot(records=True)

    async def steps_finished(self) -> int:
        snap = await self.snapshot()
        return sum(1 for s in snap.steps if s.status == "succeeded")


def check_no_loss(snap: Snapshot, *, retries_allowed: bool = False) -> None:
    """The invariants every fault test ends with, from both sides.

    - every workflow succeeded, with exactly one succeeded attempt per step;
    - unless ``retries_allowed``, exactly one attempt per step (no result was
      lost and timed out, nothing ran again);
    - every result an agent recorded for a task the controller knows is the
      result in the database (same status and output: the simulated outputs
      are random, so a task run twice would differ), and every finished
      attempt in the database is in its agent's records;
    - no agent recorded a task id the database does not know.
    """
    for workflow_id, (_, status) in snap.workflows.items():
        steps = snap.steps_of(workflow_id)
        assert status == "succeeded", (workflow_id, status, steps)
        for index in range(FAULT_KB_STEPS):
            attempts = [s for s in steps if s.step_index == index]
            succeeded = [s for s in attempts if s.status == "succeeded"]
            assert len(succeeded) == 1, (workflow_id, index, attempts)
            if not retries_allowed:
                assert len(attempts) == 1, (workflow_id, index, attempts)
    check_records(snap)


def check_records(snap: Snapshot) -> None:
    """Both sides agree: each result an agent recorded is the database's, and
    each result in the database is in its agent's records."""
    known = {s.task_id: s for s in snap.steps}
    for agent_id, record in snap.records.items():
        assert not record.started, (agent_id, "tasks left running", record.started)
        for task_id, result in record.finished.items():
            row = known.get(task_id)
            assert row is not None, (agent_id, "a task the controller never sent")
            assert row.agent_id == agent_id, (task_id, row.agent_id, agent_id)
            assert (row.status, row.output) == (result.status.value, result.output), (
                "the agent's result is not the one in the database",
                row,
                result,
            )
    for row in known.values():
        if row.status in ("succeeded", "failed") and snap.records:
            producer = snap.records.get(row.agent_id)
            assert producer is not None, ("no records of an agent that answered", row)
            assert row.task_id in producer.finished, (
                "a result in the database that its agent never produced",
                row,
            )


class Children:
    """The test's child processes: all killed at the end, their logs printed
    (pytest shows captured output only for a failed test)."""

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def start(self, process: Process) -> Process:
        self.processes.append(process)
        return process.start()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.proc is not None and process.alive():
                # A stopped (SIGSTOP) child ignores everything but SIGKILL.
                process.kill()
        shown: set[Path] = set()
        for process in self.processes:
            if process.log_path not in shown:
                shown.add(process.log_path)
                print(f"--- {process.name} ({process.log_path}) ---")
                print(process.log_tail(30))
