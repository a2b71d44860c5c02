"""What the workflow engine's two paths share: errors, ids, publishes, KBs.

``controller.engine`` works on ORM rows and ``controller.results`` (the batch
results path) on plain ones; both describe their publishes with ``Effects``,
which only reads the attributes named in ``WorkflowLike`` and ``AttemptLike``.
"""

import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

from controller.effects import Publish
from controller.templating import uses_steps
from schemas.codec import encode
from schemas.errors import KbbusError
from schemas.kb import KBDefinition
from schemas.messages import Event, EventKind, Task
from schemas.topics import Topics


class EngineError(KbbusError):
    """A request the engine refuses; ``code`` is a ``schemas.messages.ErrorCode``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_id_lock = threading.Lock()
_id_last_ms = 0
_id_counter = 0


def new_id() -> str:
    """A UUIDv7 string: ids sort by creation time, also within a millisecond."""
    global _id_last_ms, _id_counter
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _id_last_ms:
            _id_last_ms, _id_counter = ms, 0
        else:
            _id_counter += 1
            if _id_counter > 0xFFF:
                _id_last_ms, _id_counter = _id_last_ms + 1, 0
        ms, counter = _id_last_ms, _id_counter
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | counter << 64
    value |= 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


class WorkflowLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def kb_id(self) -> str: ...


class AttemptLike(Protocol):
    """A step execution (one attempt of one step)."""

    @property
    def id(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def step_id(self) -> str: ...
    @property
    def step_index(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def action(self) -> str: ...
    @property
    def args(self) -> dict[str, Any]: ...
    @property
    def status(self) -> str: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def dispatched_at(self) -> datetime | None: ...
    @property
    def deadline_at(self) -> datetime | None: ...


class Effects:
    """The publishes transitions ask for: retained tasks, then events."""

    def __init__(self, topics: Topics, now: datetime) -> None:
        self.topics = topics
        self.now = now
        self.tasks: list[Publish] = []
        self.events: list[Publish] = []

    def task(self, wf: WorkflowLike, se: AttemptLike) -> None:
        self.tasks.append(task_publish(self.topics, wf.kb_id, se))

    def clear(self, agent_id: str) -> None:
        self.tasks.append(Publish(self.topics.tasks(agent_id), b"", 1, True))

    def event(self, wf: WorkflowLike, kind: EventKind, **data: Any) -> None:
        self.events.append(self._event(wf, kind, data))

    def step_finished(self, wf: WorkflowLike, se: AttemptLike) -> None:
        """The step.finished event, with the step's seconds since dispatch."""
        data = step_data(se)
        if se.dispatched_at is None:  # canceled before it was ever sent
            self.events.append(self._event(wf, EventKind.STEP_FINISHED, data))
            return
        # Stored times are always UTC-aware (controller.db.UTCDateTime).
        seconds = max(0.0, (self.now - se.dispatched_at).total_seconds())
        data["duration_s"] = round(seconds, 6)
        self.events.append(
            self._event(
                wf, EventKind.STEP_FINISHED, data, step_finished=(se.status, seconds)
            )
        )

    def workflow_finished(
        self, wf: WorkflowLike, status: str, error: str | None
    ) -> None:
        data = {"status": status, "error": error}
        self.events.append(
            self._event(wf, EventKind.WORKFLOW_FINISHED, data, workflow_finished=status)
        )

    def _event(
        self,
        wf: WorkflowLike,
        kind: EventKind,
        data: dict[str, Any],
        *,
        step_finished: tuple[str, float] | None = None,
        workflow_finished: str | None = None,
    ) -> Publish:
        message = Event(
            kind=kind,
            ts=self.now,
            agent_id=wf.agent_id,
            workflow_id=wf.id,
            data={"kb_id": wf.kb_id, **data},
        )
        return Publish(
            self.topics.workflow_event(wf.id, kind.value),
            encode(message),
            1,
            False,
            step_finished=step_finished,
            workflow_finished=workflow_finished,
        )

    def all(self) -> list[Publish]:
        return self.tasks + self.events


def task_publish(topics: Topics, kb_id: str, se: AttemptLike) -> Publish:
    assert se.dispatched_at is not None
    assert se.deadline_at is not None
    task = Task(
        task_id=se.id,
        agent_id=se.agent_id,
        workflow_id=se.workflow_id,
        kb_id=kb_id,
        step_id=se.step_id,
        step_index=se.step_index,
        attempt=se.attempt,
        action=se.action,
        args=se.args,
        timeout_s=se.timeout_s,
        issued_at=se.dispatched_at,
        expires_at=se.deadline_at,
    )
    return Publish(topics.tasks(se.agent_id), encode(task), 1, True)


def step_data(se: AttemptLike) -> dict[str, Any]:
    """The ``data`` of a step event."""
    data: dict[str, Any] = {
        "task_id": se.id,
        "step_id": se.step_id,
        "step_index": se.step_index,
        "attempt": se.attempt,
        "status": se.status,
    }
    if se.exit_code is not None:
        data["exit_code"] = se.exit_code
    return data


@dataclass(frozen=True, slots=True)
class StoredKB:
    """A workflow's stored KB definition, parsed once, with what rendering needs.

    ``templated[i]`` tells whether step ``i``'s args hold any template (if not,
    they are used as they are) and ``uses_steps[i]`` whether rendering them
    needs earlier steps' results.
    """

    kb: KBDefinition
    templated: tuple[bool, ...]
    uses_steps: tuple[bool, ...]


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value or "{#" in value
    if isinstance(value, dict):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_template(v) for v in value)
    return False


# Every workflow of one KB stores the same definition text, so a small cache
# makes parsing and validating it a once-per-KB cost instead of once per step.
@lru_cache(maxsize=256)
def stored_kb(definition_json: str) -> StoredKB:
    """Parse a workflow's ``definition`` column as stored (JSON text)."""
    kb = KBDefinition.model_validate(json.loads(definition_json))
    return StoredKB(
        kb=kb,
        templated=tuple(_has_template(step.args) for step in kb.steps),
        uses_steps=tuple(uses_steps(step.args) for step in kb.steps),
    )
