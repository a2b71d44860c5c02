"""The KB workflow engine: every workflow and step transition.

Each method works inside the caller's SQLAlchemy ``Session``; the caller
commits, and only then makes the publishes the method returned (tasks first,
then events). Nothing here talks MQTT or keeps state between calls, so several
controllers can run it at once: every transition writes its workflow row, whose
``version`` column makes a racing second writer fail with ``StaleDataError``,
and a partial unique index keeps one running workflow per agent (a racing
second start fails with ``IntegrityError``). The caller runs the call again in
a fresh session after either (``controller.store.Store.transact`` does).

Lifecycle: a workflow is ``queued`` until its agent is online and idle, then
``running``; each step runs as one or more attempts (``StepExecution`` rows,
whose ids are the task ids). A failed or timed-out attempt is retried after
``backoff_s * 2**(attempt-1)`` seconds until ``max_attempts``; then the step's
``on_failure`` either aborts the workflow (``failed`` or ``timed_out``) or
goes on with the next step. Time only moves in ``tick``, which the caller runs
every second or so: it times out overdue attempts, dispatches retries whose
backoff passed, and starts queued workflows that nothing else started.
"""

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, bindparam, exists, select
from sqlalchemy.orm import Session, aliased

from controller.db import Agent, StepExecution, Workflow
from controller.effects import Publish
from controller.engine_base import Effects, new_id, step_data, task_publish
from controller.engine_base import EngineError as EngineError  # callers' import
from controller.kb import KBCatalog, ParamsError
from controller.results import ResultsOutcome, handle_results
from controller.templating import ArgsTemplateError, render_args, uses_steps
from schemas.kb import KBDefinition, KBStep
from schemas.messages import ErrorCode, EventKind, TaskResult
from schemas.topics import Topics
from schemas.views import FINAL_WORKFLOW_STATES, AttemptView, StepView, WorkflowView

log = logging.getLogger("kbbus.controller")

ACTIVE_STEP_STATES = ("pending", "dispatched")
ENDED_STEP_STATES = ("succeeded", "failed", "timed_out", "canceled")
# Rows handled per tick and per query; the rest wait for the next tick.
TICK_BATCH = 500


# Statements of the hot paths, built once: building a select() costs more
# than running it on an indexed column.
_STEP_WITH_WORKFLOW = (
    select(StepExecution, Workflow)
    .join(Workflow, Workflow.id == StepExecution.workflow_id)
    .where(StepExecution.id == bindparam("task_id"))
)
_AGENT_BUSY = (
    select(Workflow.id)
    .where(Workflow.agent_id == bindparam("agent_id"), Workflow.status == "running")
    .limit(1)
)
_STEP_RESULTS = (
    select(
        StepExecution.step_id,
        StepExecution.status,
        StepExecution.exit_code,
        StepExecution.output,
    )
    .where(StepExecution.workflow_id == bindparam("workflow_id"))
    .order_by(StepExecution.step_index, StepExecution.attempt)
)
_running = aliased(Workflow)
# Queued workflows of online agents that run nothing, oldest first.
_IDLE_QUEUED = (
    select(Workflow)
    .join(Agent, Agent.id == Workflow.agent_id)
    .where(
        Workflow.status == "queued",
        Agent.status == "online",
        ~exists().where(
            and_(_running.agent_id == Workflow.agent_id, _running.status == "running")
        ),
    )
    .order_by(Workflow.created_at, Workflow.id)
    .limit(TICK_BATCH)
)
_IDLE_QUEUED_OF = _IDLE_QUEUED.where(
    Workflow.agent_id.in_(bindparam("agent_ids", expanding=True))
)


