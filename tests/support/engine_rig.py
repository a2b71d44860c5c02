"""Driving the workflow engine against a real database, without a broker.

``EngineRig`` plays the controller's part: it runs each engine call in its
own committed transaction (``Store.transact``, retries included), holds a
clock that tests move by hand, and decodes the publishes the engine asks for.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session

from controller.db import Agent, StepExecution, Workflow
from controller.effects import Publish
from controller.engine import Engine
from controller.kb import KBCatalog
from controller.store import Store, upgrade
from schemas import decode
from schemas.messages import Event, ResultStatus, Task, TaskResult
from schemas.topics import Topics
from schemas.views import WorkflowView

T = TypeVar("T")

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
TOPICS = Topics()


@dataclass(frozen=True)
class Effects:
    """The publishes of one call, decoded."""

    publishes: list[Publish]

    @property
    def tasks(self) -> list[Task]:
        return [
            decode(Task, p.payload)
            for p in self.publishes
            if p.topic.endswith("/tasks") and p.payload
        ]

    @property
    def cleared(self) -> list[str]:
        """Agents whose retained task was cleared."""
        return [
            TOPICS.parse_agent(p.topic).agent_id
            for p in self.publishes
            if p.topic.endswith("/tasks") and not p.payload
        ]

    @property
    def events(self) -> list[Event]:
        return [
            decode(Event, p.payload)
            for p in self.publishes
            if p.topic.startswith(f"{TOPICS.root}/events/")
        ]

    @property
    def kinds(self) -> list[str]:
        return [e.kind.value for e in self.events]

    def task(self) -> Task:
        (task,) = self.tasks
        return task


class EngineRig:
    def __init__(self, db_url: str, kb_dirs: Iterable[Path] = ()) -> None:
        upgrade(db_url)
        self.store = Store(db_url)
        self.kb_dirs = list(kb_dirs)
        self.catalog = KBCatalog.load(*self.kb_dirs)
        self.engine = Engine(self.catalog, TOPICS)
        self.now = T0

    def close(self) -> None:
        self.store.close()

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def run(self, work: Callable[[Session], T]) -> T:
        return self.store.transact(work)

    # --- setup ---------------------------------------------------------------
    def add_agent(self, agent_id: str, status: str = "online") -> str:
        def work(session: Session) -> None:
            session.add(
                Agent(
                    id=agent_id,
                    hostname=f"host-{agent_id}",
                    status=status,
                    epoch=1,
                    last_seen_at=self.now,
                    registered_at=self.now,
                    updated_at=self.now,
                )
            )

        self.run(work)
        return agent_id

    def set_agent_status(self, agent_id: str, status: str) -> None:
        def work(session: Session) -> None:
            agent = session.get(Agent, agent_id)
            assert agent is not None
            agent.status = status

        self.run(work)

    # --- engine calls ---------------------------------------------------------
    def trigger(
        self,
        agent_id: str,
        kb_id: str,
        params: dict[str, object] | None = None,
        key: str | None = None,
    ) -> tuple[WorkflowView, bool, Effects]:
        view, created, pubs = self.run(
            lambda s: self.engine.trigger(
                s, agent_id, kb_id, params or {}, key, self.now
            )
        )
        return view, created, Effects(pubs)

    def result(
        self,
        task: Task,
        status: str = "succeeded",
        *,
        output: str = "ok",
        exit_code: int | None = 0,
        error: str | None = None,
        from_agent: str | None = None,
    ) -> Effects:
        agent_id = from_agent or task.agent_id
        message = TaskResult(
            agent_id=agent_id,
            task_id=task.task_id,
            status=ResultStatus(status),
            exit_code=exit_code,
            output=output,
            error=error,
        )
        return Effects(
            self.run(
                lambda s: self.engine.handle_result(s, agent_id, message, self.now)
            )
        )

    def tick(self) -> Effects:
        return Effects(self.run(lambda s: self.engine.tick(s, self.now)))

    def cancel(self, workflow_id: str) -> tuple[WorkflowView, Effects]:
        view, pubs = self.run(
            lambda s: self.engine.cancel(s, workflow_id, "operator", self.now)
        )
        return view, Effects(pubs)

    def agents_online(self, *agent_ids: str) -> Effects:
        return Effects(
            self.run(lambda s: self.engine.agents_online(s, agent_ids, self.now))
        )

    def reconcile(self) -> Effects:
        return Effects(self.run(lambda s: self.engine.reconcile(s, self.now)))

    def view(self, workflow_id: str) -> WorkflowView:
        return self.run(lambda s: self.engine.workflow_view(s, workflow_id))

    # --- reading rows -----------------------------------------------------------
    def executions(self, workflow_id: str) -> list[StepExecution]:
        def work(session: Session) -> list[StepExecution]:
            rows = session.query(StepExecution).filter_by(workflow_id=workflow_id)
            return list(rows.order_by(StepExecution.step_index, StepExecution.attempt))

        return self.run(work)

    def workflow(self, workflow_id: str) -> Workflow:
        def work(session: Session) -> Workflow:
            wf = session.get(Workflow, workflow_id)
            assert wf is not None
            return wf

        return self.run(work)

    def run_to_end(
        self,
        first: Effects,
        answer: Callable[[Task], tuple[str, str]] = lambda t: ("succeeded", "ok"),
    ) -> list[Task]:
        """Answer every task as it comes (``answer`` gives status and output)
        until no task is left; returns the tasks in the order they came."""
        seen: list[Task] = []
        pending = first.tasks
        while pending:
            (task,) = pending
            seen.append(task)
            status, output = answer(task)
            pending = self.result(
                task, status, output=output, exit_code=0 if status == "succeeded" else 1
            ).tasks
        return seen
