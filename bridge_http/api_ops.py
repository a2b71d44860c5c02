"""Operator endpoints: trigger, cancel, look-ups, and the event stream."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import JSONResponse, StreamingResponse

from bridge_http.auth import require_operator
from bridge_http.core import Bridge
from bridge_http.deps import BridgeDep, errors
from bridge_http.errors import ControllerRefused
from bridge_http.models import CancelBody, TriggerAnswer, TriggerBody
from schemas import encode
from schemas.messages import (
    CancelReply,
    CancelRequest,
    ErrorCode,
    Id,
    LookupKind,
    LookupReply,
    LookupRequest,
    ShortText,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod
from schemas.views import AgentView, KBView, WorkflowView

log = logging.getLogger("kbbus.bridge")

# A comment line this often keeps proxies from closing a quiet event stream.
SSE_KEEPALIVE_S = 15.0

# Every operator endpoint needs the operator token (when one is configured).
router = APIRouter(
    prefix="/api/v1",
    dependencies=[Depends(require_operator)],
    responses=errors(401, 403),
)
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post(
    "/internal/trigger_kb",
    status_code=202,
    response_model=TriggerAnswer,
    responses=errors(404, 409, 413, 502, 503),
    tags=["operator"],
    summary="Trigger a KB workflow on an agent.",
)
async def trigger_kb(body: TriggerBody, bridge: BridgeDep) -> JSONResponse:
    reply = await bridge.rpc.call(
        RpcMethod.TRIGGER,
        TriggerRequest,
        TriggerReply,
        agent_id=body.agent_id,
        kb_id=body.kb_id,
        params=body.params,
        idempotency_key=body.idempotency_key,
    )
    if reply.workflow is None:
        raise ControllerRefused.malformed("trigger reply (no workflow)")
    wf = reply.workflow
    log.info(
        "KB triggered over HTTP agent_id=%s kb_id=%s workflow_id=%s created=%s",
        body.agent_id,
        body.kb_id,
        wf.workflow_id,
        reply.created,
    )
    answer = TriggerAnswer(
        workflow_id=wf.workflow_id, status=wf.status, created=reply.created, workflow=wf
    )
    return JSONResponse(answer.model_dump(mode="json"), status_code=202)


@router.post(
    "/internal/workflows/{workflow_id}/cancel",
    status_code=202,
    response_model=WorkflowView,
    responses=errors(404, 409, 413, 502, 503),
    tags=["operator"],
    summary="Cancel a workflow.",
)
async def cancel_workflow(
    workflow_id: Id,
    bridge: BridgeDep,
    body: Annotated[CancelBody | None, Body()] = None,
) -> JSONResponse:
    reason = body.reason if body is not None else CancelBody().reason
    reply = await bridge.rpc.call(
        RpcMethod.CANCEL,
        CancelRequest,
        CancelReply,
        workflow_id=workflow_id,
        reason=reason,
    )
    if reply.workflow is None:
        raise ControllerRefused.malformed("cancel reply (no workflow)")
    log.info("workflow cancel requested over HTTP workflow_id=%s", workflow_id)
    return JSONResponse(reply.workflow.model_dump(mode="json"), status_code=202)


async def _lookup(bridge: Bridge, **fields: object) -> LookupReply:
    return await bridge.rpc.call(RpcMethod.LOOKUP, LookupRequest, LookupReply, **fields)


@router.get(
    "/agents",
    response_model=list[AgentView],
    responses=errors(502, 503),
    tags=["operator"],
    summary="The fleet, with status and last_seen_at.",
)
async def list_agents(
    bridge: BridgeDep,
    status: Annotated[ShortText | None, Query()] = None,
    limit: Limit = 1000,
) -> list[AgentView]:
    reply = await _lookup(bridge, kind=LookupKind.AGENTS, status=status, limit=limit)
    return reply.agents or []


@router.get(
    "/agents/{agent_id}",
    response_model=AgentView,
    responses=errors(404, 502, 503),
    tags=["operator"],
    summary="One agent.",
)
async def get_agent(agent_id: Id, bridge: BridgeDep) -> AgentView:
    reply = await _lookup(bridge, kind=LookupKind.AGENT, id=agent_id)
    if not reply.agents:
        raise ControllerRefused(
            ErrorCode.NOT_FOUND, f"No agent with agent_id {agent_id!r}."
        )
    return reply.agents[0]


@router.get(
    "/workflows",
    response_model=list[WorkflowView],
    responses=errors(502, 503),
    tags=["operator"],
    summary="Recent workflows, newest first; filter by agent and status.",
)
async def list_workflows(
    bridge: BridgeDep,
    agent_id: Annotated[Id | None, Query()] = None,
    status: Annotated[ShortText | None, Query()] = None,
    limit: Limit = 100,
) -> list[WorkflowView]:
    reply = await _lookup(
        bridge,
        kind=LookupKind.WORKFLOWS,
        agent_id=agent_id,
        status=status,
        limit=limit,
    )
    return reply.workflows or []


@router.get(
    "/workflows/{workflow_id}",
    response_model=WorkflowView,
    responses=errors(404, 502, 503),
    tags=["operator"],
    summary="A workflow with its steps, attempts and outputs.",
)
async def get_workflow(workflow_id: Id, bridge: BridgeDep) -> WorkflowView:
    reply = await _lookup(bridge, kind=LookupKind.WORKFLOW, id=workflow_id)
    if not reply.workflows:
        raise ControllerRefused(
            ErrorCode.NOT_FOUND, f"No workflow with workflow_id {workflow_id!r}."
        )
    return reply.workflows[0]


@router.get(
    "/kbs",
    response_model=list[KBView],
    responses=errors(502, 503),
    tags=["operator"],
    summary="The KB catalog.",
)
async def list_kbs(bridge: BridgeDep) -> list[KBView]:
    reply = await _lookup(bridge, kind=LookupKind.KBS)
    return reply.kbs or []


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: one `data: <Event JSON>` per event.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
    tags=["operator"],
    summary="Follow agent and workflow events as they happen.",
)
async def events(
    bridge: BridgeDep,
    agent_id: Annotated[Id | None, Query()] = None,
    workflow_id: Annotated[Id | None, Query()] = None,
) -> StreamingResponse:
    feed = bridge.hub.open(agent_id, workflow_id)

    async def stream() -> AsyncIterator[bytes]:
        try:
            # Sent at once so that clients see the stream is open.
            yield b": connected\n\n"
            while True:
                try:
                    async with asyncio.timeout(SSE_KEEPALIVE_S):
                        event = await feed.queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if event is None:
                    return
                yield b"data: " + encode(event) + b"\n\n"
        finally:
            bridge.hub.close_feed(feed)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
