"""The HTTP bridge against a real broker and a fake controller, over real HTTP.

The bridge runs in the test's event loop on a free port (uvicorn, real
sockets); the controller is ``tests.support.fake_controller``, which answers
requests on the bus as the real one does. The end-to-end run against the
real controller is in ``test_bridge_e2e.py``.
"""

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bridge_http import api_agent
from bridge_http.app import run
from bridge_http.errors import CannotServe
from bridge_http.settings import Settings
from schemas import encode
from schemas.messages import (
    ErrorBody,
    ErrorCode,
    Event,
    EventKind,
    LookupReply,
    RegisterReply,
    Task,
)
from schemas.topics import RpcMethod
from tests.support.fake_controller import FakeController
from tests.support.infra import BrokerHandle, free_port
from tests.support.wait import async_wait_until

REQUEST_TIMEOUT_S = 1.0


@dataclass
class Stack:
    broker: BrokerHandle
    controller: FakeController
    http: httpx.AsyncClient
    port: int

    async def register(self) -> str:
        response = await self.http.post(
            "/api/v1/agent/register",
            json={"hostname": "h1", "ip_address": "10.0.0.1", "os": "Linux"},
        )
        assert response.status_code == 201, response.text
        agent_id: str = response.json()["agent_id"]
        return agent_id

    async def health(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self.http.get("/healthz")).json()
        return body

    async def waiters(self) -> int:
        return int((await self.health())["longpoll_waiters"])

    def poll(self, agent_id: str, timeout_s: float) -> "asyncio.Task[httpx.Response]":
        return asyncio.create_task(
            self.http.get(
                "/api/v1/agent/tasks",
                params={"agent_id": agent_id, "timeout": timeout_s},
                timeout=timeout_s + 10,
            )
        )


@contextlib.asynccontextmanager
async def bridge_stack(broker: BrokerHandle, **overrides: Any) -> AsyncIterator[Stack]:
    port = free_port()
    settings = Settings(
        mqtt_url=broker.url,
        port=port,
        request_timeout_s=REQUEST_TIMEOUT_S,
        **overrides,
    )
    controller = FakeController(broker.url)
    async with controller.running():
        serving = asyncio.create_task(run(settings))
        limits = httpx.Limits(max_connections=1000)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=10, limits=limits
        ) as http:
            stack = Stack(broker, controller, http, port)

            async def healthy() -> bool:
                if serving.done():
                    serving.result()  # raise what stopped it
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get("/healthz")).status_code == 200
                return False

            await async_wait_until(healthy, timeout_s=10, what="bridge healthy")
            try:
                yield stack
            finally:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving


@pytest.fixture
async def stack(broker: BrokerHandle) -> AsyncIterator[Stack]:
    async with bridge_stack(broker, disconnect_check_s=0.1) as s:
        yield s


# --- the seed's flow -------------------------------------------------------------


async def test_seed_flow_over_http(stack: Stack) -> None:
    http = stack.http
    agent_id = await stack.register()

    ok = await http.post("/api/v1/agent/heartbeat", json={"agent_id": agent_id})
    assert ok.status_code == 200
    assert ok.json() == {"agent_id": agent_id, "status": "ok"}
    fake = await http.post(
        "/api/v1/agent/heartbeat", json={"agent_id": "this-is-a-fake-id"}
    )
    assert fake.status_code == 404
    assert "detail" in fake.json()

    empty = await http.get(
        "/api/v1/agent/tasks", params={"agent_id": agent_id, "timeout": 0.2}
    )
    assert empty.status_code == 204

    poll = stack.poll(agent_id, 10)
    await async_wait_until(lambda: _is(stack.waiters(), 1), what="poll parked")
    trigger = await http.post(
        "/api/v1/internal/trigger_kb",
        json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
    )
    assert trigger.status_code == 202, trigger.text
    workflow_id = trigger.json()["workflow_id"]
    assert trigger.json()["status"] == "running"

    seen: list[str] = []
    response = await poll
    while response.status_code == 200:
        task = Task.model_validate_json(response.content)
        assert task.agent_id == agent_id
        assert task.task_id not in seen, "a reported task came back"
        seen.append(task.task_id)
        posted = await http.post(
            "/api/v1/agent/tasks/results",
            json={
                "agent_id": agent_id,
                "task_id": task.task_id,
                "status": "succeeded",
                "exit_code": 0,
                "output": "flushed",
            },
        )
        assert posted.status_code == 202, posted.text
        response = await stack.poll(agent_id, 1)
    assert response.status_code == 204
    assert len(seen) == stack.controller.steps

    workflow = await http.get(f"/api/v1/workflows/{workflow_id}")
    assert workflow.status_code == 200
    assert workflow.json()["status"] == "succeeded"
    assert [s["status"] for s in workflow.json()["steps"]] == ["succeeded"] * 2


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# --- long poll --------------------------------------------------------------------


