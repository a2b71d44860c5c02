"""The workflow engine against a real database (SQLite and PostgreSQL).

No broker here: each test plays the controller (``EngineRig``), commits every
call, and checks the publishes the engine asks for and the rows it wrote.
"""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from controller.db import Workflow
from controller.engine import EngineError
from schemas.messages import Task, TaskResult
from tests.support.engine_rig import T0, EngineRig

TEST_KBS: list[dict[str, Any]] = [
    {
        "id": "flaky-kb",
        "title": "A step that may need retries",
        "steps": [
            {"id": "op", "action": "echo", "max_attempts": 3, "backoff_s": 2},
            {"id": "after", "action": "echo"},
        ],
    },
    {
        "id": "slow-kb",
        "title": "A step that may time out",
        "steps": [
            {
                "id": "wait",
                "action": "sleep",
                "args": {"seconds": 60},
                "timeout_s": 5,
                "max_attempts": 2,
                "backoff_s": 0,
            }
        ],
    },
    {
        "id": "chain-kb",
        "title": "Arguments from an earlier step",
        "steps": [
            {"id": "first", "action": "dns.resolve", "args": {"name": "db"}},
            {
                "id": "second",
                "action": "echo",
                "args": {
                    "message": "{{ steps.first.output | trim }} "
                    "rc={{ steps.first.exit_code }} {{ steps.first.status }}",
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
        ],
    },
]

# Each shipped KB, parameters for it, and what the agent answers per action.
SHIPPED_RUNS = [
    ("dns-flush-kb", {"name": "example.org"}),
    ("disk-cleanup-kb", {}),
    ("service-restart-kb", {"service": "nginx"}),
    ("collect-diagnostics-kb", {}),
]


@pytest.fixture
def rig(db_url: str, tmp_path: Path) -> Iterator[EngineRig]:
    kb_dir = tmp_path / "kbs"
    kb_dir.mkdir()
    for kb in TEST_KBS:
        (kb_dir / f"{kb['id']}.yaml").write_text(yaml.safe_dump(kb))
    rig = EngineRig(db_url, [kb_dir])
    rig.add_agent("a1")
    try:
        yield rig
    finally:
        rig.close()


def count_statements(rig: EngineRig) -> list[str]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(str(args[2]).split()[0].upper())

    event.listen(rig.store.engine, "before_cursor_execute", record)
    return statements


# --- every shipped KB -------------------------------------------------------------


@pytest.mark.parametrize(("kb_id", "params"), SHIPPED_RUNS)
def test_each_shipped_kb_runs_to_success(
    rig: EngineRig, kb_id: str, params: dict[str, object]
) -> None:
    kb = rig.catalog.kbs[kb_id]
    view, created, fx = rig.trigger("a1", kb_id, params)
    assert created
    assert view.status == "running"
    (first,) = [p for p in fx.publishes if p.topic == "kbbus/v1/agents/a1/tasks"]
    assert (first.qos, first.retain) == (1, True)

    kinds = list(fx.kinds)
    tasks: list[Task] = []
    while fx.tasks:
        task = fx.task()
        tasks.append(task)
        assert task.expires_at == task.issued_at + timedelta(seconds=task.timeout_s)
        rig.advance(1)
        fx = rig.result(task, output=f"{task.action} done\n")
        kinds += fx.kinds

    assert [t.step_id for t in tasks] == [s.id for s in kb.steps]
    assert all(t.attempt == 1 and t.kb_id == kb_id for t in tasks)
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert fx.cleared == ["a1"]
    assert kinds == [
        "workflow.started",
        *["step.dispatched", "step.finished"] * len(kb.steps),
        "workflow.finished",
    ]
    assert fx.events[-1].data["status"] == "succeeded"

    final = rig.view(view.workflow_id)
    assert final.status == "succeeded"
    assert final.finished_at == T0 + timedelta(seconds=len(kb.steps))
    for step in final.steps:
        (attempt,) = step.attempts
        assert (step.status, attempt.status, attempt.exit_code) == (
            "succeeded",
            "succeeded",
            0,
        )
        assert attempt.output == f"{step.action} done\n"

    args = {t.step_id: t.args for t in tasks}
    expected = {
        "dns-flush-kb": ("verify", {"name": "example.org"}),
        "disk-cleanup-kb": ("cleanup", {"path": "/tmp", "older_than_days": 7}),
        "service-restart-kb": ("restart", {"service": "nginx"}),
        "collect-diagnostics-kb": (
            "summary",
            {"message": "diagnostics: collect=succeeded disk=succeeded dns=succeeded"},
        ),
    }[kb_id]
    assert args[expected[0]] == expected[1]


# --- failures, retries, timeouts ----------------------------------------------


def test_failing_step_is_retried_with_doubling_backoff_then_fails(
    rig: EngineRig,
) -> None:
    view, _, fx = rig.trigger("a1", "flaky-kb")
    task_ids = []
    for attempt, backoff_s in [(1, 2.0), (2, 4.0)]:
        task = fx.task()
        assert task.attempt == attempt
        task_ids.append(task.task_id)
        fx = rig.result(task, "failed", exit_code=3, error="boom")
        # Nothing to run during the backoff: the retained task is cleared.
        assert (fx.tasks, fx.cleared, fx.kinds) == ([], ["a1"], ["step.finished"])
        rig.advance(backoff_s - 0.1)
        assert rig.tick().publishes == []
        rig.advance(0.1)
        fx = rig.tick()
        assert fx.kinds == ["step.dispatched"]
        assert fx.task().args == task.args
    last = fx.task()
    assert last.attempt == 3
    assert last.task_id not in task_ids
    fx = rig.result(last, "failed", exit_code=3, error="boom")
    assert fx.cleared == ["a1"]
    assert fx.kinds == ["step.finished", "workflow.finished"]
    assert fx.events[-1].data["status"] == "failed"

    final = rig.view(view.workflow_id)
    assert final.status == "failed"
    assert final.error == "step 'op' failed after 3 attempt(s): boom"
    op, after = final.steps
    assert [a.status for a in op.attempts] == ["failed"] * 3
    assert [a.exit_code for a in op.attempts] == [3] * 3
    assert op.attempts[1].dispatched_at == T0 + timedelta(seconds=2)
    assert op.attempts[2].dispatched_at == T0 + timedelta(seconds=6)
    assert (after.status, after.attempts) == ("pending", [])


def test_a_retry_that_succeeds_goes_on(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "flaky-kb")
    rig.result(fx.task(), "failed", exit_code=1)
    rig.advance(2)
    retry = rig.tick().task()
    fx = rig.result(retry, output="second time lucky")
    assert fx.task().step_id == "after"
    rig.run_to_end(fx)
    final = rig.view(view.workflow_id)
    assert final.status == "succeeded"
    assert [a.status for a in final.steps[0].attempts] == ["failed", "succeeded"]


def test_step_timeout_comes_from_tick_and_is_retried(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "slow-kb")
    first = fx.task()
    # An agent that goes offline keeps its task retained; the timeout still runs.
    rig.set_agent_status("a1", "offline")
    rig.advance(4.9)
    assert rig.tick().publishes == []
    rig.advance(0.1)
    fx = rig.tick()
    assert fx.kinds == ["step.finished", "step.dispatched"]
    assert fx.events[0].data["status"] == "timed_out"
    second = fx.task()
    assert (second.attempt, second.expires_at) == (2, rig.now + timedelta(seconds=5))

    # A result that comes after its timeout changes nothing.
    assert rig.result(first, output="late").publishes == []

    rig.advance(5)
    fx = rig.tick()
    assert fx.cleared == ["a1"]
    assert fx.kinds == ["step.finished", "workflow.finished"]
    final = rig.view(view.workflow_id)
    assert final.status == "timed_out"
    assert [a.status for a in final.steps[0].attempts] == ["timed_out"] * 2
    assert final.steps[0].attempts[0].output is None
    assert final.error is not None
    assert "no result within 5 s" in final.error


def test_tick_finds_overdue_steps_with_one_query(rig: EngineRig) -> None:
    agents = [rig.add_agent(f"t{i}") for i in range(5)]
    for agent_id in agents:
        rig.trigger(agent_id, "slow-kb")
    rig.advance(5)
    statements = count_statements(rig)
    fx = rig.tick()
    assert sorted(t.agent_id for t in fx.tasks) == agents
    # The overdue steps, the due retries, the idle queues: three reads in all.
    assert statements.count("SELECT") == 3


def test_on_failure_continue_goes_on_to_the_next_step(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "service-restart-kb", {"service": "nginx"})
    assert fx.task().step_id == "status_before"
    fx = rig.result(fx.task(), "failed", exit_code=3, output="inactive (dead)")
    assert fx.task().step_id == "restart"
    rig.run_to_end(fx)
    final = rig.view(view.workflow_id)
    assert final.status == "succeeded"
    assert [s.status for s in final.steps] == ["failed", "succeeded", "succeeded"]
    assert final.steps[0].attempts[0].output == "inactive (dead)"


def test_timed_out_step_with_continue_goes_on(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "collect-diagnostics-kb")
    fx = rig.result(fx.task())
    assert fx.task().step_id == "disk"
    rig.advance(30)
    fx = rig.tick()
    assert fx.task().step_id == "dns"
    fx = rig.result(fx.task())
    assert fx.task().args == {
        "message": "diagnostics: collect=succeeded disk=timed_out dns=succeeded"
    }
    rig.run_to_end(fx)
    assert rig.view(view.workflow_id).status == "succeeded"


# --- templates from earlier steps ---------------------------------------------


def test_arguments_come_from_earlier_steps_outputs(rig: EngineRig) -> None:
    _, _, fx = rig.trigger("a1", "chain-kb")
    fx = rig.result(fx.task(), output=" 10.0.0.7\n")
    assert fx.task().args == {"message": "10.0.0.7 rc=0 succeeded", "code": 0}


def test_an_argument_that_cannot_render_fails_the_step_without_a_task(
    rig: EngineRig,
) -> None:
    view, _, fx = rig.trigger("a1", "bad-render-kb")
    fx = rig.result(fx.task())
    assert fx.tasks == []
    assert fx.cleared == ["a1"]
    assert fx.kinds == ["step.finished", "step.finished", "workflow.finished"]
    final = rig.view(view.workflow_id)
    assert final.status == "failed"
    (attempt,) = final.steps[1].attempts
    assert attempt.status == "failed"
    assert attempt.dispatched_at is None
    assert attempt.error is not None
    assert "has no attribute 'x'" in attempt.error


def test_full_output_is_kept_and_shown(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "dns-flush-kb")
    output = "".join(f"line {i:06d}\n" for i in range(18_000))  # ~216 KB
    rig.result(fx.task(), output=output)
    assert rig.view(view.workflow_id).steps[0].attempts[0].output == output


# --- one workflow per agent, queueing, presence -------------------------------


def test_triggers_on_one_agent_run_one_at_a_time_in_order(rig: EngineRig) -> None:
    w1, _, fx1 = rig.trigger("a1", "dns-flush-kb")
    rig.advance(1)
    w2, _, fx2 = rig.trigger("a1", "disk-cleanup-kb")
    rig.advance(1)
    w3, _, fx3 = rig.trigger("a1", "service-restart-kb", {"service": "cron"})
    assert [w.status for w in (w1, w2, w3)] == ["running", "queued", "queued"]
    assert (fx2.tasks, fx2.kinds) == ([], ["workflow.queued"])
    assert (fx3.tasks, fx3.kinds) == ([], ["workflow.queued"])

    fx = rig.result(fx1.task())
    fx = rig.result(fx.task())
    # The next queued workflow's first task replaces the retained one: no clear.
    assert fx.cleared == []
    assert fx.task().workflow_id == w2.workflow_id
    assert fx.kinds[-3:] == ["workflow.finished", "workflow.started", "step.dispatched"]
    fx = rig.result(fx.task())
    assert rig.view(w3.workflow_id).status == "queued"
    fx = rig.result(fx.task())
    fx = rig.result(fx.task())
    assert fx.task().workflow_id == w3.workflow_id
    rig.run_to_end(fx)

    listed = rig.run(lambda s: rig.engine.list_workflows(s, "a1", None, 10))
    assert [w.workflow_id for w in listed] == [
        w3.workflow_id,
        w2.workflow_id,
        w1.workflow_id,
    ]
    assert all(w.status == "succeeded" and w.steps for w in listed)
    finished = [rig.workflow(w.workflow_id) for w in (w1, w2, w3)]
    assert finished[0].finished_at <= finished[1].started_at  # type: ignore[operator]
    assert finished[1].finished_at <= finished[2].started_at  # type: ignore[operator]
    only_one = rig.run(lambda s: rig.engine.list_workflows(s, None, "succeeded", 1))
    assert [w.workflow_id for w in only_one] == [w3.workflow_id]


def test_workflow_for_offline_agent_waits_until_it_is_online(rig: EngineRig) -> None:
    rig.add_agent("off", status="offline")
    view, _, fx = rig.trigger("off", "dns-flush-kb")
    assert (view.status, fx.tasks, fx.kinds) == ("queued", [], ["workflow.queued"])
    rig.advance(60)
    assert rig.tick().publishes == []
    assert rig.agents_online("off").publishes == []

    rig.set_agent_status("off", "online")
    fx = rig.agents_online("off")
    assert fx.kinds == ["workflow.started", "step.dispatched"]
    assert fx.task().workflow_id == view.workflow_id
    assert rig.view(view.workflow_id).started_at == rig.now


def test_tick_starts_queued_workflows_nothing_else_started(rig: EngineRig) -> None:
    rig.add_agent("late", status="offline")
    view, _, _ = rig.trigger("late", "dns-flush-kb")
    rig.set_agent_status("late", "online")
    fx = rig.tick()
    assert fx.task().workflow_id == view.workflow_id
    assert rig.tick().publishes == []


def test_the_database_holds_one_running_workflow_per_agent(rig: EngineRig) -> None:
    rig.trigger("a1", "dns-flush-kb")
    second, _, _ = rig.trigger("a1", "dns-flush-kb")

    def force_running(session: Any) -> None:
        wf = session.get(Workflow, second.workflow_id)
        wf.status = "running"

    with pytest.raises(IntegrityError):
        rig.store.transact(force_running)


# --- cancel -------------------------------------------------------------------


def test_cancel_while_a_step_runs_clears_the_task(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "dns-flush-kb")
    task = fx.task()
    rig.advance(1)
    canceled, fx = rig.cancel(view.workflow_id)
    assert canceled.status == "canceled"
    assert (fx.tasks, fx.cleared) == ([], ["a1"])
    assert fx.kinds == ["step.finished", "workflow.finished"]
    assert fx.events[0].data["status"] == "canceled"
    assert canceled.steps[0].attempts[0].status == "canceled"
    assert canceled.finished_at == rig.now

    # The agent's result for the canceled task, and a second cancel, change nothing.
    assert rig.result(task).publishes == []
    again, fx = rig.cancel(view.workflow_id)
    assert (again.status, fx.publishes) == ("canceled", [])
    assert [e.status for e in rig.executions(view.workflow_id)] == ["canceled"]


def test_cancel_starts_the_next_queued_workflow(rig: EngineRig) -> None:
    w1, _, _ = rig.trigger("a1", "dns-flush-kb")
    w2, _, _ = rig.trigger("a1", "disk-cleanup-kb")
    _, fx = rig.cancel(w1.workflow_id)
    assert fx.task().workflow_id == w2.workflow_id


def test_cancel_in_backoff_and_cancel_of_a_queued_workflow(rig: EngineRig) -> None:
    w1, _, fx = rig.trigger("a1", "flaky-kb")
    w2, _, _ = rig.trigger("a1", "dns-flush-kb")
    w3, _, _ = rig.trigger("a1", "dns-flush-kb")
    rig.result(fx.task(), "failed")
    # Canceling a queued workflow does not touch the running one's task.
    view, fx = rig.cancel(w2.workflow_id)
    assert (view.status, fx.tasks, fx.cleared) == ("canceled", [], [])
    # The retry waiting for its backoff is canceled; w3 starts.
    view, fx = rig.cancel(w1.workflow_id)
    assert [a.status for a in view.steps[0].attempts] == ["failed", "canceled"]
    assert fx.task().workflow_id == w3.workflow_id
    rig.advance(10)
    assert rig.tick().publishes == []


def test_cancel_of_an_unknown_workflow_is_not_found(rig: EngineRig) -> None:
    with pytest.raises(EngineError, match="unknown") as info:
        rig.cancel("no-such-workflow")
    assert info.value.code == "not_found"


# --- triggering ---------------------------------------------------------------


def test_idempotency_key_returns_the_existing_workflow(rig: EngineRig) -> None:
    rig.add_agent("a2")
    first, created, fx = rig.trigger("a1", "dns-flush-kb", {"name": "x.org"}, "k-1")
    assert created
    again, created, fx2 = rig.trigger("a1", "dns-flush-kb", {"name": "x.org"}, "k-1")
    assert (again.workflow_id, created, fx2.publishes) == (first.workflow_id, False, [])
    assert again.steps[0].attempts[0].task_id == fx.task().task_id

    with pytest.raises(EngineError, match="use a new key") as info:
        rig.trigger("a1", "dns-flush-kb", {"name": "y.org"}, "k-1")
    assert info.value.code == "conflict"
    other, created, _ = rig.trigger("a2", "dns-flush-kb", {"name": "x.org"}, "k-1")
    assert created
    assert other.workflow_id != first.workflow_id

    rig.run_to_end(fx)
    done, created, _ = rig.trigger("a1", "dns-flush-kb", {"name": "x.org"}, "k-1")
    assert (done.workflow_id, done.status, created) == (
        first.workflow_id,
        "succeeded",
        False,
    )


@pytest.mark.parametrize(
    ("agent_id", "kb_id", "params", "code", "message"),
    [
        ("ghost", "dns-flush-kb", {}, "not_found", "Agent 'ghost'"),
        ("a1", "no-such-kb", {}, "not_found", "KB 'no-such-kb'"),
        ("a1", "service-restart-kb", {}, "invalid", "params.service"),
        ("a1", "service-restart-kb", {"service": "a b"}, "invalid", "params.service"),
        ("a1", "disk-cleanup-kb", {"older_than_days": 0}, "invalid", "older_than"),
    ],
)
def test_trigger_refusals(
    rig: EngineRig,
    agent_id: str,
    kb_id: str,
    params: dict[str, object],
    code: str,
    message: str,
) -> None:
    with pytest.raises(EngineError, match=message) as info:
        rig.trigger(agent_id, kb_id, params)
    assert info.value.code == code
    assert rig.run(lambda s: s.query(Workflow).count()) == 0


# --- results ------------------------------------------------------------------


def test_a_duplicate_result_changes_nothing(rig: EngineRig) -> None:
    view, _, fx = rig.trigger("a1", "dns-flush-kb")
    task = fx.task()
    assert rig.result(task, output="first").tasks != []
    before = rig.executions(view.workflow_id)
    version = rig.workflow(view.workflow_id).version
    assert rig.result(task, output="first").publishes == []
    assert rig.result(task, "failed", output="other").publishes == []
    after = rig.executions(view.workflow_id)
    assert [(e.id, e.status, e.output) for e in after] == [
        (e.id, e.status, e.output) for e in before
    ]
    assert after[0].output == "first"
    assert rig.workflow(view.workflow_id).version == version


def test_a_foreign_or_unknown_result_is_rejected(rig: EngineRig) -> None:
    rig.add_agent("a2")
    view, _, fx = rig.trigger("a1", "dns-flush-kb")
    task = fx.task()
    with pytest.raises(EngineError, match="another agent") as info:
        rig.result(task, from_agent="a2")
    assert info.value.code == "conflict"
    with pytest.raises(EngineError) as info:
        rig.run(lambda s: rig.engine.check_task(s, "a2", task.task_id))
    assert info.value.code == "conflict"
    rig.run(lambda s: rig.engine.check_task(s, "a1", task.task_id))
    with pytest.raises(EngineError) as info:
        rig.run(lambda s: rig.engine.check_task(s, "a1", "no-such-task"))
    assert info.value.code == "not_found"

    # The result's agent_id must match the topic it came on.
    spoofed = TaskResult(agent_id="a1", task_id=task.task_id, status="succeeded")
    with pytest.raises(EngineError) as info:
        rig.run(lambda s: rig.engine.handle_result(s, "a2", spoofed, rig.now))
    assert info.value.code == "conflict"
    unknown = task.model_copy(update={"task_id": "no-such-task"})
    with pytest.raises(EngineError) as info:
        rig.result(unknown)
    assert info.value.code == "not_found"

    (row,) = rig.executions(view.workflow_id)
    assert (row.status, row.output) == ("dispatched", None)


def test_handle_result_is_a_handful_of_statements(rig: EngineRig) -> None:
    _, _, fx = rig.trigger("a1", "disk-cleanup-kb")
    statements = count_statements(rig)
    fx = rig.result(fx.task())
    # Read the step with its workflow; write the workflow, the step, the next step.
    assert sorted(statements) == ["INSERT", "SELECT", "UPDATE", "UPDATE"]
    fx = rig.result(fx.task())
    statements.clear()
    fx = rig.result(fx.task())
    # The last step also looks for the agent's next queued workflow.
    assert fx.cleared == ["a1"]
    assert sorted(statements) == ["SELECT", "SELECT", "UPDATE", "UPDATE"]


# --- restart ------------------------------------------------------------------


def test_reconcile_republishes_dispatched_tasks_and_clears_stale_ones(
    db_url: str, rig: EngineRig
) -> None:
    for agent_id in ("a2", "a3", "a4", "a5"):
        rig.add_agent(agent_id)
    # a5's last task expired long ago: the agent refuses it, no clear needed.
    rig.run_to_end(rig.trigger("a5", "dns-flush-kb")[2])
    rig.advance(3600)
    _, _, fx1 = rig.trigger("a1", "dns-flush-kb")
    _, _, fx2 = rig.trigger("a2", "slow-kb")
    rig.run_to_end(rig.trigger("a3", "dns-flush-kb")[2])
    _, _, fx4 = rig.trigger("a4", "flaky-kb")
    rig.result(fx4.task(), "failed")  # a4 now waits for its backoff

    def versions(session: Any) -> list[tuple[str, int]]:
        return sorted((w.id, w.version) for w in session.query(Workflow))

    before = rig.run(versions)
    # A restarted controller: a new engine on the same database.
    restarted = EngineRig(db_url, rig.kb_dirs)
    try:
        restarted.now = rig.advance(1)
        fx = restarted.reconcile()
        originals = {
            p.topic: p.payload
            for p in fx1.publishes + fx2.publishes
            if p.topic.endswith("/tasks")
        }
        # The same tasks, byte for byte: same ids, same expiry.
        assert {p.topic: p.payload for p in fx.publishes if p.payload} == originals
        assert all(p.retain and p.qos == 1 for p in fx.publishes)
        assert fx.cleared == ["a3", "a4"]
        assert fx.events == []
        assert restarted.run(versions) == before

        # The workflow goes on from the republished task, and only once.
        fx = restarted.result(fx1.task())
        assert fx.task().step_id == "verify"
        assert restarted.result(fx1.task()).publishes == []
    finally:
        restarted.close()
