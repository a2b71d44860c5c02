"""The batch results path (``Engine.handle_results``) on SQLite and PostgreSQL.

The per-result ORM path (``Engine.handle_result``) is the reference: every
scenario here runs through both and must end in the same rows, tasks and
events. Then what only a batch has: mixed batches (valid, duplicate, foreign,
unknown), many agents at once, a fixed number of statements, and races; last,
the running controller, whose result batches overlap.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from controller.db import StepExecution, Workflow
from controller.engine import EngineError
from controller.results import ResultsOutcome
from controller.store import make_engine
from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    ErrorCode,
    ResultStatus,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import AgentChannel, RpcMethod, Topics
from schemas.views import FINAL_WORKFLOW_STATES
from tests.support.controller_rig import (
    bus,
    controller_settings,
    eventually,
    running_controller,
)
from tests.support.engine_rig import Effects, EngineRig
from tests.support.infra import BrokerHandle
from tests.test_engine_races import all_at_once

KBS: list[dict[str, Any]] = [
    {
        "id": "flaky-kb",
        "title": "Retries with backoff",
        "steps": [
            {"id": "op", "action": "echo", "max_attempts": 3, "backoff_s": 2},
            {"id": "after", "action": "echo", "args": {"m": "{{ params.m }}"}},
        ],
        "params": {"type": "object", "properties": {"m": {"default": "hi"}}},
    },
    {
        "id": "again-kb",
        "title": "Retry at once",
        "steps": [{"id": "op", "action": "echo", "max_attempts": 2, "backoff_s": 0}],
    },
    {
        "id": "chain-kb",
        "title": "Arguments from an earlier step",
        "steps": [
            {"id": "first", "action": "echo", "max_attempts": 2, "backoff_s": 0},
            {
                "id": "second",
                "action": "echo",
                "args": {
                    "message": "{{ steps.first.output }} "
                    "rc={{ steps.first.exit_code }}",
                    "code": "{{ steps.first.exit_code }}",
                },
            },
        ],
    },
    {
        "id": "bad-render-kb",
        "title": "An argument that cannot render",
        "steps": [
            {"id": "first", "action": "echo"},
            {"id": "second", "action": "echo", "args": {"m": "{{ steps.first.x.y }}"}},
            {"id": "third", "action": "echo"},
        ],
    },
    {
        "id": "soft-kb",
        "title": "Failures that do not abort",
        "steps": [
            {"id": "a", "action": "echo", "on_failure": "continue"},
            {
                "id": "b",
                "action": "echo",
                "args": {"m": "{{ steps.a.x.y }}"},
                "on_failure": "continue",
            },
            {"id": "c", "action": "echo", "args": {"m": "a={{ steps.a.status }}"}},
        ],
    },
]

# (kb_id, params, {(step_id, attempt): (status, output, exit_code)}); any
# other attempt succeeds with output "ok".
Answers = dict[tuple[str, int], tuple[str, str, int]]
SCENARIOS: list[tuple[str, dict[str, Any], Answers]] = [
    ("dns-flush-kb", {"name": "example.org"}, {}),
    ("disk-cleanup-kb", {}, {}),
    ("service-restart-kb", {"service": "nginx"}, {}),
    ("collect-diagnostics-kb", {}, {("disk", 1): ("failed", "no disk", 2)}),
    ("collect-diagnostics-kb", {}, {("collect", 1): ("failed", "x", 1)}),
    (
        "collect-diagnostics-kb",
        {},
        {("collect", 1): ("failed", "x", 1), ("collect", 2): ("failed", "y", 1)},
    ),
    ("flaky-kb", {}, {("op", 1): ("failed", "e1", 1), ("op", 2): ("failed", "e2", 1)}),
    (
        "flaky-kb",
        {"m": "yo"},
        {(("op", n)): ("failed", f"e{n}", 1) for n in (1, 2, 3)},
    ),
    ("again-kb", {}, {("op", 1): ("failed", "once", 1)}),
    ("again-kb", {}, {("op", n): ("failed", "twice", 1) for n in (1, 2)}),
    ("chain-kb", {}, {("first", 1): ("failed", "bad", 3)}),
    ("chain-kb", {}, {}),
    ("bad-render-kb", {}, {}),
    ("soft-kb", {}, {("a", 1): ("failed", "", 1)}),
]


@pytest.fixture
def rig(db_url: str, tmp_path: Path) -> Iterator[EngineRig]:
    kb_dir = tmp_path / "kbs"
    kb_dir.mkdir()
    for kb in KBS:
        (kb_dir / f"{kb['id']}.yaml").write_text(yaml.safe_dump(kb))
    rig = EngineRig(db_url, [kb_dir])
    try:
        yield rig
    finally:
        rig.close()


def result_for(task: Task, answers: Answers, agent_id: str | None = None) -> TaskResult:
    status, output, exit_code = answers.get(
        (task.step_id, task.attempt), ("succeeded", "ok", 0)
    )
    return TaskResult(
        agent_id=agent_id or task.agent_id,
        task_id=task.task_id,
        status=ResultStatus(status),
        exit_code=exit_code,
        output=output,
    )


def batch(rig: EngineRig, items: list[tuple[str, TaskResult]]) -> ResultsOutcome:
    return rig.run(lambda s: rig.engine.handle_results(s, items, rig.now))


@dataclass
class Trace:
    """What one agent saw: events and tasks in order, and the rows it ended with."""

    kinds: list[str] = field(default_factory=list)
    tasks: list[tuple[Any, ...]] = field(default_factory=list)
    cleared: int = 0
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    workflows: list[tuple[Any, ...]] = field(default_factory=list)


def record(traces: dict[str, Trace], fx: Effects) -> list[Task]:
    for e in fx.events:
        assert e.agent_id is not None
        traces[e.agent_id].kinds.append(e.kind.value)
    for t in fx.tasks:
        traces[t.agent_id].tasks.append(
            (t.step_id, t.step_index, t.attempt, t.action, t.args, t.timeout_s)
        )
    for agent_id in fx.cleared:
        traces[agent_id].cleared += 1
    return fx.tasks


def drive(
    rig: EngineRig,
    agents: list[str],
    kb_id: str,
    params: dict[str, Any],
    answers: Answers,
    *,
    batched: bool,
    per_agent: int = 1,
) -> dict[str, Trace]:
    """Run ``per_agent`` workflows on each agent to their end, answering with
    ``answers``: one result per transaction, or every pending one at once."""
    traces = {a: Trace() for a in agents}
    workflow_ids: dict[str, list[str]] = {a: [] for a in agents}
    pending: list[Task] = []
    for _ in range(per_agent):
        for agent_id in agents:
            view, _, fx = rig.trigger(agent_id, kb_id, params)
            workflow_ids[agent_id].append(view.workflow_id)
            pending += record(traces, fx)
    for _ in range(100):
        if not pending:
            views = [rig.view(w) for ws in workflow_ids.values() for w in ws]
            if all(v.status in FINAL_WORKFLOW_STATES for v in views):
                break
            rig.advance(60)  # past any backoff
            pending = record(traces, rig.tick())
            continue
        results = [result_for(t, answers) for t in pending]
        pending = []
        if batched:
            outcome = batch(rig, [(r.agent_id, r) for r in results])
            assert outcome.rejected == []
            assert outcome.ignored == []
            pending = record(traces, Effects(outcome.effects))
        else:
            for r in results:
                pending += record(traces, one(rig, r))
    else:
        raise AssertionError("workflows did not end")
    for agent_id, ids in workflow_ids.items():
        for workflow_id in ids:
            wf = rig.workflow(workflow_id)
            # Not the version: the ORM writes nothing when a transition sets
            # updated_at to the value it had, which a frozen test clock does.
            traces[agent_id].workflows.append((wf.status, wf.error, wf.current_step))
            traces[agent_id].rows += [
                (
                    r.step_index,
                    r.step_id,
                    r.attempt,
                    r.action,
                    r.args,
                    r.status,
                    r.exit_code,
                    r.output,
                    r.error,
                    r.timeout_s,
                    r.not_before is not None,
                    r.dispatched_at is not None,
                    r.deadline_at is not None,
                    r.finished_at is not None,
                )
                for r in rig.executions(workflow_id)
            ]
    return traces


def one(rig: EngineRig, result: TaskResult) -> Effects:
    """The per-result path, in a transaction of its own."""
    return Effects(
        rig.run(lambda s: rig.engine.handle_result(s, result.agent_id, result, rig.now))
    )


# --- the same transitions as the per-result path ------------------------------


@pytest.mark.parametrize(("kb_id", "params", "answers"), SCENARIOS)
def test_batches_end_like_one_result_at_a_time(
    rig: EngineRig, kb_id: str, params: dict[str, Any], answers: Answers
) -> None:
    # Two workflows per agent, so every ending also starts the next one.
    single = [rig.add_agent(f"s{i}") for i in range(2)]
    batched = [rig.add_agent(f"b{i}") for i in range(3)]
    reference = drive(rig, single, kb_id, params, answers, batched=False, per_agent=2)
    traces = drive(rig, batched, kb_id, params, answers, batched=True, per_agent=2)
    assert reference["s0"].kinds  # the scenario did something
    for trace in [reference["s1"], *traces.values()]:
        assert trace == reference["s0"]


# --- mixed batches ------------------------------------------------------------------


def test_a_mixed_batch_applies_the_valid_and_refuses_the_rest_one_by_one(
    rig: EngineRig,
) -> None:
    a1, a2, a3 = (rig.add_agent(a) for a in ("a1", "a2", "a3"))
    t1 = rig.trigger(a1, "dns-flush-kb", {"name": "x.org"})[2].task()
    t2 = rig.trigger(a2, "dns-flush-kb", {"name": "y.org"})[2].task()
    t3 = rig.trigger(a3, "dns-flush-kb", {"name": "z.org"})[2].task()
    done = rig.result(t3).task()  # t3 has a result already: a late copy is a dup
    ok = result_for(t1, {})
    items = [
        (a1, ok),
        (a1, ok),  # the same result twice in one batch
        (a2, result_for(t1, {}, agent_id=a2)),  # another agent's task
        (a1, result_for(t2, {}, agent_id=a2)),  # payload and topic disagree
        (a3, result_for(t3, {})),  # already recorded
        (a3, TaskResult(agent_id=a3, task_id="no-such-task", status="succeeded")),
        (a2, result_for(t2, {})),
    ]
    outcome = batch(rig, items)

    codes = {index: exc.code for index, exc in outcome.rejected}
    assert codes == {2: ErrorCode.CONFLICT, 3: ErrorCode.CONFLICT, 5: "not_found"}
    assert all(isinstance(exc, EngineError) for _, exc in outcome.rejected)
    assert outcome.ignored == [1, 4]
    fx = Effects(outcome.effects)
    assert sorted((t.agent_id, t.step_id) for t in fx.tasks) == [
        (a1, "verify"),
        (a2, "verify"),
    ]
    # Tasks first, then events, each agent's in its order.
    topics = [p.topic for p in outcome.effects]
    assert all("/tasks" in t for t in topics[:2])
    assert fx.kinds == ["step.finished", "step.dispatched"] * 2
    # a3 is untouched: its current task is still the one it was given.
    rows = rig.executions(done.workflow_id)
    assert [(r.step_id, r.status) for r in rows] == [
        ("flush", "succeeded"),
        ("verify", "dispatched"),
    ]
    # Nothing to do again: every result is now a duplicate or refused.
    again = batch(rig, items)
    assert again.effects == []
    assert again.ignored == [0, 1, 4, 6]
    assert [i for i, _ in again.rejected] == [2, 3, 5]


def test_an_empty_batch_does_nothing(rig: EngineRig) -> None:
    statements = count_statements(rig)
    assert batch(rig, []) == ResultsOutcome()
    assert [s for s in statements if s not in ("BEGIN", "COMMIT")] == []


# --- many agents in one batch -------------------------------------------------------


def test_endings_start_each_agents_next_workflow_or_clear_its_task(
    rig: EngineRig,
) -> None:
    busy = rig.add_agent("busy")  # two workflows queued behind the running one
    idle = rig.add_agent("idle")  # nothing behind
    gone = rig.add_agent("gone")  # one behind, but the agent went offline
    first = {a: rig.trigger(a, "again-kb")[2].task() for a in (busy, idle, gone)}
    queued = [rig.trigger(busy, "again-kb")[0].workflow_id for _ in range(2)]
    later = rig.trigger(gone, "again-kb")[0].workflow_id
    rig.set_agent_status(gone, "offline")

    outcome = batch(rig, [(t.agent_id, result_for(t, {})) for t in first.values()])
    fx = Effects(outcome.effects)
    assert [(t.agent_id, t.workflow_id) for t in fx.tasks] == [(busy, queued[0])]
    assert sorted(fx.cleared) == [gone, idle]
    assert fx.kinds.count("workflow.finished") == 3
    assert fx.kinds.count("workflow.started") == 1
    assert rig.view(queued[0]).status == "running"
    assert rig.view(queued[1]).status == "queued"
    assert rig.view(later).status == "queued"


def test_a_batch_is_a_fixed_number_of_statements(rig: EngineRig) -> None:
    def run_round(n: int) -> list[str]:
        agents = [rig.add_agent(f"n{n}-{i}") for i in range(n)]
        tasks = [
            rig.trigger(a, "dns-flush-kb", {"name": "x.org"})[2].task() for a in agents
        ]
        statements = count_statements(rig)
        batch(rig, [(t.agent_id, result_for(t, {})) for t in tasks])
        return [s for s in statements if s not in ("BEGIN", "COMMIT")]

    one, forty = run_round(1), run_round(40)
    # One SELECT, one UPDATE of workflows, one of attempts, one INSERT.
    assert one == ["SELECT", "UPDATE", "UPDATE", "INSERT"]
    assert forty == one


def count_statements(rig: EngineRig) -> list[str]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(str(args[2]).split()[0].upper())

    event.listen(rig.store.engine, "before_cursor_execute", record)
    return statements


# --- races ----------------------------------------------------------------------------


def test_threads_racing_with_one_batch_each_apply_every_result_once(
    rig: EngineRig,
) -> None:
    agents = [rig.add_agent(f"r{i}") for i in range(8)]
    tasks = [
        rig.trigger(a, "dns-flush-kb", {"name": "x.org"})[2].task() for a in agents
    ]
    items = [(t.agent_id, result_for(t, {})) for t in tasks]

    outcomes = all_at_once(3, lambda: batch(rig, items))
    dispatched = [t for o in outcomes for t in Effects(o.effects).tasks]
    assert sorted(t.agent_id for t in dispatched) == sorted(agents)
    assert all(t.step_id == "verify" for t in dispatched)
    assert sum(len(o.ignored) for o in outcomes) == 2 * len(agents)
    for t in tasks:
        rows = rig.executions(t.workflow_id)
        assert [(r.step_id, r.status) for r in rows] == [
            ("flush", "succeeded"),
            ("verify", "dispatched"),
        ]


def test_overlapping_batches_from_two_controllers_apply_each_result_once(
    rig: EngineRig,
) -> None:
    agents = [rig.add_agent(f"o{i}") for i in range(6)]
    tasks = [rig.trigger(a, "again-kb")[2].task() for a in agents]
    items = [(t.agent_id, result_for(t, {})) for t in tasks]
    halves = [items[:4], items[2:]]  # two results in both

    def run(part: list[tuple[str, TaskResult]]) -> Callable[[], ResultsOutcome]:
        return lambda: batch(rig, part)

    calls = iter([run(halves[0]), run(halves[1])])
    outcomes = all_at_once(2, lambda: next(calls)())
    finished = [e for o in outcomes for e in Effects(o.effects).events]
    assert sorted(
        e.agent_id or "" for e in finished if e.kind.value == "workflow.finished"
    ) == sorted(agents)
    assert sum(len(o.ignored) for o in outcomes) == 2


def test_a_batch_racing_a_tick_that_times_out_its_step(rig: EngineRig) -> None:
    agents = [rig.add_agent(f"k{i}") for i in range(4)]
    tasks = [rig.trigger(a, "again-kb")[2].task() for a in agents]
    rig.advance(3600)  # every step is overdue: the tick times each out
    items = [(t.agent_id, result_for(t, {})) for t in tasks]

    def either(session: Session, which: int) -> Any:
        if which == 0:
            return rig.engine.tick(session, rig.now)
        return rig.engine.handle_results(session, items, rig.now)

    which = iter([0, 1])

    def one() -> Any:
        w = next(which)
        return rig.run(lambda s: either(s, w))

    all_at_once(2, one)
    for t in tasks:
        rows = rig.executions(t.workflow_id)
        # Either the result won (one attempt, succeeded) or the tick did
        # (attempt 1 timed out, attempt 2 dispatched); never both.
        assert [(r.attempt, r.status) for r in rows] in (
            [(1, "succeeded")],
            [(1, "timed_out"), (2, "dispatched")],
        )


# --- through the running controller --------------------------------------------


async def _answer_tasks(
    client: BusClient, topics: Topics, copies: int, stop: asyncio.Event
) -> list[Task]:
    """Act as every agent: answer each new task with ``copies`` of a success."""
    seen: dict[str, Task] = {}
    sends: set[asyncio.Task[None]] = set()
    tasks_filter = topics.all_agents(AgentChannel.TASKS)
    async for message in client.messages:
        payload = message.payload
        # amqtt also hands a new client others' retained messages.
        if not message.topic.matches(tasks_filter):
            continue
        if not isinstance(payload, bytes) or not payload:
            if stop.is_set():
                break
            continue
        task = decode(Task, payload)
        if task.task_id in seen:
            continue
        seen[task.task_id] = task
        result = encode(result_for(task, {}))
        for _ in range(copies):
            # Concurrently, so results of many agents reach the controller
            # together and fill its batches.
            send = asyncio.create_task(
                client.publish(topics.results(task.agent_id), result, qos=1)
            )
            sends.add(send)
            send.add_done_callback(sends.discard)
    await asyncio.gather(*sends)
    return list(seen.values())


async def test_many_agents_results_through_the_controller_apply_each_step_once(
    broker: BrokerHandle, db_url: str
) -> None:
    settings = controller_settings(broker, db_url)
    topics = Topics(settings.topic_root)
    async with running_controller(settings) as rig, bus(broker) as b:
        agents = [
            (await b.register(f"w{i}", agent_id=str(uuid.uuid4()))).agent_id
            for i in range(12)
        ]
        stop = asyncio.Event()
        async with BusClient(broker.url, f"fleet-{uuid.uuid4().hex[:8]}") as fleet:
            await fleet.subscribe(topics.all_agents(AgentChannel.TASKS), qos=1)
            answering = asyncio.create_task(_answer_tasks(fleet, topics, 2, stop))
            workflows = []
            for _ in range(2):  # the second of each agent waits for the first
                for agent_id in agents:
                    request = b.new_request(
                        TriggerRequest,
                        agent_id=agent_id,
                        kb_id="dns-flush-kb",
                        params={"name": "example.org"},
                    )
                    reply = await b.request(RpcMethod.TRIGGER, request, TriggerReply)
                    assert reply.workflow is not None, reply.error
                    workflows.append(reply.workflow.workflow_id)

            def finished() -> bool:
                done = [e for e in b.events if e.kind == "workflow.finished"]
                return len(done) == len(workflows)

            try:
                await eventually(finished, timeout_s=30, what="every workflow")
            finally:
                stop.set()
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answering

        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(
                        StepExecution.workflow_id,
                        StepExecution.step_id,
                        StepExecution.attempt,
                        StepExecution.status,
                    )
                ).all()
                statuses = conn.execute(select(Workflow.status)).scalars().all()
        finally:
            engine.dispose()
        assert sorted(statuses) == ["succeeded"] * len(workflows)
        assert len(rows) == 2 * len(workflows)
        assert {(r.step_id, r.attempt, r.status) for r in rows} == {
            ("flush", 1, "succeeded"),
            ("verify", 1, "succeeded"),
        }
        # Every second copy changed nothing and was counted as a duplicate.
        await eventually(
            lambda: rig.rejected("duplicate", "results") == len(rows),
            timeout_s=10,
            what="duplicates counted",
        )


async def test_a_trigger_right_behind_a_workflows_last_result_starts_at_once(
    broker: BrokerHandle, db_url: str
) -> None:
    settings = controller_settings(broker, db_url)
    topics = Topics(settings.topic_root)
    async with running_controller(settings), bus(broker) as b:
        agent_id = (await b.register("w", agent_id=str(uuid.uuid4()))).agent_id
        mine = topics.tasks(agent_id)
        async with BusClient(broker.url, f"agent-{uuid.uuid4().hex[:8]}") as agent:
            await agent.subscribe(mine, qos=1)
            first = b.new_request(
                TriggerRequest,
                agent_id=agent_id,
                kb_id="dns-flush-kb",
                params={"name": "a.example"},
            )
            await b.request(RpcMethod.TRIGGER, first, TriggerReply)
            answered = 0
            async with asyncio.timeout(20):
                async for message in agent.messages:
                    if message.topic.value != mine or not message.payload:
                        continue
                    assert isinstance(message.payload, bytes)
                    task = decode(Task, message.payload)
                    if task.step_id == "flush":
                        result = encode(result_for(task, {}))
                        await agent.publish(topics.results(agent_id), result, qos=1)
                        answered += 1
                        continue
                    # The last step: its result, and on the same connection
                    # right behind it (both packets written at once, since
                    # aiomqtt hands a publish to paho before it awaits), the
                    # next trigger.
                    second = b.new_request(
                        TriggerRequest,
                        agent_id=agent_id,
                        kb_id="dns-flush-kb",
                        params={"name": "b.example"},
                    )
                    last = asyncio.create_task(
                        b.client.publish(
                            topics.results(agent_id),
                            encode(result_for(task, {})),
                            qos=1,
                        )
                    )
                    reply_bytes = asyncio.create_task(b.send(RpcMethod.TRIGGER, second))
                    await last
                    async with asyncio.timeout(5):
                        reply = decode(TriggerReply, await (await reply_bytes))
                    break
        assert answered == 1
        assert reply.workflow is not None, reply.error
        assert reply.workflow.status == "running"
