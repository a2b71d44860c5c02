"""Bodies the HTTP endpoints accept and answer with, beyond ``schemas.views``.

Request bodies take the original service's field names. Ids follow the bus's
id rule (``schemas.messages.ID_PATTERN``), so nothing that could not be a
topic level ever reaches a topic.
"""

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from schemas.messages import Id, ShortText, SigningKey
from schemas.views import AgentView, WorkflowStatusName, WorkflowView

# Exit codes outside a signed 32-bit range are not exit codes; refusing them
# here keeps them out of the controller's integer columns.
ExitCode = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class Body(BaseModel):
    # Unknown fields are ignored, as the original service did.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers_only(cls, data: Any) -> Any:
        # Python's JSON parser takes NaN, Infinity and 1e999; JSON has no such
        # numbers, and on the bus they would turn into null or fail to parse.
        if _has_non_finite(data):
            raise ValueError("NaN and Infinity are not JSON numbers")
        return data


def _has_non_finite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if depth > 64:
        return False  # deeper than any body of ours; the schema refuses it
    if isinstance(value, dict):
        return any(_has_non_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v, depth + 1) for v in value)
    return False


class RegisterBody(Body):
    hostname: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    ip_address: ShortText = ""
    os: ShortText = ""


class RegisteredAgent(AgentView):
    """The registered agent, with what it needs from now on: its HTTP token
    (in ``credentials``, when tokens are on) and the keys tasks are signed by."""

    signing_keys: list[SigningKey] = Field(default_factory=list)


class HeartbeatBody(Body):
    agent_id: Id
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


class HeartbeatAnswer(BaseModel):
    agent_id: str
    status: Literal["ok"] = "ok"


class ResultBody(Body):
    agent_id: Id
    task_id: Id
    status: Literal["succeeded", "failed"]
    exit_code: ExitCode | None = None
    output: str = ""
    error: ShortText | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ResultAnswer(BaseModel):
    agent_id: str
    task_id: str
    status: Literal["accepted"] = "accepted"


class TriggerBody(Body):
    agent_id: Id
    kb_id: Id
    params: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: ShortText | None = None


class TriggerAnswer(BaseModel):
    workflow_id: str
    status: WorkflowStatusName
    created: bool = Field(
        description="False when an earlier trigger with the same key is returned."
    )
    workflow: WorkflowView


class CancelBody(Body):
    reason: ShortText = "canceled over HTTP"


class ErrorAnswer(BaseModel):
    """What every refusal other than a validation error looks like."""

    detail: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    mqtt: Literal["connected", "disconnected"]
    client_id: str
    longpoll_waiters: int
    known_agents: int
