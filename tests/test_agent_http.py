"""HTTP mode: the seed's flow through the real bridge and controller.

The agent speaks only HTTP (register, heartbeat, long poll, results); the
bridge and the controller run in the test's event loop on a real broker and
database, and the operator triggers ``dns-flush-kb`` over HTTP, as the
original service's curl examples do.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx

from agent_sim.app import run as run_agents
from agent_sim.settings import Settings as AgentSettings
from agent_sim.store import AgentState, state_path
from bridge_http.app import run as run_bridge
from bridge_http.settings import Settings as BridgeSettings
from controller.store import upgrade
from tests.support.controller_rig import controller_settings, running_controller
from tests.support.infra import BrokerHandle, free_port
from tests.support.wait import async_wait_until


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _bridge_up(http: httpx.AsyncClient, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_http_agent_completes_the_seed_flow(
    broker: BrokerHandle, db_url: str, tmp_path: Path
) -> None:
    upgrade(db_url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = BridgeSettings(mqtt_url=broker.url, port=port, request_timeout_s=5)
    agent = AgentSettings(
        http_url=base,
        state_dir=tmp_path / "agents",
        heartbeat_s=0.5,
        poll_timeout_s=2,
        seed=3,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )
    path = state_path(agent.state_dir, 0)
    async with (
        running_controller(controller_settings(broker, db_url)),
        background(run_bridge(bridge)) as bridge_task,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
    ):
        await async_wait_until(
            lambda: _bridge_up(http, bridge_task), timeout_s=20, what="bridge up"
        )
        async with background(run_agents(agent)):
            agent_id = await async_wait_until(
                lambda: _agent_id(path), timeout_s=15, what="agent registered"
            )
            first = await _run_seed_flow(http, agent_id)
        # Started again, the agent keeps its id (the controller knows it) and
        # serves the next workflow.
        async with background(run_agents(agent)):
            second = await _run_seed_flow(http, agent_id)
        assert await _agent_id(path) == agent_id
    for view in (first, second):
        assert view["status"] == "succeeded", view
        for step in view["steps"]:
            [attempt] = step["attempts"]
            assert attempt["status"] == "succeeded"
        verify = view["steps"][1]["attempts"][0]
        assert verify["output"].startswith("localhost -> ")


async def _agent_id(path: Path) -> str:
    state = AgentState.load(path)
    return state.agent_id if state else ""


async def _run_seed_flow(http: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    response = await http.post(
        "/api/v1/internal/trigger_kb",
        json={
            "agent_id": agent_id,
            "kb_id": "dns-flush-kb",
            "params": {"name": "localhost"},
        },
    )
    assert response.status_code == 202, response.text
    workflow_id = response.json()["workflow_id"]

    async def finished() -> dict[str, Any]:
        view: dict[str, Any] = (
            await http.get(f"/api/v1/workflows/{workflow_id}")
        ).json()
        final = view["status"] in ("succeeded", "failed", "timed_out", "canceled")
        return view if final else {}

    return await async_wait_until(finished, timeout_s=30, what="workflow finished")
