"""The agent-facing endpoints: register, heartbeat, long poll, results."""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from bridge_http.auth import AgentBearer, Bearer
from bridge_http.board import Waiter
from bridge_http.deps import BridgeDep, errors
from bridge_http.errors import (
    BodyTooLarge,
    BridgeError,
    ControllerRefused,
    Forbidden,
    Unauthorized,
)
from bridge_http.models import (
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatBody,
    RegisterBody,
    RegisteredAgent,
    ResultAnswer,
    ResultBody,
)
from schemas import DEFAULT_MAX_PAYLOAD_BYTES, encode
from schemas.messages import (
    ControllerKeys,
    ErrorCode,
    HeartbeatReply,
    HeartbeatRequest,
    Id,
    RegisterReply,
    RegisterRequest,
    Task,
    TaskCheckReply,
    TaskCheckRequest,
    TaskResult,
)
from schemas.topics import RpcMethod

log = logging.getLogger("kbbus.bridge")

LONG_POLL_DEFAULT_S = 30.0
LONG_POLL_MAX_S = 60.0


router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


@router.post(
    "/register",
    status_code=201,
    response_model=RegisteredAgent,
    responses=errors(401, 403, 413, 429, 502, 503),
    summary="Register an HTTP agent; the controller issues its agent_id.",
)
async def register(
    body: RegisterBody, request: Request, bridge: BridgeDep, credentials: Bearer
) -> RegisteredAgent:
    # Limited before any token is looked at: guessing tokens costs time too.
    bridge.register_limit.check(request.client.host if request.client else "")
    enrolment_token = bridge.auth.enrolment(credentials)
    try:
        reply = await bridge.rpc.call(
            RpcMethod.REGISTER,
            RegisterRequest,
            RegisterReply,
            hostname=body.hostname,
            ip_address=body.ip_address,
            os=body.os,
            enrolment_token=enrolment_token,
        )
    except ControllerRefused as exc:
        if exc.code == ErrorCode.UNAUTHORIZED:
            what = "the enrolment token"
            if enrolment_token is None:
                raise Unauthorized(what) from None
            raise Forbidden(what) from None
        raise
    if reply.agent is None:
        raise ControllerRefused.malformed("register reply (no agent)")
    bridge.board.note_agent(reply.agent.agent_id)
    log.info(
        "agent registered over HTTP agent_id=%s hostname=%s",
        reply.agent.agent_id,
        body.hostname,
    )
    return RegisteredAgent(
        **reply.agent.model_dump(), signing_keys=list(reply.signing_keys)
    )


@router.get(
    "/keys",
    response_model=ControllerKeys,
    responses={404: {"model": ErrorAnswer, "description": "No keys published (yet)."}},
    summary="The controller's signing keys, signed by each of them.",
)
async def controller_keys(bridge: BridgeDep) -> Response:
    # Public keys, and agents check the set's signatures against keys they
    # already trust: no token needed to read it.
    payload = bridge.bus.controller_keys
    if payload is None:
        raise ControllerRefused(
            ErrorCode.NOT_FOUND,
            "The controller has published no signing keys (task signing is off, "
            "or no controller has connected yet).",
        )
    return Response(content=payload, media_type="application/json")


@router.post(
    "/heartbeat",
    response_model=HeartbeatAnswer,
    responses=errors(401, 403, 404, 413, 502, 503),
    summary="A heartbeat, confirmed by the controller (404 for unknown ids).",
)
async def heartbeat(
    body: HeartbeatBody, bridge: BridgeDep, credentials: AgentBearer
) -> HeartbeatAnswer:
    bridge.auth.agent(credentials, body.agent_id)
    await bridge.rpc.call(
        RpcMethod.HEARTBEAT,
        HeartbeatRequest,
        HeartbeatReply,
        agent_id=body.agent_id,
        metrics=body.metrics,
    )
    bridge.board.note_agent(body.agent_id)
    return HeartbeatAnswer(agent_id=body.agent_id)


