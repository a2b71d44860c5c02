"""What an agent does with a task, whatever carries it (MQTT or HTTP).

The rules, in the order they are checked:

1. a task for another agent is ignored;
2. a task id already finished is answered with the stored result, never run
   again (retained messages are redelivered on every reconnect, and the
   controller republishes dispatched tasks when it restarts);
3. the task already running is left alone;
4. an expired task is refused with a ``failed`` result, ``error: "expired"``;
5. anything else runs, replacing (and canceling) a running task: the retained
   topic holds one current task, so a new one means the old one is over.

A task id is written to the state file before it runs and its result before
the result is sent. A task interrupted by a crash is therefore never rerun: on
the next start it is finished with a ``failed`` result (``interrupted``).
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from random import Random

from agent_sim.actions import ActionRunner, Outcome
from agent_sim.store import AgentState
from schemas import MessageError, decode, encode
from schemas.messages import ResultStatus, Task, TaskResult, utcnow

log = logging.getLogger("kbbus.agent")

ERROR_EXPIRED = "expired"
ERROR_CANCELED = "canceled: the task was cleared or replaced"
ERROR_INTERRUPTED = "interrupted: the agent stopped while the task ran"

#: Sends a result (its JSON bytes) on whatever carries the agent's messages.
SendResult = Callable[[bytes], None]


@dataclass(slots=True)
class Counters:
    """Figures for the live summary line; one instance shared by a fleet."""

    connected: int = 0
    online: int = 0
    connects: int = 0
    reconnects: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    duplicates: int = 0
    expired: int = 0
    rejected: int = 0


class AgentCore:
    """Task handling for one agent; the transport gives it ``send``."""

    __slots__ = (
        "_running",
        "_running_id",
        "_seq",
        "counters",
        "index",
        "runner",
        "seed",
        "send",
        "state",
    )

    def __init__(
        self,
        state: AgentState,
        runner: ActionRunner,
        send: SendResult,
        *,
        counters: Counters | None = None,
        seed: int | None = None,
        index: int = 0,
    ) -> None:
        self.state = state
        self.runner = runner
        self.send = send
        self.counters = counters or Counters()
        self.seed = seed
        self.index = index
        self._seq = 0
        self._running: asyncio.Task[None] | None = None
        self._running_id: str | None = None
        self._recover()

    @property
    def agent_id(self) -> str:
        return self.state.agent_id

    @property
    def running_task_id(self) -> str | None:
        return self._running_id

    def _recover(self) -> None:
        for task_id in list(self.state.started or ()):
            log.warning(
                "task was running when the agent stopped; it will not run again: "
                "agent_id=%s task_id=%s",
                self.agent_id,
                task_id,
            )
            self._store(self._failed(task_id, ERROR_INTERRUPTED, None))

    # --- MQTT: the retained task topic -------------------------------------------
    def on_payload(self, payload: bytes) -> None:
        """A message on the agent's task topic; empty means "no current task"."""
        if not payload:
            self.cancel_running()
            return
        try:
            task = decode(Task, payload)
        except MessageError as exc:
            self.counters.rejected += 1
            log.warning(
                "ignoring an invalid task: agent_id=%s error=%s", self.agent_id, exc
            )
            return
        self.on_task(task)

    def on_task(self, task: Task) -> None:
        """Apply the rules of this module to ``task``; results go to ``send``."""
        if not self.is_mine(task):
            return
        answer = self.precheck(task)
        if answer is not None:
            self.send(answer)
            return
        if task.task_id == self._running_id:
            return
        self.cancel_running()
        self._running_id = task.task_id
        self._running = asyncio.create_task(self._run_and_send(task))

    def is_mine(self, task: Task) -> bool:
        if task.agent_id == self.agent_id:
            return True
        self.counters.rejected += 1
        log.warning(
            "ignoring a task for another agent: agent_id=%s task_agent_id=%s",
            self.agent_id,
            task.agent_id,
        )
        return False

    def precheck(self, task: Task) -> bytes | None:
        """The answer to ``task`` if it must not run (seen or expired), else None."""
        stored = self.state.result_of(task.task_id)
        if stored is not None:
            self.counters.duplicates += 1
            log.info(
                "task seen again, answering with the stored result: agent_id=%s "
                "task_id=%s",
                self.agent_id,
                task.task_id,
            )
            return stored.encode()
        if task.task_id != self._running_id and task.expires_at <= utcnow():
            self.counters.expired += 1
            log.info(
                "refusing an expired task: agent_id=%s task_id=%s expired_at=%s",
                self.agent_id,
                task.task_id,
                task.expires_at.isoformat(),
            )
            return self._store(self._failed(task.task_id, ERROR_EXPIRED, None))
        return None

    async def _run_and_send(self, task: Task) -> None:
        payload = await self.execute(task)
        if self._running_id == task.task_id:
            self._running = None
            self._running_id = None
        self.send(payload)

    # --- running ----------------------------------------------------------------
    async def execute(self, task: Task) -> bytes:
        """Run ``task`` (checked by ``precheck``) and store its result."""
        self.state.mark_started(task.task_id)
        await self.state.persist()
        started_at = utcnow()
        remaining_s = (task.expires_at - started_at).total_seconds()
        timeout_s = max(0.001, min(task.timeout_s, remaining_s))
        outcome = await self.runner.run(task.action, task.args, timeout_s, self._rng())
        result = self._result(task.task_id, outcome, started_at)
        if outcome.status is ResultStatus.SUCCEEDED:
            self.counters.tasks_done += 1
        else:
            self.counters.tasks_failed += 1
            log.info(
                "task failed: agent_id=%s task_id=%s action=%s error=%s",
                self.agent_id,
                task.task_id,
                task.action,
                outcome.error,
            )
        payload = encode(result)
        self.state.finish(result.task_id, payload.decode())
        await self.state.persist()
        return payload

    def _rng(self) -> Random:
        self._seq += 1
        if self.seed is None:
            return Random()
        # Seeded from (seed, agent number, task number): the same run of tasks
        # gives the same outcomes, without a generator kept per agent.
        return Random(f"{self.seed}:{self.index}:{self._seq}")

    def cancel_running(self) -> None:
        """Stop the running task for good: it is finished as canceled, unsent."""
        if self._running is None or self._running_id is None:
            return
        task_id = self._running_id
        self._running.cancel()
        self._running = None
        self._running_id = None
        log.info(
            "canceled the running task: agent_id=%s task_id=%s", self.agent_id, task_id
        )
        self._store(self._failed(task_id, ERROR_CANCELED, None))

    def interrupt(self) -> bytes | None:
        """At shutdown: stop the running task; its ``failed`` result to send."""
        if self._running is None or self._running_id is None:
            return None
        task_id = self._running_id
        self._running.cancel()
        self._running = None
        self._running_id = None
        return self._store(self._failed(task_id, ERROR_INTERRUPTED, None))

    # --- results ----------------------------------------------------------------
    def _result(
        self, task_id: str, outcome: Outcome, started_at: datetime | None
    ) -> TaskResult:
        return TaskResult(
            agent_id=self.agent_id,
            task_id=task_id,
            status=outcome.status,
            exit_code=outcome.exit_code,
            output=outcome.output,
            error=outcome.error,
            started_at=started_at,
        )

    def _failed(
        self, task_id: str, error: str, started_at: datetime | None
    ) -> TaskResult:
        return self._result(task_id, Outcome.failed(error, exit_code=None), started_at)

    def _store(self, result: TaskResult) -> bytes:
        """Remember ``result`` and write the file now (the rare, blocking path)."""
        payload = encode(result)
        self.state.finish(result.task_id, payload.decode())
        self.state.save()
        return payload
