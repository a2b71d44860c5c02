"""The agent-facing endpoints: register, heartbeat, long poll, results."""

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from bridge_http.board import Waiter
from bridge_http.deps import BridgeDep, errors
from bridge_http.errors import BodyTooLarge, BridgeError
from bridge_http.models import (
    HeartbeatAnswer,
    HeartbeatBody,
    RegisterBody,
    ResultAnswer,
    ResultBody,
)
from schemas import DEFAULT_MAX_PAYLOAD_BYTES, encode
from schemas.messages import (
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
from schemas.views import AgentView

log = logging.getLogger("kbbus.bridge")

LONG_POLL_DEFAULT_S = 30.0
LONG_POLL_MAX_S = 60.0


router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


@router.post(
    "/register",
    status_code=201,
    response_model=AgentView,
    responses=errors(413, 502, 503),
    summary="Register an HTTP agent; the controller issues its agent_id.",
)
async def register(body: RegisterBody, bridge: BridgeDep) -> AgentView:
    reply = await bridge.rpc.call(
        RpcMethod.REGISTER,
        RegisterRequest,
        RegisterReply,
        hostname=body.hostname,
        ip_address=body.ip_address,
        os=body.os,
    )
    if reply.agent is None:
        raise BridgeError("The controller answered register without an agent.")
    bridge.board.note_agent(reply.agent.agent_id)
    log.info(
        "agent registered over HTTP agent_id=%s hostname=%s",
        reply.agent.agent_id,
        body.hostname,
    )
    return reply.agent


@router.post(
    "/heartbeat",
    response_model=HeartbeatAnswer,
    responses=errors(404, 413, 502, 503),
    summary="A heartbeat, confirmed by the controller (404 for unknown ids).",
)
async def heartbeat(body: HeartbeatBody, bridge: BridgeDep) -> HeartbeatAnswer:
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
        **errors(404, 502, 503),
    },
    summary="Long poll for the agent's next task.",
)
async def poll_task(
    request: Request,
    bridge: BridgeDep,
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
    waiter = board.park(agent_id)
    try:
        outcome = await _wait(
            waiter, timeout_s, request, bridge.settings.disconnect_check_s
        )
    finally:
        board.unpark(waiter)
    if isinstance(outcome, Task):
        metrics.wake_latency.observe(time.perf_counter() - waiter.woken_at)
        metrics.longpolls.labels("task").inc()
        return _task_response(outcome)
    metrics.longpolls.labels(outcome).inc()
    return Response(status_code=204)


async def _wait(
    waiter: Waiter, timeout_s: float, request: Request, check_s: float
) -> Task | str:
    """Wait for the waiter's task: the task, "empty" or "gone".

    The request's own task does the waiting, waking every ``check_s`` to see
    whether its client is still connected, so a parked poll needs no helper
    task and a vanished client frees its waiter within ``check_s``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return "empty"
        done, _ = await asyncio.wait((waiter.future,), timeout=min(remaining, check_s))
        if done:
            return waiter.future.result() or "empty"
        if await request.is_disconnected():
            log.debug("long poll client left agent_id=%s", waiter.agent_id)
            return "gone"


def _task_response(task: Task) -> Response:
    return Response(content=encode(task), media_type="application/json")


@router.post(
    "/tasks/results",
    status_code=202,
    response_model=ResultAnswer,
    responses=errors(404, 409, 413, 502, 503),
    summary="Post a task's result; 202 once the broker acknowledged it.",
)
async def post_result(body: ResultBody, bridge: BridgeDep) -> JSONResponse:
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
