"""Bad HTTP input through the real bridge to the real controller.

``test_bridge.py`` and ``test_bridge_fuzz.py`` cover bodies and parameters
against a fake controller. Here both are real processes, for what only the
pair decides: a result for another agent's task, an unknown task, agent or
KB, and bodies nested deep enough to break a recursive parser. Whatever the
bridge refuses must not reach the bus: the controller counts no rejection.
"""

import uuid
from pathlib import Path

import httpx
import pytest

from controller.store import upgrade
from tests.support.controller_rig import bus
from tests.support.infra import BrokerHandle, free_port
from tests.support.system import (
    Children,
    bridge_process,
    controller_answers,
    controller_process,
    trigger,
    write_kbs,
)
from tests.support.wait import async_wait_until
from tests.test_bad_input import ControllerMetrics

DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.mosquitto
@pytest.mark.timeout(60)
async def test_bridge_refuses_what_only_the_controller_can_judge(
    mosquitto_broker: BrokerHandle, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: foreign and unknown ids get 409/404 from the controller's
    answer, deep bodies 422, never a 500; nothing refused reaches the bus."""
    broker = mosquitto_broker
    upgrade(sqlite_url)
    metrics_port, port = free_port(), free_port()
    metrics = ControllerMetrics(metrics_port)
    with Children() as children:
        children.start(
            controller_process(
                tmp_path,
                broker.url,
                sqlite_url,
                client_id=f"kbbus-controller-http-{uuid.uuid4().hex[:8]}",
                kb_dir=write_kbs(tmp_path / "kbs"),
                metrics_port=metrics_port,
            )
        )
        children.start(bridge_process(tmp_path, broker.url, port))
        base = f"http://127.0.0.1:{port}"
        async with bus(broker) as b, httpx.AsyncClient(base_url=base) as http:
            await controller_answers(b)

            async def bridge_up() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await async_wait_until(bridge_up, timeout_s=20, what="bridge up")
            host = {"hostname": "h", "ip_address": "127.0.0.1", "os": "test"}
            mine = (await http.post("/api/v1/agent/register", json=host)).json()
            theirs = (await http.post("/api/v1/agent/register", json=host)).json()
            workflow = await trigger(b, theirs["agent_id"])
            their_task = workflow.steps[0].attempts[0].task_id
            before = await metrics.rejected()

            def result(agent_id: str, task_id: str) -> dict[str, object]:
                return {"agent_id": agent_id, "task_id": task_id, "status": "failed"}

            cases: list[tuple[str, str, object, int]] = [
                (
                    "POST",
                    "/api/v1/agent/tasks/results",
                    result(mine["agent_id"], their_task),
                    409,
                ),
                (
                    "POST",
                    "/api/v1/agent/tasks/results",
                    result(mine["agent_id"], "no-such-task"),
                    404,
                ),
                ("POST", "/api/v1/agent/heartbeat", {"agent_id": "nobody"}, 404),
                (
                    "POST",
                    "/api/v1/internal/trigger_kb",
                    {"agent_id": mine["agent_id"], "kb_id": "no-such-kb"},
                    404,
                ),
                (
                    "POST",
                    "/api/v1/internal/trigger_kb",
                    {"agent_id": "nobody", "kb_id": "fault-kb"},
                    404,
                ),
                ("GET", "/api/v1/agent/tasks?agent_id=a%2B%23&timeout=0", None, 422),
                ("GET", "/api/v1/workflows/a%2Fb", None, 404),
            ]
            for method, path, body, status in cases:
                response = await http.request(method, path, json=body)
                assert response.status_code == status, (path, response.text)
                assert "detail" in response.json()
            for path in (
                "/api/v1/agent/register",
                "/api/v1/agent/heartbeat",
                "/api/v1/agent/tasks/results",
                "/api/v1/internal/trigger_kb",
            ):
                response = await http.post(
                    path, content=DEEP, headers={"content-type": "application/json"}
                )
                assert response.status_code == 422, (path, response.text)
            # Still serving, and nothing malformed reached the controller.
            assert (await http.get(f"/api/v1/agents/{mine['agent_id']}")).is_success
            assert await metrics.rejected() == before
