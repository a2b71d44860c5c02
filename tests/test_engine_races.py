"""Two controllers on one database: racing transitions, exactly one wins.

Each "controller" here is a session (or a thread with its own sessions) on the
same database; the loser of a race must fail cleanly and, run again from fresh
state, do nothing wrong.
"""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from controller.db import StepExecution, Workflow
from controller.effects import Publish
from schemas.messages import ResultStatus, TaskResult
from tests.support.engine_rig import Effects, EngineRig

T = TypeVar("T")

SLOW_KB = {
    "id": "slow-kb",
    "title": "A step that times out",
    "steps": [
        {
            "id": "wait",
            "action": "sleep",
            "timeout_s": 5,
            "max_attempts": 2,
            "backoff_s": 0,
        }
    ],
}


@pytest.fixture
def rig(db_url: str, tmp_path: Path) -> Iterator[EngineRig]:
    (tmp_path / "slow-kb.yaml").write_text(yaml.safe_dump(SLOW_KB))
    rig = EngineRig(db_url, [tmp_path])
    rig.add_agent("a1")
    try:
        yield rig
    finally:
        rig.close()


def all_at_once(count: int, call: Callable[[], T]) -> list[T]:
    """Run ``call`` in ``count`` threads released together."""
    barrier = threading.Barrier(count, timeout=10)

    def run() -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(run) for _ in range(count)]
        return [f.result(timeout=30) for f in futures]


def test_two_sessions_on_one_result_exactly_one_wins(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "disk-cleanup-kb")
    task = fx.task()
    result = TaskResult(
        agent_id="a1", task_id=task.task_id, status=ResultStatus.SUCCEEDED
    )
    loser = rig.store.sessions()
    try:
        # The loser reads the step and its workflow before the winner commits
        # (and keeps them: the session's identity map holds only weak refs)...
        stale = (
            loser.get(StepExecution, task.task_id),
            loser.get(Workflow, view.workflow_id),
        )
        assert stale[0] is not None
        assert stale[0].status == "dispatched"
        won = Effects(
            rig.run(lambda s: rig.engine.handle_result(s, "a1", result, rig.now))
        )
        assert won.task().step_id == "cleanup"
        # ...and writes after it: the workflow's version no longer matches, or
        # the next step's first attempt exists already, whichever comes first.
        # (The engine flushes, so the loss shows before any commit.)
        with pytest.raises((StaleDataError, IntegrityError)):
            rig.engine.handle_result(loser, "a1", result, rig.now)
        loser.rollback()
    finally:
        loser.close()

    # Run again from fresh state, the loser sees a finished step: a duplicate.
    assert rig.result(task).publishes == []
    rows = rig.executions(view.workflow_id)
    assert [(r.step_id, r.attempt, r.status) for r in rows] == [
        ("usage_before", 1, "succeeded"),
        ("cleanup", 1, "dispatched"),
    ]


def test_threads_racing_on_one_result(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "dns-flush-kb")
    task = fx.task()
    result = TaskResult(
        agent_id="a1", task_id=task.task_id, status=ResultStatus.SUCCEEDED
    )

    def handle() -> list[Publish]:
        return rig.run(lambda s: rig.engine.handle_result(s, "a1", result, rig.now))

    outcomes = all_at_once(4, handle)
    winners = [Effects(o) for o in outcomes if o]
    assert len(winners) == 1
    assert winners[0].task().step_id == "verify"
    rows = rig.executions(view.workflow_id)
    assert [(r.step_id, r.status) for r in rows] == [
        ("flush", "succeeded"),
        ("verify", "dispatched"),
    ]


def test_threads_triggering_on_one_idle_agent_start_one_workflow(
    rig: EngineRig,
) -> None:
    names = iter(f"n{i}.example" for i in range(5))
    lock = threading.Lock()

    def trigger() -> Effects:
        with lock:
            name = next(names)
        return rig.trigger("a1", "dns-flush-kb", {"name": name})[2]

    outcomes = all_at_once(5, trigger)
    assert sum(len(o.tasks) for o in outcomes) == 1
    assert sorted(k for o in outcomes for k in o.kinds) == sorted(
        ["workflow.started", "step.dispatched"] + ["workflow.queued"] * 4
    )

    def statuses(session: Session) -> list[str]:
        return sorted(w.status for w in session.query(Workflow))

    assert rig.run(statuses) == ["queued"] * 4 + ["running"]


def test_threads_racing_on_one_idempotency_key_create_one_workflow(
    rig: EngineRig,
) -> None:
    outcomes = all_at_once(
        4, lambda: rig.trigger("a1", "dns-flush-kb", {"name": "x.org"}, "same-key")
    )
    assert len({view.workflow_id for view, _, _ in outcomes}) == 1
    assert [created for _, created, _ in outcomes].count(True) == 1
    assert rig.run(lambda s: s.query(Workflow).count()) == 1


def test_ticks_racing_on_overdue_steps_time_each_out_once(rig: EngineRig) -> None:
    agents = [rig.add_agent(f"t{i}") for i in range(6)]
    workflows = [rig.trigger(a, "slow-kb")[0].workflow_id for a in agents]
    rig.advance(5)

    outcomes = all_at_once(3, rig.tick)
    retried = sorted(t.agent_id for o in outcomes for t in o.tasks)
    assert retried == agents
    for workflow_id in workflows:
        rows = rig.executions(workflow_id)
        assert [(r.attempt, r.status) for r in rows] == [
            (1, "timed_out"),
            (2, "dispatched"),
        ]
    assert rig.tick().publishes == []


def test_a_tick_that_loses_to_a_result_does_nothing_wrong(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "slow-kb")
    task = fx.task()
    rig.advance(5)
    loser = rig.store.sessions()
    try:
        stale = loser.get(Workflow, view.workflow_id)
        assert stale is not None
        # The result lands first; the tick that read the workflow earlier
        # must not time out the step that just succeeded.
        rig.result(task)
        try:
            assert rig.engine.tick(loser, rig.now) == []
            loser.commit()
        except (StaleDataError, OperationalError):
            loser.rollback()
    finally:
        loser.close()
    assert rig.view(view.workflow_id).status == "succeeded"
    assert rig.tick().publishes == []