class Engine:
    def __init__(self, catalog: KBCatalog, topics: Topics) -> None:
        self.catalog = catalog
        self.topics = topics

    # --- requests --------------------------------------------------------------

    def trigger(
        self,
        session: Session,
        agent_id: str,
        kb_id: str,
        params: dict[str, object],
        idempotency_key: str | None,
        now: datetime,
    ) -> tuple[WorkflowView, bool, list[Publish]]:
        """Create (or find, by idempotency key) a workflow; start it if possible.

        Returns the workflow, whether it was created, and the publishes.
        """
        agent = session.get(Agent, agent_id)
        if agent is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"Agent {agent_id!r} is unknown.")
        kb = self.catalog.get(kb_id)
        if kb is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"KB {kb_id!r} is unknown.")
        try:
            full_params = self.catalog.params(kb_id, params)
        except ParamsError as exc:
            raise EngineError(ErrorCode.INVALID, str(exc)) from None
        if idempotency_key is not None:
            existing = self._by_idempotency_key(session, agent_id, idempotency_key)
            if existing is not None:
                if existing.kb_id != kb_id or existing.params != full_params:
                    raise EngineError(
                        ErrorCode.CONFLICT,
                        f"Idempotency key {idempotency_key!r} was used for another "
                        "KB or other parameters; use a new key.",
                    )
                return self.workflow_view(session, existing.id), False, []
        _check_param_templates(kb, full_params)

        wf = Workflow(
            id=new_id(),
            agent_id=agent_id,
            kb_id=kb_id,
            params=full_params,
            status="queued",
            idempotency_key=idempotency_key,
            current_step=0,
            created_at=now,
            updated_at=now,
            definition=kb.model_dump(mode="json"),
        )
        session.add(wf)
        fx = Effects(self.topics, now)
        started: list[StepExecution] = []
        if agent.status == "online" and not _agent_busy(session, agent_id):
            started = self._start(session, fx, wf, kb)
        else:
            fx.event(wf, EventKind.WORKFLOW_QUEUED)
            log.info(
                "workflow queued workflow_id=%s agent_id=%s kb_id=%s",
                wf.id,
                agent_id,
                kb_id,
            )
        session.flush()
        return _view(wf, started), True, fx.all()

    def handle_result(
        self, session: Session, topic_agent_id: str, result: TaskResult, now: datetime
    ) -> list[Publish]:
        """Record a result and advance its workflow. Raises EngineError to reject.

        A result for an attempt that already ended (a duplicate, or one that
        came after its timeout or a cancel) changes nothing and returns [].
        """
        if result.agent_id != topic_agent_id:
            raise EngineError(
                ErrorCode.CONFLICT,
                f"Result names agent {result.agent_id!r} but came from agent "
                f"{topic_agent_id!r}.",
            )
        row = session.execute(
            _STEP_WITH_WORKFLOW, {"task_id": result.task_id}
        ).one_or_none()
        if row is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"Task {result.task_id!r} unknown.")
        se, wf = row
        if se.agent_id != topic_agent_id:
            raise EngineError(
                ErrorCode.CONFLICT,
                f"Task {se.id!r} belongs to another agent, not {topic_agent_id!r}.",
            )
        if se.status != "dispatched" or wf.status != "running":
            log.debug(
                "result ignored task_id=%s agent_id=%s step_status=%s",
                se.id,
                se.agent_id,
                se.status,
            )
            return []
        fx = Effects(self.topics, now)
        se.status = result.status.value
        se.finished_at = now
        se.exit_code = result.exit_code
        se.output = result.output
        se.error = result.error
        self._step_finished(session, fx, wf, se)
        session.flush()
        return fx.all()

    def handle_results(
        self,
        session: Session,
        batch: Sequence[tuple[str, TaskResult]],
        now: datetime,
    ) -> ResultsOutcome:
        """``handle_result`` for a whole batch of ``(topic agent id, result)``,
        in a fixed number of statements (``controller.results``).

        Refused results are reported per item in the outcome, not raised, so
        one bad result does not fail the others.
        """
        return handle_results(session, self.topics, batch, now)

    def check_task(self, session: Session, agent_id: str, task_id: str) -> None:
        """Raise EngineError(not_found | conflict) unless agent may report task."""
        owner = session.scalar(
            select(StepExecution.agent_id).where(StepExecution.id == task_id)
        )
        if owner is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"Task {task_id!r} is unknown.")
        if owner != agent_id:
            raise EngineError(
                ErrorCode.CONFLICT,
                f"Task {task_id!r} belongs to another agent, not {agent_id!r}.",
            )

    def cancel(
        self, session: Session, workflow_id: str, reason: str, now: datetime
    ) -> tuple[WorkflowView, list[Publish]]:
        """Cancel a queued or running workflow; a finished one is left as it is.

        A running workflow's retained task is cleared, which tells the agent to
        stop it, and the agent's next queued workflow starts.
        """
        wf = session.get(Workflow, workflow_id)
        if wf is None:
            raise EngineError(
                ErrorCode.NOT_FOUND, f"Workflow {workflow_id!r} is unknown."
            )
        if wf.status in FINAL_WORKFLOW_STATES:
            return self.workflow_view(session, workflow_id), []
        fx = Effects(self.topics, now)
        was_running = wf.status == "running"
        active = session.scalars(
            select(StepExecution).where(
                StepExecution.workflow_id == wf.id,
                StepExecution.status.in_(ACTIVE_STEP_STATES),
            )
        ).all()
        for se in active:
            se.status = "canceled"
            se.finished_at = now
            se.error = reason
            fx.step_finished(wf, se)
        self._finish(session, fx, wf, "canceled", reason, release_agent=was_running)
        session.flush()
        return self.workflow_view(session, workflow_id), fx.all()

    # --- time and presence -------------------------------------------------------

    def tick(self, session: Session, now: datetime) -> list[Publish]:
        """Time out overdue steps, dispatch retries whose backoff passed, start
        queued workflows of idle online agents."""
        fx = Effects(self.topics, now)
        overdue = session.execute(
            _lock_workflows(
                _with_workflow()
                .where(
                    StepExecution.status == "dispatched",
                    StepExecution.deadline_at <= now,
                )
                .order_by(StepExecution.deadline_at)
                .limit(TICK_BATCH)
            )
        ).all()
        for se, wf in overdue:
            se.status = "timed_out"
            se.finished_at = now
            se.error = f"no result within {se.timeout_s:g} s"
            log.warning(
                "step timed out workflow_id=%s agent_id=%s step_id=%s attempt=%d",
                wf.id,
                wf.agent_id,
                se.step_id,
                se.attempt,
            )
            self._step_finished(session, fx, wf, se)
        due = session.execute(
            _lock_workflows(
                _with_workflow()
                .where(
                    StepExecution.status == "pending",
                    StepExecution.not_before <= now,
                    Workflow.status == "running",
                )
                .limit(TICK_BATCH)
            )
        ).all()
        for se, wf in due:
            self._dispatch(fx, wf, se)
            wf.updated_at = now
        self._start_idle(session, fx, None)
        session.flush()
        return fx.all()

    def agents_online(
        self, session: Session, agent_ids: Sequence[str], now: datetime
    ) -> list[Publish]:
        """Agents came online: start their queued workflows."""
        if not agent_ids:
            return []
        fx = Effects(self.topics, now)
        self._start_idle(session, fx, agent_ids)
        session.flush()
        return fx.all()

    def reconcile(self, session: Session, now: datetime) -> list[Publish]:
        """At start: republish the retained task of every dispatched step.

        Also clears the task topic of agents with nothing dispatched whose last
        task has not expired yet: the controller may have died between
        committing a step's end (or a cancel) and publishing the clear, and an
        agent must not run such a task. An expired one it refuses anyway.
        Changes nothing in the database.
        """
        fx = Effects(self.topics, now)
        rows = session.execute(
            select(StepExecution, Workflow.kb_id)
            .join(Workflow, Workflow.id == StepExecution.workflow_id)
            .where(StepExecution.status == "dispatched")
        ).all()
        busy: set[str] = set()
        for se, kb_id in rows:
            fx.tasks.append(task_publish(self.topics, kb_id, se))
            busy.add(se.agent_id)
        unexpired = session.scalars(
            select(StepExecution.agent_id)
            .where(
                StepExecution.status.in_(ENDED_STEP_STATES),
                StepExecution.deadline_at > now,
            )
            .distinct()
        ).all()
        stale = sorted(set(unexpired) - busy)
        for agent_id in stale:
            fx.clear(agent_id)
        log.info(
            "reconciled retained tasks republished=%d cleared=%d",
            len(rows),
            len(stale),
        )
        return fx.all()

    # --- read models -------------------------------------------------------------

    def workflow_view(self, session: Session, workflow_id: str) -> WorkflowView:
        wf = session.get(Workflow, workflow_id)
        if wf is None:
            raise EngineError(
                ErrorCode.NOT_FOUND, f"Workflow {workflow_id!r} is unknown."
            )
        executions = session.scalars(
            select(StepExecution)
            .where(StepExecution.workflow_id == workflow_id)
            .order_by(StepExecution.step_index, StepExecution.attempt)
        ).all()
        return _view(wf, executions)

    def list_workflows(
        self,
        session: Session,
        agent_id: str | None,
        status: str | None,
        limit: int,
    ) -> list[WorkflowView]:
        """The newest workflows first, with their steps (two queries in all)."""
        query = select(Workflow)
        if agent_id is not None:
            query = query.where(Workflow.agent_id == agent_id)
        if status is not None:
            query = query.where(Workflow.status == status)
        workflows = session.scalars(
            query.order_by(Workflow.created_at.desc(), Workflow.id.desc()).limit(limit)
        ).all()
        if not workflows:
            return []
        by_workflow: dict[str, list[StepExecution]] = {wf.id: [] for wf in workflows}
        executions = session.scalars(
            select(StepExecution)
            .where(StepExecution.workflow_id.in_(list(by_workflow)))
            .order_by(StepExecution.step_index, StepExecution.attempt)
        ).all()
        for se in executions:
            by_workflow[se.workflow_id].append(se)
        return [_view(wf, by_workflow[wf.id]) for wf in workflows]

    # --- transitions -------------------------------------------------------------

    def _by_idempotency_key(
        self, session: Session, agent_id: str, key: str
    ) -> Workflow | None:
        return session.scalar(
            select(Workflow).where(
                Workflow.agent_id == agent_id, Workflow.idempotency_key == key
            )
        )

    def _start(
        self, session: Session, fx: Effects, wf: Workflow, kb: KBDefinition
    ) -> list[StepExecution]:
        wf.status = "running"
        wf.started_at = fx.now
        wf.updated_at = fx.now
        fx.event(wf, EventKind.WORKFLOW_STARTED)
        log.info(
            "workflow started workflow_id=%s agent_id=%s kb_id=%s",
            wf.id,
            wf.agent_id,
            wf.kb_id,
        )
        return self._begin_step(session, fx, wf, kb, 0)

    def _begin_step(
        self,
        session: Session,
        fx: Effects,
        wf: Workflow,
        kb: KBDefinition,
        index: int,
    ) -> list[StepExecution]:
        """First attempt of step ``index``; returns the rows it created."""
        step = kb.steps[index]
        wf.current_step = index
        wf.updated_at = fx.now
        # Render before the new row joins the session: reading earlier steps
        # autoflushes, and the row is complete only once its args are known.
        error: ArgsTemplateError | None = None
        try:
            args = render_args(step.args, self._template_context(session, wf, step))
        except ArgsTemplateError as exc:
            args, error = {}, exc
        se = StepExecution(
            id=new_id(),
            workflow_id=wf.id,
            agent_id=wf.agent_id,
            step_index=index,
            step_id=step.id,
            attempt=1,
            action=step.action,
            args=args,
            status="pending",
            timeout_s=step.timeout_s,
        )
        session.add(se)
        if error is not None:
            # Rendering again gives the same error: no retry, straight to
            # on_failure, without bothering the agent.
            se.status = "failed"
            se.finished_at = fx.now
            se.error = str(error)
            log.warning(
                "step arguments did not render workflow_id=%s agent_id=%s "
                "step_id=%s: %s",
                wf.id,
                wf.agent_id,
                step.id,
                error,
            )
            fx.step_finished(wf, se)
            return [se, *self._step_exhausted(session, fx, wf, kb, se)]
        self._dispatch(fx, wf, se)
        return [se]

    def _template_context(
        self, session: Session, wf: Workflow, step: KBStep
    ) -> dict[str, Any]:
        context: dict[str, Any] = {"params": wf.params, "steps": {}}
        if not uses_steps(step.args):
            return context
        rows = session.execute(_STEP_RESULTS, {"workflow_id": wf.id}).all()
        # The last attempt of each step is the one that counts.
        for step_id, status, exit_code, output in rows:
            context["steps"][step_id] = {
                "status": status,
                "exit_code": exit_code,
                "output": output if output is not None else "",
            }
        return context

    def _dispatch(self, fx: Effects, wf: Workflow, se: StepExecution) -> None:
        se.status = "dispatched"
        se.dispatched_at = fx.now
        se.deadline_at = fx.now + timedelta(seconds=se.timeout_s)
        fx.task(wf, se)
        fx.event(
            wf,
            EventKind.STEP_DISPATCHED,
            **step_data(se),
            action=se.action,
            expires_at=se.deadline_at.isoformat(),
        )
        log.debug(
            "step dispatched workflow_id=%s agent_id=%s task_id=%s step_id=%s "
            "attempt=%d",
            wf.id,
            wf.agent_id,
            se.id,
            se.step_id,
            se.attempt,
        )

    def _step_finished(
        self, session: Session, fx: Effects, wf: Workflow, se: StepExecution
    ) -> None:
        """An attempt ended (succeeded, failed or timed out): move on."""
        wf.updated_at = fx.now
        fx.step_finished(wf, se)
        kb = _definition(wf)
        if se.status == "succeeded":
            self._advance(session, fx, wf, kb, se.step_index)
            return
        step = kb.steps[se.step_index]
        if se.attempt >= step.max_attempts:
            self._step_exhausted(session, fx, wf, kb, se)
            return
        delay_s = step.backoff_s * 2 ** (se.attempt - 1)
        retry = StepExecution(
            id=new_id(),
            workflow_id=wf.id,
            agent_id=wf.agent_id,
            step_index=se.step_index,
            step_id=se.step_id,
            attempt=se.attempt + 1,
            action=se.action,
            args=se.args,
            timeout_s=se.timeout_s,
            status="pending",
            not_before=fx.now + timedelta(seconds=delay_s),
        )
        session.add(retry)
        if delay_s <= 0:
            self._dispatch(fx, wf, retry)
        else:
            # Nothing to do during the backoff; tick() dispatches the retry.
            fx.clear(wf.agent_id)

    def _step_exhausted(
        self,
        session: Session,
        fx: Effects,
        wf: Workflow,
        kb: KBDefinition,
        se: StepExecution,
    ) -> list[StepExecution]:
        """The step's last attempt did not succeed: apply its on_failure."""
        step = kb.steps[se.step_index]
        if step.on_failure == "continue":
            return self._advance(session, fx, wf, kb, se.step_index)
        status = "timed_out" if se.status == "timed_out" else "failed"
        detail = f": {se.error}" if se.error else ""
        error = f"step {step.id!r} {se.status} after {se.attempt} attempt(s){detail}"
        self._finish(session, fx, wf, status, error, release_agent=True)
        return []

    def _advance(
        self,
        session: Session,
        fx: Effects,
        wf: Workflow,
        kb: KBDefinition,
        index: int,
    ) -> list[StepExecution]:
        if index + 1 < len(kb.steps):
            return self._begin_step(session, fx, wf, kb, index + 1)
        self._finish(session, fx, wf, "succeeded", None, release_agent=True)
        return []

    def _finish(
        self,
        session: Session,
        fx: Effects,
        wf: Workflow,
        status: str,
        error: str | None,
        *,
        release_agent: bool,
    ) -> None:
        """End ``wf``; if it held its agent, start the next queued one or clear."""
        wf.status = status
        wf.error = error
        wf.finished_at = fx.now
        wf.updated_at = fx.now
        fx.workflow_finished(wf, status, error)
        level = logging.INFO if status in ("succeeded", "canceled") else logging.WARNING
        log.log(
            level,
            "workflow finished workflow_id=%s agent_id=%s kb_id=%s status=%s error=%s",
            wf.id,
            wf.agent_id,
            wf.kb_id,
            status,
            error or "-",
        )
        if not release_agent:
            return
        # The running row must leave the one-running-per-agent index before the
        # next workflow enters it.
        session.flush()
        if not self._start_idle(session, fx, [wf.agent_id]):
            fx.clear(wf.agent_id)

    def _start_idle(
        self, session: Session, fx: Effects, agent_ids: Sequence[str] | None
    ) -> list[str]:
        """Start the oldest queued workflow of each idle online agent.

        ``agent_ids`` None means every agent. Returns the agents started on.
        """
        if agent_ids is None:
            queued = session.scalars(_IDLE_QUEUED).all()
        else:
            queued = session.scalars(
                _IDLE_QUEUED_OF, {"agent_ids": list(agent_ids)}
            ).all()
        started: list[str] = []
        for wf in queued:
            if wf.agent_id in started:
                continue
            started.append(wf.agent_id)
            self._start(session, fx, wf, _definition(wf))
        return started


