"""Each agent's current task and the long polls waiting for one.

The board mirrors the retained ``{root}/agents/+/tasks`` topics, which the
bridge follows over its one MQTT connection. A long poll either finds its
agent's task here at once or parks a future keyed by the agent id; the message
that brings the task resolves every future of that agent in the same callback,
so a wait costs a future and a list slot, not a task or a subscription.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.messages import Task


@dataclass(slots=True, eq=False)
class Waiter:
    """One parked long poll."""

    agent_id: str
    future: "asyncio.Future[Task | None]"
    #: Tells whether the client has gone, if the server lets us ask cheaply.
    client_gone: Callable[[], bool] | None = None
    #: ``time.perf_counter()`` when the task arrived, for the wake latency.
    woken_at: float = field(default=0.0)
    #: Set by ``sweep`` when the client went away.
    left: bool = False


class TaskBoard:
    """Current tasks, tasks already reported, known agents and parked polls."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        # The id of the task an agent last posted a result for over HTTP: its
        # retained message stays until the controller replaces or clears it,
        # and the agent must not be handed that task again meanwhile.
        self._reported: dict[str, str] = {}
        self._waiters: dict[str, list[Waiter]] = {}
        self._agents: set[str] = set()
        self.waiter_count = 0

    # --- tasks ---------------------------------------------------------------
    def set_task(self, agent_id: str, task: Task | None) -> int:
        """Record the agent's retained task (None: cleared); return polls woken."""
        if task is None:
            self._tasks.pop(agent_id, None)
            self._reported.pop(agent_id, None)
            return 0
        self._tasks[agent_id] = task
        if self._reported.get(agent_id) == task.task_id:
            return 0
        self._reported.pop(agent_id, None)
        return self._wake(agent_id, task)

    def pending(self, agent_id: str) -> Task | None:
        """The agent's task, unless it already reported a result for it."""
        task = self._tasks.get(agent_id)
        if task is None or self._reported.get(agent_id) == task.task_id:
            return None
        return task

    def mark_reported(self, agent_id: str, task_id: str) -> None:
        self._reported[agent_id] = task_id

    def unmark_reported(self, agent_id: str, task_id: str) -> None:
        """Undo ``mark_reported`` when the result could not be published."""
        if self._reported.get(agent_id) == task_id:
            del self._reported[agent_id]
            task = self._tasks.get(agent_id)
            if task is not None and task.task_id == task_id:
                self._wake(agent_id, task)

    def forget_tasks(self) -> None:
        """Drop every task: after a reconnect the broker sends the retained
        ones again, and a task cleared while we were away must not linger."""
        self._tasks.clear()

    @property
    def task_count(self) -> int:
        return len(self._tasks)

    # --- agents --------------------------------------------------------------
    def note_agent(self, agent_id: str) -> None:
        self._agents.add(agent_id)

    def knows(self, agent_id: str) -> bool:
        return agent_id in self._agents or agent_id in self._tasks

    @property
    def agent_count(self) -> int:
        return len(self._agents)

    # --- waiters -------------------------------------------------------------
    def park(
        self, agent_id: str, client_gone: Callable[[], bool] | None = None
    ) -> Waiter:
        future = asyncio.get_running_loop().create_future()
        waiter = Waiter(agent_id, future, client_gone)
        self._waiters.setdefault(agent_id, []).append(waiter)
        self.waiter_count += 1
        return waiter

    def unpark(self, waiter: Waiter) -> None:
        """Forget a waiter (answered, timed out or gone); safe to call twice."""
        waiters = self._waiters.get(waiter.agent_id)
        if waiters is None:
            return
        try:
            waiters.remove(waiter)
        except ValueError:
            return
        self.waiter_count -= 1
        if not waiters:
            del self._waiters[waiter.agent_id]
        if not waiter.future.done():
            waiter.future.cancel()

    def sweep(self) -> int:
        """Answer the waiters whose clients have gone; return how many."""
        gone = [
            w
            for waiters in self._waiters.values()
            for w in waiters
            if w.client_gone is not None and w.client_gone()
        ]
        for waiter in gone:
            waiter.left = True
            if not waiter.future.done():
                waiter.future.set_result(None)
            self.unpark(waiter)
        return len(gone)

    def release_all(self) -> None:
        """Answer every parked poll with nothing (the bridge is stopping)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(None)
        self._waiters.clear()
        self.waiter_count = 0

    def _wake(self, agent_id: str, task: Task) -> int:
        waiters = self._waiters.pop(agent_id, None)
        if not waiters:
            return 0
        now = time.perf_counter()
        for waiter in waiters:
            waiter.woken_at = now
            if not waiter.future.done():
                waiter.future.set_result(task)
        self.waiter_count -= len(waiters)
        return len(waiters)