async def test_parked_poll_wakes_within_milliseconds(stack: Stack) -> None:
    agent_id = await stack.register()
    wake_ms: list[float] = []
    for _ in range(5):
        poll = stack.poll(agent_id, 10)
        await async_wait_until(lambda: _is(stack.waiters(), 1), what="poll parked")
        task = await stack.controller.publish_task(agent_id)  # returns at PUBACK
        published = time.perf_counter()
        response = await poll
        wake_ms.append((time.perf_counter() - published) * 1000)
        assert response.status_code == 200
        assert response.json()["task_id"] == task.task_id
        await stack.controller.clear_task(agent_id)
        await async_wait_until(
            lambda: _is(_status_of_quick_poll(stack, agent_id), 204),
            what="task cleared in the bridge",
        )
    # Broker hop + bridge dispatch + HTTP response, on a loaded 2-core box;
    # a poll that was not woken would take the whole 10 s.
    assert sorted(wake_ms)[2] < 100, wake_ms
    metrics = (await stack.http.get("/metrics")).text
    assert "kbbus_bridge_longpoll_wake_seconds_count 5.0" in metrics


async def _status_of_quick_poll(stack: Stack, agent_id: str) -> int:
    response = await stack.http.get(
        "/api/v1/agent/tasks", params={"agent_id": agent_id, "timeout": 0}
    )
    return response.status_code


async def test_pending_task_is_answered_at_once(stack: Stack) -> None:
    agent_id = await stack.register()
    task = await stack.controller.publish_task(agent_id)
    await async_wait_until(
        lambda: _is(_status_of_quick_poll(stack, agent_id), 200),
        what="task known to the bridge",
    )
    started = time.perf_counter()
    response = await stack.poll(agent_id, 30)
    assert response.status_code == 200
    assert response.json()["task_id"] == task.task_id
    assert time.perf_counter() - started < 2


async def test_poll_times_out_with_204(stack: Stack) -> None:
    agent_id = await stack.register()
    started = time.perf_counter()
    response = await stack.poll(agent_id, 0.5)
    elapsed = time.perf_counter() - started
    assert response.status_code == 204
    assert response.content == b""
    assert 0.45 < elapsed < 3


async def test_reported_task_is_not_returned_again(stack: Stack) -> None:
    stack.controller.hold = True  # the retained task stays after the result
    agent_id = await stack.register()
    task = await stack.controller.publish_task(agent_id)
    first = await stack.poll(agent_id, 5)
    assert first.json()["task_id"] == task.task_id
    posted = await stack.http.post(
        "/api/v1/agent/tasks/results",
        json={"agent_id": agent_id, "task_id": task.task_id, "status": "failed"},
    )
    assert posted.status_code == 202
    again = await stack.poll(agent_id, 0.3)
    assert again.status_code == 204
    # The next task is handed out as usual, to a poll already parked.
    poll = stack.poll(agent_id, 10)
    await async_wait_until(lambda: _is(stack.waiters(), 1), what="poll parked")
    following = await stack.controller.publish_task(agent_id)
    assert (await poll).json()["task_id"] == following.task_id
    await async_wait_until(
        lambda: _results(stack.controller, 1), what="result reached the controller"
    )


async def _results(controller: FakeController, n: int) -> bool:
    return len(controller.results) >= n


async def test_unknown_agent_poll_is_404(stack: Stack) -> None:
    response = await stack.poll("no-such-agent", 1)
    assert response.status_code == 404
    assert "detail" in response.json()


