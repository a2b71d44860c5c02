"""Requests to the controller on ``{root}/rpc/{method}``, and their replies.

MQTT 3.1.1 has no response topic, so each request names ``reply_to`` (which
must lie under ``{root}/replies/``) and a ``request_id`` the reply echoes.
``Rpc.parse`` turns a message into a request or raises ``Rejected``;
``Rpc.work`` gives the transaction that answers it. A request the engine or
the registry refuses becomes a reply with ``error`` set, never an exception
that escapes.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from controller.credentials import MQTT_PASSWORD, Enrolment, EnrolmentRefused
from controller.dynsec import agent_commands
from controller.effects import Publish
from controller.engine import Engine, EngineError
from controller.kb import KBCatalog
from controller.presence import (
    Reason,
    Transition,
    agent_event,
    status_message,
    touch,
    transition_effects,
)
from controller.registry import Registration, get_agent, list_agents, register
from schemas.codec import decode, encode
from schemas.errors import MessageError, TopicError
from schemas.messages import (
    AgentState,
    CancelReply,
    CancelRequest,
    ErrorBody,
    ErrorCode,
    EventKind,
    HeartbeatReply,
    HeartbeatRequest,
    LookupKind,
    LookupReply,
    LookupRequest,
    RegisterReply,
    RegisterRequest,
    Reply,
    Request,
    TaskCheckReply,
    TaskCheckRequest,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod, Topics

REQUESTS: dict[RpcMethod, type[Request]] = {
    RpcMethod.REGISTER: RegisterRequest,
    RpcMethod.HEARTBEAT: HeartbeatRequest,
    RpcMethod.TRIGGER: TriggerRequest,
    RpcMethod.CANCEL: CancelRequest,
    RpcMethod.TASK_CHECK: TaskCheckRequest,
    RpcMethod.LOOKUP: LookupRequest,
}
REPLIES: dict[RpcMethod, type[Reply]] = {
    RpcMethod.REGISTER: RegisterReply,
    RpcMethod.HEARTBEAT: HeartbeatReply,
    RpcMethod.TRIGGER: TriggerReply,
    RpcMethod.CANCEL: CancelReply,
    RpcMethod.TASK_CHECK: TaskCheckReply,
    RpcMethod.LOOKUP: LookupReply,
}
OPEN_ENROLMENT = Enrolment(token=None, agent_secret=None)
_REPLY_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass(frozen=True, slots=True)
class InvalidCall:
    """An error reply for a request that failed validation."""

    reply_to: str
    reply: Reply


class Rejected(Exception):
    """A message we refuse; ``reason`` labels the rejection metric.

    ``answer`` is set for a malformed request that can still be told so.
    """

    def __init__(
        self, reason: str, message: str, *, agent_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.agent_id = agent_id
        self.answer: InvalidCall | None = None


class RpcError(Exception):
    """A request answered with an error reply (``code`` is an ``ErrorCode``)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Call:
    """A parsed request, ready to answer."""

    method: RpcMethod
    request: Request


@dataclass(slots=True)
class Outcome:
    """A committed request: the reply, what to publish, what to log."""

    reply: Reply
    effects: list[Publish] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    registration: Registration | None = None


def valid_reply_to(topics: Topics, reply_to: str) -> bool:
    """Under ``{root}/replies/``, one or more plain levels, no wildcards."""
    prefix = f"{topics.root}/replies/"
    if not reply_to.startswith(prefix):
        return False
    return all(
        _REPLY_LEVEL.match(level) for level in reply_to[len(prefix) :].split("/")
    )


def error_reply(
    method: RpcMethod, request_id: str, code: ErrorCode, message: str
) -> Reply:
    return REPLIES[method](
        request_id=request_id, error=ErrorBody(code=code, message=message)
    )


