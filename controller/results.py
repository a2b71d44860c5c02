"""Task results in bulk: the workflow engine's hot path.

``handle_results`` applies every result of one batch of messages with a fixed
number of statements, however big the batch: one SELECT of the batch's
attempts joined with their workflows; the transitions worked out in Python on
plain rows; then one UPDATE of workflows and one of attempts (each a single
executemany) and one multi-row INSERT of new attempts. Only when a workflow
ends does one more SELECT look for the agent's next queued workflow. The
transitions, events and publishes are those of ``Engine.handle_result``, the
per-result ORM path that ``tick`` shares; tests hold the two to each other.

Concurrency is kept the engine's way: every changed workflow row is written
with a compare-and-set on its ``version`` and every finished attempt with one
on its ``status`` (still ``dispatched``). A batch that raced with another
controller, or with this one's tick, fails as a whole with ``StaleDataError``
(or ``IntegrityError`` on the attempts' unique key) and is run again from
fresh state by ``Store.transact``, where the lost results are duplicates.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from typing import cast as typed

from sqlalchemy import (
    Connection,
    Row,
    Table,
    Text,
    bindparam,
    cast,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from controller.db import Agent, StepExecution, Workflow
from controller.effects import Publish
from controller.engine_base import (
    Effects,
    EngineError,
    StoredKB,
    new_id,
    step_data,
    stored_kb,
)
from controller.templating import ArgsTemplateError, render_args
from schemas.messages import ErrorCode, EventKind, TaskResult
from schemas.topics import Topics

log = logging.getLogger("kbbus.controller")

_AnyRow = Row[*tuple[Any, ...]]

_se = typed(Table, StepExecution.__table__)
_wf = typed(Table, Workflow.__table__)
_agents = typed(Table, Agent.__table__)
_queued = _wf.alias("queued")

_WORKFLOW_COLUMNS = (
    _wf.c.id,
    _wf.c.agent_id,
    _wf.c.kb_id,
    _wf.c.params,
    _wf.c.status,
    _wf.c.current_step,
    _wf.c.error,
    _wf.c.started_at,
    _wf.c.finished_at,
    _wf.c.version,
    # As text: every workflow of a KB stores the same text, parsed once.
    cast(_wf.c.definition, Text).label("definition"),
)
_ATTEMPT_COLUMNS = (
    _se.c.id,
    _se.c.workflow_id,
    _se.c.agent_id,
    _se.c.step_index,
    _se.c.step_id,
    _se.c.attempt,
    _se.c.action,
    _se.c.args,
    _se.c.status,
    _se.c.timeout_s,
    _se.c.dispatched_at,
)
_INSERTED = tuple(c.name for c in _se.c)

# Statements built once: building a select() costs more than running it.
_ATTEMPTS_WITH_WORKFLOWS = (
    select(*_ATTEMPT_COLUMNS, *(c.label(f"wf_{c.name}") for c in _WORKFLOW_COLUMNS))
    .join(_wf, _wf.c.id == _se.c.workflow_id)
    .where(_se.c.id.in_(bindparam("task_ids", expanding=True)))
)
# The oldest queued workflow of each given online agent, skipping workflows
# this batch already changed (the database does not know yet).
_NEXT_QUEUED = select(*_WORKFLOW_COLUMNS).where(
    _wf.c.id.in_(
        select(
            select(_queued.c.id)
            .where(
                _queued.c.agent_id == _agents.c.id,
                _queued.c.status == "queued",
                _queued.c.id.not_in(bindparam("skip", expanding=True)),
            )
            .order_by(_queued.c.created_at, _queued.c.id)
            .limit(1)
            .scalar_subquery()
        ).where(
            _agents.c.id.in_(bindparam("agent_ids", expanding=True)),
            _agents.c.status == "online",
        )
    )
)
_STEP_RESULTS = (
    select(
        _se.c.id,
        _se.c.step_index,
        _se.c.attempt,
        _se.c.step_id,
        _se.c.status,
        _se.c.exit_code,
        _se.c.output,
    )
    .where(_se.c.workflow_id == bindparam("workflow_id"))
    .order_by(_se.c.step_index, _se.c.attempt)
)
_UPDATE_WORKFLOW = (
    update(_wf)
    .where(_wf.c.id == bindparam("b_id"), _wf.c.version == bindparam("b_version"))
    .values(
        status=bindparam("b_status"),
        current_step=bindparam("b_current_step"),
        error=bindparam("b_error"),
        started_at=bindparam("b_started_at"),
        finished_at=bindparam("b_finished_at"),
        updated_at=bindparam("b_updated_at"),
        version=_wf.c.version + 1,
    )
)
_FINISH_ATTEMPT = (
    update(_se)
    .where(_se.c.id == bindparam("b_id"), _se.c.status == "dispatched")
    .values(
        status=bindparam("b_status"),
        finished_at=bindparam("b_finished_at"),
        exit_code=bindparam("b_exit_code"),
        output=bindparam("b_output"),
        error=bindparam("b_error"),
    )
)
_INSERT_ATTEMPTS = insert(_se)


@dataclass(slots=True)
class _Workflow:
    """A workflows row, as far as transitions read and write it."""

    id: str
    agent_id: str
    kb_id: str
    params: dict[str, Any]
    status: str
    current_step: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    version: int
    stored: StoredKB
    updated_at: datetime | None = None
    initial_status: str = ""

    def __post_init__(self) -> None:
        self.initial_status = self.status

    @classmethod
    def from_row(cls, row: _AnyRow, prefix: str = "") -> "_Workflow":
        m = row._mapping
        return cls(
            id=m[f"{prefix}id"],
            agent_id=m[f"{prefix}agent_id"],
            kb_id=m[f"{prefix}kb_id"],
            params=m[f"{prefix}params"] or {},
            status=m[f"{prefix}status"],
            current_step=m[f"{prefix}current_step"],
            error=m[f"{prefix}error"],
            started_at=m[f"{prefix}started_at"],
            finished_at=m[f"{prefix}finished_at"],
            version=m[f"{prefix}version"],
            stored=stored_kb(m[f"{prefix}definition"]),
        )


@dataclass(slots=True)
class _Attempt:
    """A step_executions row: one attempt of one step; its id is the task id."""

    id: str
    workflow_id: str
    agent_id: str
    step_index: int
    step_id: str
    attempt: int
    action: str
    args: dict[str, Any]
    status: str
    timeout_s: float
    not_before: datetime | None = None
    dispatched_at: datetime | None = None
    deadline_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    output: str | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _INSERTED}


@dataclass
class ResultsOutcome:
    """What a batch of results came to.

    ``effects`` are to be published after the commit; ``rejected`` holds the
    index (into the batch) and the reason of every result refused, each to be
    counted on its own; ``ignored`` the indexes of duplicates and late results.
    """

    effects: list[Publish] = field(default_factory=list)
    rejected: list[tuple[int, EngineError]] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)


def handle_results(
    session: Session,
    topics: Topics,
    batch: Sequence[tuple[str, TaskResult]],
    now: datetime,
) -> ResultsOutcome:
    """Record a batch of ``(topic agent id, result)`` and advance their workflows.

    A result is refused (``rejected``) when the topic's agent, the result's
    ``agent_id`` and the task's agent disagree or the task is unknown; a
    result for an attempt that already ended, or a second copy of one in the
    batch, changes nothing (``ignored``). Nothing is refused by raising: an
    exception means the whole batch failed (a lost race, the database).
    """
    return _Batch(session.connection(), topics, now).run(batch)


class _Batch:
    def __init__(self, conn: Connection, topics: Topics, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.fx = Effects(topics, now)
        self.workflows: dict[str, _Workflow] = {}  # changed here, by id
        self.finished: list[_Attempt] = []  # loaded, ended by a result
        self.created: list[_Attempt] = []  # new rows
        self.released: list[str] = []  # agents whose workflow ended

    def run(self, batch: Sequence[tuple[str, TaskResult]]) -> ResultsOutcome:
        outcome = ResultsOutcome()
        task_ids = {result.task_id for _, result in batch}
        by_task: dict[str, _AnyRow] = {}
        if task_ids:
            rows = self.conn.execute(
                _ATTEMPTS_WITH_WORKFLOWS, {"task_ids": list(task_ids)}
            )
            by_task = {row.id: row for row in rows}
        handled: set[str] = set()
        for index, (agent_id, result) in enumerate(batch):
            row = by_task.get(result.task_id)
            try:
                _check(agent_id, result, row)
            except EngineError as exc:
                outcome.rejected.append((index, exc))
                continue
            assert row is not None
            wf = self.workflows.get(row.workflow_id)
            if wf is None:
                wf = _Workflow.from_row(row, "wf_")
            if (
                result.task_id in handled
                or row.status != "dispatched"
                or wf.status != "running"
            ):
                log.debug(
                    "result ignored task_id=%s agent_id=%s step_status=%s",
                    result.task_id,
                    agent_id,
                    row.status,
                )
                outcome.ignored.append(index)
                continue
            handled.add(result.task_id)
            self.workflows[wf.id] = wf
            se = _Attempt(
                id=row.id,
                workflow_id=row.workflow_id,
                agent_id=row.agent_id,
                step_index=row.step_index,
                step_id=row.step_id,
                attempt=row.attempt,
                action=row.action,
                args=row.args or {},
                status=result.status.value,
                timeout_s=row.timeout_s,
                dispatched_at=row.dispatched_at,
                finished_at=self.now,
                exit_code=result.exit_code,
                output=result.output,
                error=result.error,
            )
            self.finished.append(se)
            self._step_finished(wf, se)
        self._start_released()
        self._write()
        outcome.effects = self.fx.all()
        return outcome

    # --- transitions (as in controller.engine, on plain rows) ----------------

    def _step_finished(self, wf: _Workflow, se: _Attempt) -> None:
        """An attempt ended (succeeded, failed or timed out): move on."""
        wf.updated_at = self.now
        self.fx.step_finished(wf, se)
        if se.status == "succeeded":
            self._advance(wf, se.step_index)
            return
        step = wf.stored.kb.steps[se.step_index]
        if se.attempt >= step.max_attempts:
            self._step_exhausted(wf, se)
            return
        delay_s = step.backoff_s * 2 ** (se.attempt - 1)
        retry = _Attempt(
            id=new_id(),
            workflow_id=wf.id,
            agent_id=wf.agent_id,
            step_index=se.step_index,
            step_id=se.step_id,
            attempt=se.attempt + 1,
            action=se.action,
            args=se.args,
            status="pending",
            timeout_s=se.timeout_s,
            not_before=self.now + timedelta(seconds=delay_s),
        )
        self.created.append(retry)
        if delay_s <= 0:
            self._dispatch(wf, retry)
        else:
            # Nothing to do during the backoff; tick() dispatches the retry.
            self.fx.clear(wf.agent_id)

    def _step_exhausted(self, wf: _Workflow, se: _Attempt) -> None:
        """The step's last attempt did not succeed: apply its on_failure."""
        step = wf.stored.kb.steps[se.step_index]
        if step.on_failure == "continue":
            self._advance(wf, se.step_index)
            return
        status = "timed_out" if se.status == "timed_out" else "failed"
        detail = f": {se.error}" if se.error else ""
        error = f"step {step.id!r} {se.status} after {se.attempt} attempt(s){detail}"
        self._finish(wf, status, error)

    def _advance(self, wf: _Workflow, index: int) -> None:
        if index + 1 < len(wf.stored.kb.steps):
            self._begin_step(wf, index + 1)
        else:
            self._finish(wf, "succeeded", None)

    def _begin_step(self, wf: _Workflow, index: int) -> None:
        """First attempt of step ``index``."""
        step = wf.stored.kb.steps[index]
        wf.current_step = index
        wf.updated_at = self.now
        error: ArgsTemplateError | None = None
        try:
            args = self._args(wf, index)
        except ArgsTemplateError as exc:
            args, error = {}, exc
        se = _Attempt(
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
        self.created.append(se)
        if error is None:
            self._dispatch(wf, se)
            return
        # Rendering again gives the same error: no retry, straight to
        # on_failure, without bothering the agent.
        se.status = "failed"
        se.finished_at = self.now
        se.error = str(error)
        log.warning(
            "step arguments did not render workflow_id=%s agent_id=%s step_id=%s: %s",
            wf.id,
            wf.agent_id,
            step.id,
            error,
        )
        self.fx.step_finished(wf, se)
        self._step_exhausted(wf, se)

    def _args(self, wf: _Workflow, index: int) -> dict[str, Any]:
        stored = wf.stored
        step = stored.kb.steps[index]
        if not stored.templated[index]:
            # Shared with the cached KB: nothing downstream changes args.
            return step.args
        context: dict[str, Any] = {"params": wf.params, "steps": {}}
        if stored.uses_steps[index]:
            context["steps"] = self._step_results(wf)
        return render_args(step.args, context)

    def _step_results(self, wf: _Workflow) -> dict[str, Any]:
        """Earlier steps' results, this batch's changes included; the last
        attempt of each step is the one that counts."""
        attempts: dict[str, tuple[int, int, str, str, int | None, str | None]] = {}
        for r in self.conn.execute(_STEP_RESULTS, {"workflow_id": wf.id}):
            attempts[r.id] = (
                r.step_index,
                r.attempt,
                r.step_id,
                r.status,
                r.exit_code,
                r.output,
            )
        for se in (*self.finished, *self.created):
            if se.workflow_id == wf.id:
                attempts[se.id] = (
                    se.step_index,
                    se.attempt,
                    se.step_id,
                    se.status,
                    se.exit_code,
                    se.output,
                )
        steps: dict[str, Any] = {}
        for _, _, step_id, status, exit_code, output in sorted(attempts.values()):
            steps[step_id] = {
                "status": status,
                "exit_code": exit_code,
                "output": output if output is not None else "",
            }
        return steps

    def _dispatch(self, wf: _Workflow, se: _Attempt) -> None:
        se.status = "dispatched"
        se.dispatched_at = self.now
        se.deadline_at = self.now + timedelta(seconds=se.timeout_s)
        self.fx.task(wf, se)
        self.fx.event(
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

    def _finish(self, wf: _Workflow, status: str, error: str | None) -> None:
        """End ``wf``; its agent gets its next queued workflow (or a clear) once
        every result of the batch is applied."""
        wf.status = status
        wf.error = error
        wf.finished_at = self.now
        wf.updated_at = self.now
        self.fx.workflow_finished(wf, status, error)
        level = logging.INFO if status == "succeeded" else logging.WARNING
        log.log(
            level,
            "workflow finished workflow_id=%s agent_id=%s kb_id=%s status=%s error=%s",
            wf.id,
            wf.agent_id,
            wf.kb_id,
            status,
            error or "-",
        )
        self.released.append(wf.agent_id)

    def _start_released(self) -> None:
        """Start the oldest queued workflow of each agent whose workflow ended;
        clear the task of those with none. A start can end at once (arguments
        that do not render), hence the loop."""
        while self.released:
            agents = list(dict.fromkeys(self.released))
            self.released = []
            rows = self.conn.execute(
                _NEXT_QUEUED, {"agent_ids": agents, "skip": list(self.workflows)}
            )
            started: set[str] = set()
            for row in rows:
                wf = _Workflow.from_row(row)
                started.add(wf.agent_id)
                self.workflows[wf.id] = wf
                self._start(wf)
            for agent_id in agents:
                if agent_id not in started:
                    self.fx.clear(agent_id)

    def _start(self, wf: _Workflow) -> None:
        wf.status = "running"
        wf.started_at = self.now
        wf.updated_at = self.now
        self.fx.event(wf, EventKind.WORKFLOW_STARTED)
        log.info(
            "workflow started workflow_id=%s agent_id=%s kb_id=%s",
            wf.id,
            wf.agent_id,
            wf.kb_id,
        )
        self._begin_step(wf, 0)

    # --- writing ---------------------------------------------------------------

    def _write(self) -> None:
        """Three statements, workflows first: the lock order of ``tick``."""
        if self.workflows:
            # Rows leaving "running" go before rows entering it: the
            # one-running-workflow-per-agent index is checked row by row.
            ordered = sorted(
                self.workflows.values(),
                key=lambda w: w.status == "running" and w.initial_status != "running",
            )
            _expect(
                self.conn.execute(
                    _UPDATE_WORKFLOW,
                    [
                        {
                            "b_id": w.id,
                            "b_version": w.version,
                            "b_status": w.status,
                            "b_current_step": w.current_step,
                            "b_error": w.error,
                            "b_started_at": w.started_at,
                            "b_finished_at": w.finished_at,
                            "b_updated_at": w.updated_at,
                        }
                        for w in ordered
                    ],
                ).rowcount,
                len(ordered),
                "workflows",
            )
        if self.finished:
            _expect(
                self.conn.execute(
                    _FINISH_ATTEMPT,
                    [
                        {
                            "b_id": se.id,
                            "b_status": se.status,
                            "b_finished_at": se.finished_at,
                            "b_exit_code": se.exit_code,
                            "b_output": se.output,
                            "b_error": se.error,
                        }
                        for se in self.finished
                    ],
                ).rowcount,
                len(self.finished),
                "step_executions",
            )
        if self.created:
            self.conn.execute(_INSERT_ATTEMPTS, [se.row() for se in self.created])


def _check(agent_id: str, result: TaskResult, row: _AnyRow | None) -> None:
    if result.agent_id != agent_id:
        raise EngineError(
            ErrorCode.CONFLICT,
            f"Result names agent {result.agent_id!r} but came from agent {agent_id!r}.",
        )
    if row is None:
        raise EngineError(ErrorCode.NOT_FOUND, f"Task {result.task_id!r} unknown.")
    if row.agent_id != agent_id:
        raise EngineError(
            ErrorCode.CONFLICT,
            f"Task {row.id!r} belongs to another agent, not {agent_id!r}.",
        )


def _expect(rowcount: int, expected: int, table: str) -> None:
    if rowcount != expected:
        # Another transaction changed these rows since they were read.
        raise StaleDataError(
            f"{table}: {rowcount} of {expected} rows matched; run the batch again."
        )