@pytest.mark.parametrize("server_flag", [True, False], ids=["flag", "receive"])
async def test_client_leaving_mid_wait_frees_its_waiter(
    stack: Stack, server_flag: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not server_flag:
        # As under a server without uvicorn's disconnect flag: the poll asks
        # request.is_disconnected() itself.
        monkeypatch.setattr(api_agent, "_client_gone_probe", lambda request: None)
    agent_id = await stack.register()
    with socket.create_connection(("127.0.0.1", stack.port)) as raw:
        raw.sendall(
            f"GET /api/v1/agent/tasks?agent_id={agent_id}&timeout=60 HTTP/1.1\r\n"
            "Host: test\r\n\r\n".encode()
        )
        await async_wait_until(lambda: _is(stack.waiters(), 1), what="poll parked")
    # disconnect_check_s is 0.1 in this stack: freed long before the 60 s.
    await async_wait_until(
        lambda: _is(stack.waiters(), 0), timeout_s=3, what="waiter freed"
    )
    metrics = (await stack.http.get("/metrics")).text
    assert 'kbbus_bridge_longpolls_total{outcome="gone"} 1.0' in metrics


async def test_many_waiters_wake_on_their_own_tasks(stack: Stack) -> None:
    agents = [stack.controller.add_agent().agent_id for _ in range(200)]
    # Known from their retained status: no look-up request per poll.
    await asyncio.gather(*(stack.controller.announce(a) for a in agents))
    await async_wait_until(
        lambda: _is(_known(stack), len(agents)), what="agents known to the bridge"
    )
    before = len(stack.controller.requests)
    polls = [stack.poll(a, 20) for a in agents]
    await async_wait_until(
        lambda: _is(stack.waiters(), len(agents)), timeout_s=20, what="all parked"
    )
    tasks = await asyncio.gather(*(stack.controller.publish_task(a) for a in agents))
    responses = await asyncio.gather(*polls)
    for agent_id, task, response in zip(agents, tasks, responses, strict=True):
        assert response.status_code == 200
        assert response.json()["agent_id"] == agent_id
        assert response.json()["task_id"] == task.task_id
    assert await stack.waiters() == 0
    assert len(stack.controller.requests) == before


async def _known(stack: Stack) -> int:
    return int((await stack.health())["known_agents"])


async def test_timeout_parameter_is_validated(stack: Stack) -> None:
    agent_id = await stack.register()
    for bad in ("61", "-1", "abc", "nan", "inf"):
        response = await stack.http.get(
            "/api/v1/agent/tasks", params={"agent_id": agent_id, "timeout": bad}
        )
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["query", "timeout"]
    missing = await stack.http.get("/api/v1/agent/tasks")
    assert missing.status_code == 422


# --- results ---------------------------------------------------------------------


async def test_result_checks_refuse_unknown_and_foreign_tasks(stack: Stack) -> None:
    owner = await stack.register()
    other = await stack.register()
    task = await stack.controller.publish_task(owner)
    body = {"agent_id": other, "task_id": task.task_id, "status": "succeeded"}
    foreign = await stack.http.post("/api/v1/agent/tasks/results", json=body)
    assert foreign.status_code == 409
    body = {"agent_id": owner, "task_id": "no-such-task", "status": "succeeded"}
    unknown = await stack.http.post("/api/v1/agent/tasks/results", json=body)
    assert unknown.status_code == 404
    body = {"agent_id": "nobody", "task_id": task.task_id, "status": "succeeded"}
    nobody = await stack.http.post("/api/v1/agent/tasks/results", json=body)
    assert nobody.status_code == 404
    # A valid result afterwards arrives alone: the refused ones were not sent.
    body = {"agent_id": owner, "task_id": task.task_id, "status": "succeeded"}
    assert (
        await stack.http.post("/api/v1/agent/tasks/results", json=body)
    ).status_code == 202
    await async_wait_until(lambda: _results(stack.controller, 1), what="result")
    assert [r.task_id for r in stack.controller.results] == [task.task_id]
    assert stack.controller.results[0].agent_id == owner


async def test_no_broker_means_503_not_202(broker: BrokerHandle) -> None:
    async with bridge_stack(broker) as stack:
        agent_id = await stack.register()
        task = await stack.controller.publish_task(agent_id)
        broker.stop()
        await async_wait_until(
            lambda: _is(_health_code(stack), 503), what="bridge sees the broker gone"
        )
        assert (await stack.health())["mqtt"] == "disconnected"
        body = {"agent_id": agent_id, "task_id": task.task_id, "status": "succeeded"}
        response = await stack.http.post("/api/v1/agent/tasks/results", json=body)
        assert response.status_code == 503
        assert "broker" in response.json()["detail"]
        broker.start()
        await async_wait_until(
            lambda: _is(_health_code(stack), 200), what="bridge reconnected"
        )


async def _health_code(stack: Stack) -> int:
    return (await stack.http.get("/healthz")).status_code


async def test_silent_controller_gives_503_within_the_deadline(stack: Stack) -> None:
    stack.controller.silent = True
    started = time.perf_counter()
    response = await stack.http.post(
        "/api/v1/agent/register", json={"hostname": "h", "ip_address": "", "os": ""}
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 503
    assert "controller did not answer the register request" in response.json()["detail"]
    assert REQUEST_TIMEOUT_S * 0.9 < elapsed < REQUEST_TIMEOUT_S + 2
    metrics = (await stack.http.get("/metrics")).text
    assert 'kbbus_bridge_rpc_timeouts_total{method="register"} 1.0' in metrics


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/api/v1/agent/register", b"{not json", "body"),
        ("/api/v1/agent/register", b"{}", "hostname"),
        ("/api/v1/agent/register", b'{"hostname": 5}', "hostname"),
        ("/api/v1/agent/register", b'["hostname"]', "body"),
        ("/api/v1/agent/heartbeat", b'{"agent_id": "a/b"}', "agent_id"),
        ("/api/v1/agent/heartbeat", b'{"agent_id": null}', "agent_id"),
        (
            "/api/v1/agent/heartbeat",
            b'{"agent_id": "a", "metrics": {"cpu": NaN}}',
            "body",
        ),
        ("/api/v1/agent/register", b"\xff\xfe\x00", "body"),
        ("/api/v1/agent/tasks/results", b'{"agent_id": "a", "task_id": "t"}', "status"),
        (
            "/api/v1/agent/tasks/results",
            b'{"agent_id": "a", "task_id": "t", "status": "maybe"}',
            "status",
        ),
        (
            "/api/v1/agent/tasks/results",
            b'{"agent_id": "a", "task_id": "t", "status": "failed", "exit_code": "x"}',
            "exit_code",
        ),
        ("/api/v1/internal/trigger_kb", b'{"agent_id": "a"}', "kb_id"),
        ("/api/v1/internal/trigger_kb", b'{"agent_id": "a", "kb_id": "#"}', "kb_id"),
    ],
)
async def test_bad_bodies_get_422_saying_what(
    amqtt_broker: BrokerHandle, path: str, body: bytes, where: str
) -> None:
    async with bridge_stack(amqtt_broker) as stack:
        response = await stack.http.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert any(where in [str(p) for p in d["loc"]] for d in detail), detail
        assert stack.controller.requests == []


async def test_oversized_bodies_get_413(stack: Stack) -> None:
    agent_id = await stack.register()
    before = len(stack.controller.requests)
    big = {
        "agent_id": agent_id,
        "task_id": "t1",
        "status": "ok",
        "output": "x" * 300_000,
    }
    declared = await stack.http.post("/api/v1/agent/tasks/results", json=big)
    assert declared.status_code == 413
    assert "limit" in declared.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 16_384):
            yield data[i : i + 16_384]

    streamed = await stack.http.post(
        "/api/v1/agent/tasks/results",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413
    assert "limit" in streamed.json()["detail"]
    assert len(stack.controller.requests) == before


# --- operator endpoints ---------------------------------------------------------------


async def test_lookups_cancel_and_kbs(stack: Stack) -> None:
    http = stack.http
    agent_id = await stack.register()
    agents = await http.get("/api/v1/agents")
    assert [a["agent_id"] for a in agents.json()] == [agent_id]
    one = await http.get(f"/api/v1/agents/{agent_id}")
    assert one.status_code == 200
    assert one.json()["status"] == "online"
    assert (await http.get("/api/v1/agents/nobody")).status_code == 404
    kbs = await http.get("/api/v1/kbs")
    assert "dns-flush-kb" in [k["kb_id"] for k in kbs.json()]
    unknown_kb = await http.post(
        "/api/v1/internal/trigger_kb", json={"agent_id": agent_id, "kb_id": "nope"}
    )
    assert unknown_kb.status_code == 404
    trigger = await http.post(
        "/api/v1/internal/trigger_kb",
        json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
    )
    workflow_id = trigger.json()["workflow_id"]
    listed = await http.get("/api/v1/workflows", params={"agent_id": agent_id})
    assert [w["workflow_id"] for w in listed.json()] == [workflow_id]
    canceled = await http.post(f"/api/v1/internal/workflows/{workflow_id}/cancel")
    assert canceled.status_code == 202
    assert canceled.json()["status"] == "canceled"
    missing = await http.post("/api/v1/internal/workflows/nope/cancel")
    assert missing.status_code == 404
    assert (await http.get("/api/v1/workflows/nope")).status_code == 404


async def test_events_stream_as_server_sent_events(stack: Stack) -> None:
    event = Event(kind=EventKind.AGENT_ONLINE, agent_id="a1", data={"epoch": 3})
    other = Event(kind=EventKind.AGENT_ONLINE, agent_id="a2")
    async with stack.http.stream(
        "GET", "/api/v1/events", params={"agent_id": "a1"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith(":")
        # The bridge subscribes when the first client arrives; publish until
        # one event gets through.
        got: list[Event] = []

        async def one_through() -> bool:
            await stack.controller.publish_event(other)
            await stack.controller.publish_event(event)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for line in lines:
                        if line.startswith("data: "):
                            got.append(Event.model_validate_json(line[6:]))
                            return True
            return False

        await async_wait_until(one_through, what="an event through the stream")
        assert got[0].agent_id == "a1"
        assert got[0].data == {"epoch": 3}


async def test_metrics_count_requests_by_route(stack: Stack) -> None:
    await stack.register()
    await stack.http.get("/api/v1/agents/nobody")
    text = (await stack.http.get("/metrics")).text
    assert (
        'kbbus_bridge_http_requests_total{code="201",method="POST",'
        'route="/api/v1/agent/register"} 1.0'
    ) in text
    assert (
        'kbbus_bridge_http_requests_total{code="404",method="GET",'
        'route="/api/v1/agents/{agent_id}"} 1.0'
    ) in text
    assert "kbbus_bridge_mqtt_connected 1.0" in text


async def test_stopping_answers_parked_polls_at_once(broker: BrokerHandle) -> None:
    port = free_port()
    settings = Settings(mqtt_url=broker.url, port=port)
    serving = asyncio.create_task(run(settings))
    controller = FakeController(broker.url)
    async with (
        controller.running(),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http,
    ):
        stack = Stack(broker, controller, http, port)

        async def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get("/healthz")).status_code == 200
            return False

        await async_wait_until(up, what="bridge healthy")
        agent_id = await stack.register()
        poll = stack.poll(agent_id, 60)
        await async_wait_until(lambda: _is(stack.waiters(), 1), what="poll parked")
        started = time.perf_counter()
        serving.cancel()
        response = await poll
        assert response.status_code == 204
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        assert time.perf_counter() - started < 3


async def test_garbage_on_the_bus_is_counted_and_ignored(stack: Stack) -> None:
    agent_id = await stack.register()
    client = stack.controller.client
    topics = stack.controller.topics
    await client.publish(topics.tasks(agent_id), b"not json", qos=1, retain=True)
    stray = await stack.controller.publish_task("someone-else")
    misfiled = stray.model_copy(update={"task_id": "misfiled"})
    await client.publish(topics.tasks(agent_id), encode(misfiled), qos=1)
    await client.publish(topics.reply("kbbus-bridge-nobody"), b"{}", qos=1)

    async def rejected() -> bool:
        text = (await stack.http.get("/metrics")).text
        return (
            'kbbus_bridge_mqtt_messages_total{kind="other",outcome="rejected"} 1.0'
            in text
            and 'kbbus_bridge_mqtt_messages_total{kind="task",outcome="rejected"} 1.0'
            in text
        )

    await async_wait_until(rejected, what="garbage counted")
    assert await _status_of_quick_poll(stack, agent_id) == 204
    task = await stack.controller.publish_task(agent_id)
    assert (await stack.poll(agent_id, 5)).json()["task_id"] == task.task_id


async def test_a_port_in_use_is_a_clear_error(broker: BrokerHandle) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CannotServe, match=f"127.0.0.1:{port}.*--port"):
            await run(Settings(mqtt_url=broker.url, port=port))


async def test_a_controller_failure_is_502_not_500(stack: Stack) -> None:
    fake = stack.controller
    fake.overrides[RpcMethod.REGISTER] = lambda req: RegisterReply(
        request_id=req.request_id
    )
    fake.overrides[RpcMethod.LOOKUP] = lambda req: LookupReply(
        request_id=req.request_id,
        error=ErrorBody(code=ErrorCode.INTERNAL, message="database is gone"),
    )
    body = {"hostname": "h"}
    register = await stack.http.post("/api/v1/agent/register", json=body)
    assert register.status_code == 502
    assert "malformed register reply" in register.json()["detail"]
    kbs = await stack.http.get("/api/v1/kbs")
    assert kbs.status_code == 502
    assert kbs.json() == {"detail": "database is gone"}