# --- helpers ---------------------------------------------------------------------


def _with_workflow() -> Select[StepExecution, Workflow]:
    return select(StepExecution, Workflow).join(
        Workflow, Workflow.id == StepExecution.workflow_id
    )


def _lock_workflows(
    query: Select[StepExecution, Workflow],
) -> Select[StepExecution, Workflow]:
    # On PostgreSQL two controllers' ticks skip each other's rows instead of
    # racing on them; SQLite has one writer anyway and ignores the clause.
    return query.with_for_update(of=Workflow, skip_locked=True)


def _agent_busy(session: Session, agent_id: str) -> bool:
    found = session.scalar(_AGENT_BUSY, {"agent_id": agent_id})
    return found is not None


def _definition(wf: Workflow) -> KBDefinition:
    return KBDefinition.model_validate(wf.definition)


def _check_param_templates(kb: KBDefinition, params: dict[str, Any]) -> None:
    """Render now what depends on parameters only, so a bad value fails the
    trigger instead of a step later on."""
    context = {"params": params, "steps": {}}
    for i, step in enumerate(kb.steps):
        if uses_steps(step.args):
            continue
        try:
            render_args(step.args, context)
        except ArgsTemplateError as exc:
            raise EngineError(
                ErrorCode.INVALID, f"params do not fit step {i} ({step.id}): {exc}"
            ) from None


def _view(wf: Workflow, executions: Iterable[StepExecution]) -> WorkflowView:
    attempts: dict[int, list[AttemptView]] = {}
    for se in sorted(executions, key=lambda s: (s.step_index, s.attempt)):
        attempts.setdefault(se.step_index, []).append(
            AttemptView(
                attempt=se.attempt,
                task_id=se.id,
                status=se.status,
                dispatched_at=se.dispatched_at,
                finished_at=se.finished_at,
                exit_code=se.exit_code,
                output=se.output,
                error=se.error,
            )
        )
    steps = []
    for index, step in enumerate(wf.definition.get("steps", [])):
        tries = attempts.get(index, [])
        steps.append(
            StepView(
                index=index,
                step_id=step["id"],
                action=step["action"],
                status=tries[-1].status if tries else "pending",
                attempts=tries,
            )
        )
    return WorkflowView(
        workflow_id=wf.id,
        agent_id=wf.agent_id,
        kb_id=wf.kb_id,
        params=wf.params,
        status=wf.status,
        idempotency_key=wf.idempotency_key,
        created_at=wf.created_at,
        started_at=wf.started_at,
        finished_at=wf.finished_at,
        error=wf.error,
        steps=steps,
    )
