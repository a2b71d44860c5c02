"""Read models: what look-ups answer with, over MQTT replies and HTTP alike."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AgentStatusName = Literal["online", "offline"]
WorkflowStatusName = Literal[
    "queued", "running", "succeeded", "failed", "timed_out", "canceled"
]
StepStatusName = Literal[
    "pending", "dispatched", "succeeded", "failed", "timed_out", "canceled"
]
FINAL_WORKFLOW_STATES: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "canceled"}
)


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class AgentView(View):
    agent_id: str
    hostname: str
    ip_address: str = ""
    os: str = ""
    status: AgentStatusName
    epoch: int = 0
    last_seen_at: datetime | None = None
    registered_at: datetime
    # Broker credentials and an HTTP token are issued here once security lands.
    credentials: dict[str, str] | None = None


class AttemptView(View):
    attempt: int
    task_id: str
    status: StepStatusName
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    output: str | None = None
    error: str | None = None


class StepView(View):
    index: int
    step_id: str
    action: str
    status: StepStatusName
    attempts: list[AttemptView] = Field(default_factory=list)


class WorkflowView(View):
    workflow_id: str
    agent_id: str
    kb_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: WorkflowStatusName
    idempotency_key: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    steps: list[StepView] = Field(default_factory=list)


class KBView(View):
    kb_id: str
    title: str
    description: str = ""
    params_schema: dict[str, Any] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(default_factory=list)
