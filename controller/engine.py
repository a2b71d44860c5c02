"""The KB workflow engine: every workflow and step transition.

INTERFACE STUB, to be filled in. Each method works inside the caller's
SQLAlchemy ``Session`` (the caller commits) and returns the publishes that the
transition needs, to be made only after the commit succeeds. Nothing here talks
MQTT or keeps state between calls, so several controllers can run it at once.
"""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from controller.effects import Publish
from controller.kb import KBCatalog
from schemas.messages import TaskResult
from schemas.topics import Topics
from schemas.views import WorkflowView


class EngineError(Exception):
    """A request the engine refuses; ``code`` is a ``schemas.messages.ErrorCode``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Engine:
    def __init__(self, catalog: KBCatalog, topics: Topics) -> None:
        self.catalog = catalog
        self.topics = topics

    def trigger(
        self,
        session: Session,
        agent_id: str,
        kb_id: str,
        params: dict[str, object],
        idempotency_key: str | None,
        now: datetime,
    ) -> tuple[WorkflowView, bool, list[Publish]]:
        """Create (or find, by idempotency key) a workflow; start it if possible."""
        raise NotImplementedError

    def handle_result(
        self, session: Session, topic_agent_id: str, result: TaskResult, now: datetime
    ) -> list[Publish]:
        """Record a result and advance its workflow. Raises EngineError to reject."""
        raise NotImplementedError

    def check_task(self, session: Session, agent_id: str, task_id: str) -> None:
        """Raise EngineError(not_found | conflict) unless agent may report task."""
        raise NotImplementedError

    def cancel(
        self, session: Session, workflow_id: str, reason: str, now: datetime
    ) -> tuple[WorkflowView, list[Publish]]:
        raise NotImplementedError

    def tick(self, session: Session, now: datetime) -> list[Publish]:
        """Time out overdue steps, dispatch retries whose backoff passed, start
        queued workflows of idle online agents."""
        raise NotImplementedError

    def agents_online(
        self, session: Session, agent_ids: Sequence[str], now: datetime
    ) -> list[Publish]:
        """Agents came online: start their queued workflows."""
        raise NotImplementedError

    def reconcile(self, session: Session, now: datetime) -> list[Publish]:
        """At start: republish the retained task of every dispatched step."""
        raise NotImplementedError

    def workflow_view(self, session: Session, workflow_id: str) -> WorkflowView:
        raise NotImplementedError

    def list_workflows(
        self,
        session: Session,
        agent_id: str | None,
        status: str | None,
        limit: int,
    ) -> list[WorkflowView]:
        raise NotImplementedError