class Rpc:
    def __init__(
        self,
        topics: Topics,
        engine: Engine,
        catalog: KBCatalog,
        enrolment: Enrolment = OPEN_ENROLMENT,
        *,
        mosquitto_dynsec: bool = False,
    ) -> None:
        self.topics = topics
        self.engine = engine
        self.catalog = catalog
        self.enrolment = enrolment
        self.mosquitto_dynsec = mosquitto_dynsec

    def parse(self, topic: str, payload: bytes) -> Call:
        """The request in a message, or ``Rejected``."""
        try:
            method = self.topics.parse_rpc(topic)
        except TopicError as exc:
            raise Rejected("unknown_method", str(exc)) from None
        try:
            request = decode(REQUESTS[method], payload)
        except MessageError as exc:
            raise self._invalid(method, payload, exc) from None
        if not valid_reply_to(self.topics, request.reply_to):
            raise Rejected(
                "bad_reply_to",
                f"reply_to {request.reply_to!r} is not under "
                f"{self.topics.root}/replies/; nothing was published there.",
            )
        return Call(method, request)

    def _invalid(
        self, method: RpcMethod, payload: bytes, exc: MessageError
    ) -> Rejected:
        """A malformed request whose envelope is good enough to answer."""
        rejected = Rejected(exc.reason, str(exc))
        try:
            envelope = decode(Request, payload)
        except MessageError:
            return rejected
        if valid_reply_to(self.topics, envelope.reply_to):
            rejected.answer = InvalidCall(
                envelope.reply_to,
                error_reply(method, envelope.request_id, ErrorCode.INVALID, str(exc)),
            )
        return rejected

    def work(self, call: Call, now: datetime) -> Callable[[Session], Outcome]:
        """The transaction that answers ``call``; raises ``RpcError`` to refuse."""
        request = call.request
        if isinstance(request, RegisterRequest):
            return lambda s: self._register(s, request, now)
        if isinstance(request, HeartbeatRequest):
            return lambda s: self._heartbeat(s, request, now)
        if isinstance(request, TriggerRequest):
            return lambda s: self._trigger(s, request, now)
        if isinstance(request, CancelRequest):
            return lambda s: self._cancel(s, request, now)
        if isinstance(request, TaskCheckRequest):
            return lambda s: self._task_check(s, request)
        if isinstance(request, LookupRequest):
            return lambda s: self._lookup(s, request)
        raise AssertionError(f"no handler for {call.method}")  # pragma: no cover

    # --- methods ---------------------------------------------------------------

    def _register(self, s: Session, request: RegisterRequest, now: datetime) -> Outcome:
        known = request.agent_id is not None and get_agent(s, request.agent_id)
        try:
            self.enrolment.admit(request, known=bool(known))
        except EnrolmentRefused as exc:
            raise RpcError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        reg = register(s, request, now)
        agent = reg.agent
        credentials = self.enrolment.credentials(agent.agent_id)
        account: list[Publish] = []
        if credentials is not None:
            agent = agent.model_copy(update={"credentials": credentials})
            if self.mosquitto_dynsec:
                # Before the reply: the account exists when the agent uses it.
                # A known agent was admitted by proving this password already.
                account.append(
                    agent_commands(
                        self.topics.root,
                        agent.agent_id,
                        credentials[MQTT_PASSWORD],
                        set_password=not known,
                    )
                )
        # After every registration, the agent's current state, retained: the
        # status topics list the whole fleet.
        effects = [
            *account,
            status_message(
                self.topics,
                agent.agent_id,
                AgentState(agent.status),
                agent.epoch,
                Reason.REGISTER,
            ),
            agent_event(
                self.topics,
                EventKind.AGENT_REGISTERED,
                agent.agent_id,
                {"hostname": agent.hostname, "created": reg.created},
            ),
        ]
        transitions = []
        if reg.came_online:
            online = Transition(
                agent.agent_id, AgentState.ONLINE, agent.epoch, Reason.REGISTER
            )
            transitions.append(online)
            effects.append(
                agent_event(
                    self.topics,
                    EventKind.AGENT_ONLINE,
                    agent.agent_id,
                    {"reason": online.reason, "epoch": online.epoch},
                )
            )
        # The registering agent is here now: its queued workflows may start.
        effects += self.engine.agents_online(s, [agent.agent_id], now)
        return Outcome(
            RegisterReply(request_id=request.request_id, agent=agent),
            effects,
            transitions,
            registration=reg,
        )

    def _heartbeat(
        self, s: Session, request: HeartbeatRequest, now: datetime
    ) -> Outcome:
        touched = touch(s, {request.agent_id: now}, now)
        if touched.unknown:
            raise RpcError(
                ErrorCode.NOT_FOUND,
                f"agent {request.agent_id!r} is not registered; register first.",
            )
        effects: list[Publish] = []
        for t in touched.revived:
            effects += transition_effects(self.topics, t)
        if touched.revived:
            effects += self.engine.agents_online(s, [request.agent_id], now)
        return Outcome(
            HeartbeatReply(request_id=request.request_id), effects, touched.revived
        )

    def _trigger(self, s: Session, request: TriggerRequest, now: datetime) -> Outcome:
        view, created, effects = self.engine.trigger(
            s,
            request.agent_id,
            request.kb_id,
            dict(request.params),
            request.idempotency_key,
            now,
        )
        return Outcome(
            TriggerReply(request_id=request.request_id, workflow=view, created=created),
            effects,
        )

    def _cancel(self, s: Session, request: CancelRequest, now: datetime) -> Outcome:
        view, effects = self.engine.cancel(s, request.workflow_id, request.reason, now)
        return Outcome(
            CancelReply(request_id=request.request_id, workflow=view), effects
        )

    def _task_check(self, s: Session, request: TaskCheckRequest) -> Outcome:
        self.engine.check_task(s, request.agent_id, request.task_id)
        return Outcome(TaskCheckReply(request_id=request.request_id))

    def _lookup(self, s: Session, request: LookupRequest) -> Outcome:
        reply = LookupReply(request_id=request.request_id)
        match request.kind:
            case LookupKind.AGENT:
                agent = get_agent(s, self._need_id(request))
                if agent is None:
                    raise RpcError(
                        ErrorCode.NOT_FOUND, f"agent {request.id!r} is not registered."
                    )
                reply = LookupReply(request_id=request.request_id, agents=[agent])
            case LookupKind.AGENTS:
                agents = list_agents(s, request.status, request.limit)
                reply = LookupReply(request_id=request.request_id, agents=agents)
            case LookupKind.WORKFLOW:
                view = self.engine.workflow_view(s, self._need_id(request))
                reply = LookupReply(request_id=request.request_id, workflows=[view])
            case LookupKind.WORKFLOWS:
                views = self.engine.list_workflows(
                    s, request.agent_id, request.status, request.limit
                )
                reply = LookupReply(request_id=request.request_id, workflows=views)
            case LookupKind.KBS:
                reply = LookupReply(
                    request_id=request.request_id, kbs=self.catalog.views()
                )
        return Outcome(reply)

    @staticmethod
    def _need_id(request: LookupRequest) -> str:
        if request.id is None:
            raise RpcError(
                ErrorCode.INVALID, f"lookup {request.kind.value} needs an id."
            )
        return request.id


def refusal(call: Call, exc: Exception) -> Reply:
    """The error reply for a request the transaction refused."""
    if isinstance(exc, RpcError):
        return error_reply(call.method, call.request.request_id, exc.code, str(exc))
    if isinstance(exc, EngineError):
        try:
            code = ErrorCode(exc.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        return error_reply(call.method, call.request.request_id, code, str(exc))
    return error_reply(
        call.method,
        call.request.request_id,
        ErrorCode.INTERNAL,
        "The controller failed to answer this request; see its log.",
    )


def reply_publish(reply_to: str, reply: Reply) -> Publish:
    return Publish(reply_to, encode(reply), qos=1)
