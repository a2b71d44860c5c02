"""What an agent does with a task, whatever carries it (MQTT or HTTP).

The rules, in the order they are checked:

1. a task for another agent is refused (``misaddressed``);
2. when the controller signs tasks (``trust.TrustStore``), a task without a
   signature, signed by a key not trusted, or whose signature does not cover
   it exactly is refused; one signed by a key not known *yet* waits up to
   ``UNKNOWN_KEY_GRACE_S`` for the controller's new key set first, and any task
   waits while no registration has said whether tasks are signed;
3. a task id seen before with another nonce, or a nonce seen before with
   another task id, is refused (``replayed``): the controller gives a task the
   same nonce every time it republishes it;
4. a task id already finished is answered with the stored result, never run
   again (retained messages are redelivered on every reconnect, and the
   controller republishes dispatched tasks when it restarts);
5. the task already running is left alone;
6. an expired task is refused (``expired``);
7. anything else runs, replacing (and canceling) a running task: the retained
   topic holds one current task, so a new one means the old one is over.

A refusal is reported as a ``failed`` result with ``error: "refused: <reason>"``
and a WARNING; only the expired one is stored (the others may be forgeries of
a task id the controller has yet to send).

A task id is written to the state file before it runs and its result before
the result is sent. A task interrupted by a crash is therefore never rerun: on
the next start it is finished with a ``failed`` result (``interrupted``).
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from random import Random

from agent_sim.actions import ActionRunner, Outcome
from agent_sim.store import AgentState
from agent_sim.trust import UNKNOWN_KEY, Mode, TrustStore
from schemas import MessageError, decode, encode
from schemas.messages import ResultStatus, Task, TaskResult, utcnow

log = logging.getLogger("kbbus.agent")

REFUSED = "refused: "
ERROR_EXPIRED = REFUSED + "expired"
MISADDRESSED = "misaddressed"
REPLAYED = "replayed"
NO_KEYS = "no trusted keys"
#: How long a task signed by an unknown key waits for a new key set.
UNKNOWN_KEY_GRACE_S = 10.0
#: Task ids (and their nonces) remembered per agent for replay checks.
MAX_NONCES = 256
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
        "_held",
        "_held_timer",
        "_nonce_owner",
        "_nonces",
        "_running",
        "_running_id",
        "_seq",
        "counters",
        "index",
        "runner",
        "seed",
        "send",
        "state",
        "trust",
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
        trust: TrustStore | None = None,
    ) -> None:
        self.state = state
        #: None: no signature checks at all (tests of the task rules alone).
        self.trust = trust
        self._held: Task | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        #: task id -> nonce, oldest first; and nonce -> task id.
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._nonce_owner: dict[str, str] = {}
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
            self._drop_held()
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
        if self.must_wait(task):
            self._hold(task)
            return
        self._drop_held()
        answer = self.admit(task)
        if answer is not None:
            self.send(answer)
            return
        if task.task_id == self._running_id:
            return
        self.cancel_running()
        self._running_id = task.task_id
        self._running = asyncio.create_task(self._run_and_send(task))

    # --- checks -------------------------------------------------------------------
    def must_wait(self, task: Task) -> bool:
        """Whether ``task`` can be judged only once the keys are known."""
        trust = self.trust
        if trust is None or task.agent_id != self.agent_id:
            return False
        if trust.mode is Mode.UNKNOWN:
            return True
        return (
            trust.mode is Mode.SIGNED
            and task.key_id is not None
            and task.key_id not in trust.key_ids
        )

    def admit(self, task: Task) -> bytes | None:
        """The answer to ``task`` if it must not run, else None (run it)."""
        if task.agent_id != self.agent_id:
            return self.refuse(task, MISADDRESSED)
        trust = self.trust
        if trust is not None and trust.mode is Mode.UNKNOWN:
            return self.refuse(task, NO_KEYS)
        if trust is not None and trust.mode is Mode.SIGNED:
            reason = trust.check(task) or self._replayed(task)
            if reason is not None:
                return self.refuse(task, reason)
        return self.precheck(task)

    def _replayed(self, task: Task) -> str | None:
        assert task.nonce is not None  # checked with the signature
        seen = self._nonces.get(task.task_id)
        owner = self._nonce_owner.get(task.nonce)
        if (seen is not None and seen != task.nonce) or (
            owner is not None and owner != task.task_id
        ):
            return REPLAYED
        if seen is None:
            self._nonces[task.task_id] = task.nonce
            self._nonce_owner[task.nonce] = task.task_id
            while len(self._nonces) > MAX_NONCES:
                _, nonce = self._nonces.popitem(last=False)
                self._nonce_owner.pop(nonce, None)
        return None

    def refuse(self, task: Task, reason: str) -> bytes:
        """Report ``task`` refused: a ``failed`` result, not stored."""
        self.counters.rejected += 1
        log.warning(
            "refused a task: agent_id=%s task_id=%s reason=%s task_agent_id=%s "
            "key_id=%s",
            self.agent_id,
            task.task_id,
            reason,
            task.agent_id,
            task.key_id,
        )
        return encode(self._failed(task.task_id, REFUSED + reason, None))

    # --- tasks waiting for keys ------------------------------------------------
    def _hold(self, task: Task) -> None:
        assert self.trust is not None
        if self._held is None or self._held.task_id != task.task_id:
            self._drop_held()
            log.info(
                "task waits for the controller's keys: agent_id=%s task_id=%s "
                "key_id=%s trust=%s",
                self.agent_id,
                task.task_id,
                task.key_id,
                self.trust.mode.value,
            )
            if self.trust.mode is Mode.SIGNED:
                self._held_timer = asyncio.get_running_loop().call_later(
                    UNKNOWN_KEY_GRACE_S, self._give_up_held
                )
        self._held = task
        self.trust.listeners.add(self._retry_held)

    def _drop_held(self) -> None:
        self._held = None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if self.trust is not None:
            self.trust.listeners.discard(self._retry_held)

    def _retry_held(self) -> None:
        """The keys changed: judge the waiting task again."""
        task = self._held
        if task is not None:
            self.on_task(task)

    def _give_up_held(self) -> None:
        task = self._held
        self._held_timer = None
        self._drop_held()
        if task is not None:
            self.send(self.refuse(task, UNKNOWN_KEY))

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
            log.warning(
                "refused an expired task: agent_id=%s task_id=%s expired_at=%s",
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
