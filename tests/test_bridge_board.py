"""The long-poll board on its own: waking, reported tasks, and the cost of a wait."""

import asyncio
import tracemalloc
from datetime import UTC, datetime, timedelta

from bridge_http.board import TaskBoard, Waiter
from schemas.messages import Task


def task(agent_id: str, task_id: str) -> Task:
    now = datetime.now(UTC)
    return Task(
        task_id=task_id,
        agent_id=agent_id,
        workflow_id="wf",
        kb_id="kb",
        step_id="s",
        step_index=0,
        attempt=1,
        action="shell.run",
        timeout_s=5,
        expires_at=now + timedelta(seconds=5),
    )


def woken_with(waiter: Waiter) -> str | None:
    result = waiter.future.result()
    return result.task_id if result is not None else None


async def test_a_task_wakes_only_its_agents_waiters() -> None:
    board = TaskBoard()
    a1, a2, b = board.park("a"), board.park("a"), board.park("b")
    assert board.set_task("a", task("a", "t1")) == 2
    assert woken_with(a1) == woken_with(a2) == "t1"
    assert not b.future.done()
    assert board.waiter_count == 1
    board.unpark(a1)  # already woken: a no-op
    board.unpark(b)
    assert b.future.cancelled()
    assert board.waiter_count == 0


async def test_a_reported_task_is_held_back_until_replaced() -> None:
    board = TaskBoard()
    board.set_task("a", task("a", "t1"))
    board.mark_reported("a", "t1")
    assert board.pending("a") is None
    # The same retained task delivered again (a reconnect) wakes nobody.
    waiter = board.park("a")
    assert board.set_task("a", task("a", "t1")) == 0
    assert not waiter.future.done()
    assert board.set_task("a", task("a", "t2")) == 1
    assert board.pending("a") is not None


async def test_a_failed_publish_gives_the_task_back() -> None:
    board = TaskBoard()
    board.set_task("a", task("a", "t1"))
    board.mark_reported("a", "t1")
    waiter = board.park("a")
    board.unmark_reported("a", "t1")
    assert woken_with(waiter) == "t1"


async def test_cleared_and_forgotten_tasks() -> None:
    board = TaskBoard()
    board.set_task("a", task("a", "t1"))
    board.set_task("a", None)
    assert board.pending("a") is None
    board.set_task("b", task("b", "t2"))
    board.forget_tasks()
    assert board.pending("b") is None
    assert board.task_count == 0


async def test_release_all_answers_every_waiter_with_nothing() -> None:
    board = TaskBoard()
    waiters = [board.park(f"a{i}") for i in range(10)]
    board.release_all()
    assert all(w.future.result() is None for w in waiters)
    assert board.waiter_count == 0


async def test_ten_thousand_waiters_are_cheap() -> None:
    board = TaskBoard()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        waiters = [board.park(f"agent-{i}") for i in range(10_000)]
        per_waiter = (tracemalloc.get_traced_memory()[0] - before) / len(waiters)
    finally:
        tracemalloc.stop()
    # A future, a small slotted object and a dict entry: well under 1 KiB.
    assert per_waiter < 1024, per_waiter
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(10_000):
        board.set_task(f"agent-{i}", task(f"agent-{i}", f"t{i}"))
    assert all(w.future.done() for w in waiters)
    assert loop.time() - started < 2
