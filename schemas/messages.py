"""One pydantic model per message that travels on the bus.

Every message carries ``v``, the schema version (1 today). Identifiers are
restricted to characters that are safe inside one MQTT topic level, so an id
can never smuggle a ``/``, ``+`` or ``#`` into a topic.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.views import AgentView, KBView, WorkflowView

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=255)]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every bus message: the schema version and strict field types."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1


# --- presence --------------------------------------------------------------


class AgentState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class AgentStatus(Message):
    """Retained on ``agents/{id}/status``: online at connect, offline by Will/timer."""

    agent_id: Id
    state: AgentState
    reason: ShortText | None = None
    epoch: int = Field(ge=0, description="Connection epoch; a newer one wins.")
    ts: datetime = Field(default_factory=utcnow)


class Heartbeat(Message):
    """Liveness and light metrics, on ``agents/{id}/heartbeat``."""

    agent_id: Id
    ts: datetime = Field(default_factory=utcnow)
    seq: int = Field(default=0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


# --- tasks and results -------------------------------------------------------


class Task(Message):
    """An agent's current task, retained on ``agents/{id}/tasks``.

    ``signature`` (Ed25519, base64url) covers every other field; ``key_id``
    names the controller key that made it and ``nonce`` makes each envelope
    unique, so a replayed one can be told apart.
    """

    task_id: Id
    agent_id: Id
    workflow_id: Id
    kb_id: Id
    step_id: Id
    step_index: int = Field(ge=0)
    attempt: int = Field(ge=1)
    action: ShortText
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(gt=0)
    issued_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    nonce: ShortText | None = None
    key_id: ShortText | None = None
    signature: ShortText | None = None


class ResultStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TaskResult(Message):
    """A task's outcome, on ``agents/{id}/results``."""

    agent_id: Id
    task_id: Id
    status: ResultStatus
    exit_code: int | None = None
    output: str = ""
    error: ShortText | None = None
    started_at: datetime | None = None
    finished_at: datetime = Field(default_factory=utcnow)


# --- request/reply -------------------------------------------------------------
#
# MQTT 3.1.1 has no response-topic property, so every request names the topic
# to answer on (``reply_to``, under ``kbbus/v1/replies/``) and a ``request_id``
# that the reply echoes.


class Request(Message):
    request_id: Id
    reply_to: Annotated[str, StringConstraints(max_length=255)]


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    #: A missing or wrong enrolment token or agent password.
    UNAUTHORIZED = "unauthorized"


class ErrorBody(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str


class Reply(Message):
    request_id: Id
    error: ErrorBody | None = None


class RegisterRequest(Request):
    hostname: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    ip_address: ShortText = ""
    os: ShortText = ""
    agent_id: Id | None = Field(
        default=None, description="An agent that registers again keeps its id."
    )
    enrolment_token: ShortText | None = Field(
        default=None, description="The operator's enrolment token, when one is set."
    )
    mqtt_password: ShortText | None = Field(
        default=None,
        description="A known agent registering again proves itself with its own "
        "MQTT password instead of the enrolment token.",
    )


class SigningKey(BaseModel):
    """A controller public key that agents accept task signatures from."""

    model_config = ConfigDict(frozen=True)

    key_id: ShortText
    public_key: ShortText = Field(description="Ed25519 public key, base64url, raw.")


class KeySignature(BaseModel):
    """One controller key's signature over a ``ControllerKeys`` set."""

    model_config = ConfigDict(frozen=True)

    key_id: ShortText
    signature: ShortText = Field(description="Ed25519 signature, base64url.")


class ControllerKeys(Message):
    """The controller's signing keys, retained on ``controller/keys``.

    Every listed key signs the set, so an agent that trusts any one of them
    accepts a newer set: that is how keys rotate without agents registering
    again. The first key is the one that signs tasks; ``issued_at`` only moves
    forward, so an older set cannot be played back.
    """

    keys: list[SigningKey] = Field(min_length=1, max_length=16)
    issued_at: datetime = Field(default_factory=utcnow)
    signatures: list[KeySignature] = Field(default_factory=list, max_length=16)


class RegisterReply(Reply):
    agent: AgentView | None = None
    signing_keys: list[SigningKey] = Field(default_factory=list, max_length=16)


class HeartbeatRequest(Request):
    """A heartbeat that must be confirmed (HTTP agents: 404 for unknown ids)."""

    agent_id: Id
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)


class HeartbeatReply(Reply):
    pass


class TriggerRequest(Request):
    agent_id: Id
    kb_id: Id
    params: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: ShortText | None = None


class TriggerReply(Reply):
    workflow: WorkflowView | None = None
    created: bool = False


class CancelRequest(Request):
    workflow_id: Id
    reason: ShortText = "canceled by operator"


class CancelReply(Reply):
    workflow: WorkflowView | None = None


class TaskCheckRequest(Request):
    """May ``agent_id`` post a result for ``task_id``? (bridge, before publishing)."""

    agent_id: Id
    task_id: Id


class TaskCheckReply(Reply):
    pass


class LookupKind(StrEnum):
    AGENT = "agent"
    AGENTS = "agents"
    WORKFLOW = "workflow"
    WORKFLOWS = "workflows"
    KBS = "kbs"


class LookupRequest(Request):
    kind: LookupKind
    id: Id | None = None
    agent_id: Id | None = None
    status: ShortText | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class LookupReply(Reply):
    agents: list[AgentView] | None = None
    workflows: list[WorkflowView] | None = None
    kbs: list[KBView] | None = None


# --- events ------------------------------------------------------------------


class EventKind(StrEnum):
    AGENT_REGISTERED = "agent.registered"
    AGENT_ONLINE = "agent.online"
    AGENT_OFFLINE = "agent.offline"
    WORKFLOW_QUEUED = "workflow.queued"
    WORKFLOW_STARTED = "workflow.started"
    STEP_DISPATCHED = "step.dispatched"
    STEP_FINISHED = "step.finished"
    WORKFLOW_FINISHED = "workflow.finished"
    MESSAGE_REJECTED = "message.rejected"


class Event(Message):
    """An operator-facing event, on ``events/agents/{id}/...`` or similar."""

    kind: EventKind
    ts: datetime = Field(default_factory=utcnow)
    agent_id: Id | None = None
    workflow_id: Id | None = None
    data: dict[str, Any] = Field(default_factory=dict)