@router.get(
    "/tasks",
    response_model=Task,
    responses={
        204: {"description": "No task came within the timeout."},
        **errors(401, 403, 404, 502, 503),
    },
    summary="Long poll for the agent's next task.",
)
async def poll_task(
    request: Request,
    bridge: BridgeDep,
    credentials: AgentBearer,
    agent_id: Annotated[Id, Query(description="The polling agent.")],
    timeout_s: Annotated[
        float,
        Query(
            alias="timeout",
            ge=0,
            le=LONG_POLL_MAX_S,
            allow_inf_nan=False,
            description="Seconds to wait for a task (default 30, at most 60).",
        ),
    ] = LONG_POLL_DEFAULT_S,
) -> Response:
    bridge.auth.agent(credentials, agent_id)
    board = bridge.board
    metrics = bridge.metrics
    task = board.pending(agent_id)
    if task is None:
        await bridge.require_agent(agent_id)
        # The look-up awaited: the task may have come meanwhile.
        task = board.pending(agent_id)
    if task is not None:
        metrics.longpolls.labels("pending").inc()
        return _task_response(task)
    waiter = board.park(agent_id, _client_gone_probe(request))
    try:
        if waiter.client_gone is not None:
            await asyncio.wait((waiter.future,), timeout=timeout_s)
        else:
            await _wait_checking(
                waiter, timeout_s, request, bridge.settings.disconnect_check_s
            )
        task = waiter.future.result() if waiter.future.done() else None
    finally:
        board.unpark(waiter)
    if task is not None:
        metrics.wake_latency.observe(time.perf_counter() - waiter.woken_at)
        metrics.longpolls.labels("task").inc()
        return _task_response(task)
    if waiter.left:
        log.debug("long poll client left agent_id=%s", agent_id)
    metrics.longpolls.labels("gone" if waiter.left else "empty").inc()
    return Response(status_code=204)


def _client_gone_probe(request: Request) -> Callable[[], bool] | None:
    """A cheap "has the client gone?" for the board's sweep, if there is one.

    uvicorn's request cycle marks itself ``disconnected`` when the socket
    closes; reading that flag costs nothing, where ``is_disconnected()``
    costs a receive call and a cancel scope per check. Under another server
    (or a middleware that wraps ``receive``) there is no such flag and the
    poll checks for itself.
    """
    cycle = getattr(request.receive, "__self__", None)
    if not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: bool(cycle.disconnected)  # type: ignore[union-attr]


async def _wait_checking(
    waiter: Waiter, timeout_s: float, request: Request, check_s: float
) -> None:
    """Wait for the waiter's future, asking every ``check_s`` for the client."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (remaining := deadline - loop.time()) > 0:
        done, _ = await asyncio.wait((waiter.future,), timeout=min(remaining, check_s))
        if done:
            return
        if await request.is_disconnected():
            waiter.left = True
            return


def _task_response(task: Task) -> Response:
    return Response(content=encode(task), media_type="application/json")


@router.post(
    "/tasks/results",
    status_code=202,
    response_model=ResultAnswer,
    responses=errors(401, 403, 404, 409, 413, 502, 503),
    summary="Post a task's result; 202 once the broker acknowledged it.",
)
async def post_result(
    body: ResultBody, bridge: BridgeDep, credentials: AgentBearer
) -> JSONResponse:
    bridge.auth.agent(credentials, body.agent_id)
    result = TaskResult(**body.model_dump(exclude_none=True))
    payload = encode(result)
    if len(payload) > DEFAULT_MAX_PAYLOAD_BYTES:
        raise BodyTooLarge(len(payload), DEFAULT_MAX_PAYLOAD_BYTES)
    await bridge.rpc.call(
        RpcMethod.TASK_CHECK,
        TaskCheckRequest,
        TaskCheckReply,
        agent_id=body.agent_id,
        task_id=body.task_id,
    )
    # Marked before publishing: a poll racing with the PUBACK must not hand
    # the agent the task it just finished.
    bridge.board.mark_reported(body.agent_id, body.task_id)
    try:
        await bridge.bus.publish(
            bridge.topics.results(body.agent_id),
            payload,
            qos=1,
            timeout_s=bridge.settings.request_timeout_s,
        )
    except BridgeError:
        bridge.board.unmark_reported(body.agent_id, body.task_id)
        raise
    bridge.metrics.results_published.inc()
    log.debug(
        "result published agent_id=%s task_id=%s status=%s",
        body.agent_id,
        body.task_id,
        body.status,
    )
    answer = ResultAnswer(agent_id=body.agent_id, task_id=body.task_id)
    return JSONResponse(answer.model_dump(), status_code=202)
