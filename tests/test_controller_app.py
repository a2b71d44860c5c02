"""The running controller: requests, bad input, restarts, workflows end to end."""

import asyncio
import contextlib
import functools
import logging
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import httpx
import pytest

from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentState,
    AgentStatus,
    Heartbeat,
    LookupKind,
    LookupReply,
    LookupRequest,
    RegisterReply,
    RegisterRequest,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod
from tests.support.controller_rig import (
    REPO,
    AgentProcess,
    Bus,
    bus,
    controller_settings,
    database,
    eventually,
    running_controller,
)
from tests.support.infra import BrokerHandle, free_port, port_open
from tests.support.wait import async_wait_until


def new_id() -> str:
    return str(uuid.uuid4())


async def test_lookups_answer_from_the_database(
    broker: BrokerHandle, db_url: str
) -> None:
    async with (
        running_controller(controller_settings(broker, db_url)),
        bus(broker) as b,
    ):
        agent = await b.register("looked-up", agent_id=new_id())
        one = b.new_request(LookupRequest, kind=LookupKind.AGENT, id=agent.agent_id)
        reply = await b.request(RpcMethod.LOOKUP, one, LookupReply)
        assert reply.agents is not None
        assert [a.agent_id for a in reply.agents] == [agent.agent_id]
        missing = b.new_request(LookupRequest, kind=LookupKind.AGENT, id="nobody")
        reply = await b.request(RpcMethod.LOOKUP, missing, LookupReply)
        assert reply.error is not None
        assert reply.error.code == "not_found"
        online = b.new_request(LookupRequest, kind=LookupKind.AGENTS, status="online")
        reply = await b.request(RpcMethod.LOOKUP, online, LookupReply)
        assert reply.agents is not None
        assert len(reply.agents) == 1
        kbs = b.new_request(LookupRequest, kind=LookupKind.KBS)
        reply = await b.request(RpcMethod.LOOKUP, kbs, LookupReply)
        assert reply.kbs is not None
        assert "dns-flush-kb" in {kb.kb_id for kb in reply.kbs}


@contextlib.asynccontextmanager
async def listening(broker: BrokerHandle, topic: str) -> AsyncIterator[list[bytes]]:
    """Everything published on ``topic`` while the block runs."""
    seen: list[bytes] = []
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.append(message.payload)

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_garbage_on_every_topic_is_rejected_and_counted(
    broker: BrokerHandle, db_url: str
) -> None:
    with database(db_url) as db:
        async with (
            running_controller(controller_settings(broker, db_url)) as rig,
            bus(broker) as b,
            listening(broker, "elsewhere/#") as elsewhere,
        ):
            known = (await b.register("victim", agent_id=new_id())).agent_id
            t = b.topics
            stranger = new_id()
            good_status = AgentStatus(
                agent_id=stranger, state=AgentState.ONLINE, epoch=1
            )
            cases: list[tuple[str, bytes, str, str]] = [
                (t.status(known), b"not json", "malformed_json", "status"),
                (t.status(known), b'{"v":1}', "schema", "status"),
                (t.status(known), b'{"v":9,"agent_id":"x"}', "version", "status"),
                (t.status(known), encode(good_status), "agent_mismatch", "status"),
                (t.status(stranger), encode(good_status), "unknown_agent", "status"),
                (t.heartbeat(known), b"\xff\xfe", "malformed_json", "heartbeat"),
                (t.heartbeat(known), b" " * 300_000, "oversized", "heartbeat"),
                (
                    t.heartbeat(stranger),
                    encode(Heartbeat(agent_id=stranger)),
                    "unknown_agent",
                    "heartbeat",
                ),
                (
                    "kbbus/v1/agents/not an id/heartbeat",
                    b"{}",
                    "bad_topic",
                    "heartbeat",
                ),
                (t.results(known), b"[]", "schema", "results"),
                (
                    t.results(known),
                    encode(
                        TaskResult(
                            agent_id=known, task_id="no-such-task", status="failed"
                        )
                    ),
                    "not_found",
                    "results",
                ),
                (t.rpc(RpcMethod.REGISTER), b"{{{", "malformed_json", "rpc"),
                ("kbbus/v1/rpc/no_such_method", b"{}", "unknown_method", "rpc"),
                (
                    t.rpc(RpcMethod.REGISTER),
                    encode(
                        RegisterRequest(
                            request_id="r1", reply_to="elsewhere/x", hostname="h"
                        )
                    ),
                    "bad_reply_to",
                    "rpc",
                ),
            ]
            for topic, payload, _, _ in cases:
                await b.client.publish(topic, payload, qos=1)
            for _, _, reason, channel in cases:
                await eventually(
                    functools.partial(rig.rejected, reason, channel),
                    what=f"{reason} on {channel} counted",
                )
            # A malformed request that names a good reply_to is told why.
            bad = b'{"v":1,"request_id":"r2","reply_to":"%s","hostname":""}' % (
                b.reply_to.encode()
            )
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            b._replies["r2"] = future
            await b.client.publish(t.rpc(RpcMethod.REGISTER), bad, qos=1)
            async with asyncio.timeout(5):
                reply = decode(RegisterReply, await future)
            assert reply.error is not None
            assert reply.error.code == "invalid"
            # Valid traffic still flows, and nothing went where it must not.
            fresh = await b.register("after-the-garbage", agent_id=new_id())
            assert fresh.status == "online"
            row = await db.agent(fresh.agent_id)
            assert row is not None
            assert not rig.task.done()
            assert elsewhere == []


async def test_restart_loses_no_agent_and_no_presence(
    broker: BrokerHandle, db_url: str
) -> None:
    settings = controller_settings(broker, db_url, offline_after_s=2.0)
    live_id, dying_id, gone_id = new_id(), new_id(), new_id()
    with database(db_url) as db:
        async with bus(broker) as b:
            async with running_controller(settings):
                live = await AgentProcess.start(broker, live_id)
                dying = await AgentProcess.start(broker, dying_id)
                await b.register("gone", agent_id=gone_id)
                status = AgentStatus(
                    agent_id=gone_id,
                    state=AgentState.OFFLINE,
                    epoch=0,
                    reason="shutdown",
                )
                await b.client.publish(
                    b.topics.status(gone_id), encode(status), qos=1, retain=True
                )
                await db.wait_connected(live_id, live.epoch, timeout_s=5)
                await db.wait_connected(dying_id, dying.epoch, timeout_s=5)
                await db.wait_status(gone_id, "offline", timeout_s=5)
            try:
                # While the controller is away, one agent dies.
                await dying.stop()
                async with running_controller(settings) as rig:
                    assert await db.count() == 3
                    await db.wait_status(dying_id, "offline", timeout_s=5)
                    row = await db.agent(gone_id)
                    assert row is not None
                    assert row.status == "offline"
                    # Past the sweep's grace period the live agent is still
                    # online, at the epoch of its connection.
                    await eventually(
                        lambda: (
                            rig.metrics.value("kbbus_agents", {"status": "online"}) == 1
                        ),
                        timeout_s=5,
                        what="gauge updated by a sweep",
                    )
                    row = await db.agent(live_id)
                    assert row is not None
                    assert (row.status, row.epoch) == ("online", live.epoch)
            finally:
                await live.stop()


async def _run_agent_side(
    broker: BrokerHandle, b: Bus, agent_id: str, steps: int
) -> list[Task]:
    """Act as the agent: answer each task on our tasks topic with a success."""
    tasks: list[Task] = []
    my_tasks = b.topics.tasks(agent_id)
    async with BusClient(broker.url, agent_id) as me:
        await me.subscribe(my_tasks, qos=1)
        async with asyncio.timeout(10):
            async for message in me.messages:
                # amqtt also hands a new client others' retained messages.
                if message.topic.value != my_tasks:
                    continue
                assert isinstance(message.payload, bytes)
                if not message.payload:
                    if len(tasks) == steps:
                        return tasks
                    continue
                task = decode(Task, message.payload)
                if task.task_id in {t.task_id for t in tasks}:
                    continue
                tasks.append(task)
                result = TaskResult(
                    agent_id=agent_id,
                    task_id=task.task_id,
                    status="succeeded",
                    exit_code=0,
                    output=f"did {task.action}",
                )
                await me.publish(b.topics.results(agent_id), encode(result), qos=1)
    return tasks


async def test_workflow_runs_through_the_controller(
    broker: BrokerHandle, db_url: str
) -> None:
    async with (
        running_controller(controller_settings(broker, db_url)),
        bus(broker) as b,
    ):
        agent_id = (await b.register("worker", agent_id=new_id())).agent_id
        request = b.new_request(
            TriggerRequest,
            agent_id=agent_id,
            kb_id="dns-flush-kb",
            params={"name": "example.org"},
            idempotency_key="once",
        )
        reply = await b.request(RpcMethod.TRIGGER, request, TriggerReply)
        assert reply.error is None, reply.error
        assert reply.workflow is not None
        assert reply.created
        workflow_id = reply.workflow.workflow_id
        tasks = await _run_agent_side(broker, b, agent_id, steps=2)
        assert [t.action for t in tasks] == ["dns.flush", "dns.resolve"]
        assert tasks[1].args == {"name": "example.org"}

        async def finished() -> bool:
            lookup = b.new_request(
                LookupRequest, kind=LookupKind.WORKFLOW, id=workflow_id
            )
            reply = await b.request(RpcMethod.LOOKUP, lookup, LookupReply)
            assert reply.workflows is not None
            return reply.workflows[0].status == "succeeded"

        await async_wait_until(finished, timeout_s=5, what="workflow succeeded")
        again = b.new_request(
            TriggerRequest,
            agent_id=agent_id,
            kb_id="dns-flush-kb",
            params={"name": "example.org"},
            idempotency_key="once",
        )
        reply = await b.request(RpcMethod.TRIGGER, again, TriggerReply)
        assert reply.workflow is not None
        assert reply.workflow.workflow_id == workflow_id
        assert not reply.created
        unknown = b.new_request(TriggerRequest, agent_id=agent_id, kb_id="no-such-kb")
        reply = await b.request(RpcMethod.TRIGGER, unknown, TriggerReply)
        assert reply.error is not None
        assert reply.error.code == "not_found"


async def test_python_m_controller_runs_and_stops_on_sigterm(
    amqtt_broker: BrokerHandle, sqlite_url: str
) -> None:
    metrics_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controller",
        "--mqtt-url",
        amqtt_broker.url,
        "--db-url",
        sqlite_url,
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "json",
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(
            lambda: port_open(metrics_port), timeout_s=20, what="metrics endpoint"
        )
        async with bus(amqtt_broker) as b:
            agent = await b.register("via-cli")
            assert agent.status == "online"
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "kbbus_controller_mqtt_connected 1.0" in text
        assert 'kbbus_messages_processed_total{channel="rpc"}' in text
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert '"logger": "kbbus.controller"' in log
        assert "agent registered: agent_id=" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_reconnects_after_the_broker_restarts(
    broker: BrokerHandle, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kbbus.controller")
    async with running_controller(controller_settings(broker, db_url)) as rig:
        await asyncio.to_thread(broker.restart)
        await eventually(
            lambda: caplog.text.count("connected to broker") >= 2,
            timeout_s=10,
            what="reconnected",
        )
        assert "broker connection lost or refused" in caplog.text
        await eventually(
            lambda: rig.metrics.value("kbbus_controller_mqtt_connected") == 1,
            what="connected gauge",
        )
        async with bus(broker) as b:
            agent = await b.register("after-broker-restart")
            assert agent.status == "online"


async def test_request_sent_while_the_controller_is_away_is_answered(
    mosquitto_broker: BrokerHandle, db_url: str
) -> None:
    """Clean session off: the broker keeps QoS 1 requests for the controller."""
    settings = controller_settings(mosquitto_broker, db_url)
    async with running_controller(settings):
        pass
    async with bus(mosquitto_broker) as b:
        request = b.new_request(RegisterRequest, hostname="early", agent_id=new_id())
        pending = await b.send(RpcMethod.REGISTER, request)
        async with running_controller(settings):
            async with asyncio.timeout(10):
                reply = decode(RegisterReply, await pending)
        assert reply.agent is not None
        assert reply.agent.agent_id == request.agent_id


async def test_unacknowledged_request_is_redelivered_after_a_database_outage(
    mosquitto_broker: BrokerHandle,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request whose transaction cannot commit is not acknowledged: the
    controller waits for the database (and says so); stopped meanwhile, the
    next controller gets the request again from the broker and answers it."""
    caplog.set_level(logging.INFO, logger="kbbus.controller")
    settings = controller_settings(mosquitto_broker, sqlite_url)
    agent_id = new_id()
    async with bus(mosquitto_broker) as b:
        request = b.new_request(RegisterRequest, hostname="patient", agent_id=agent_id)
        locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        try:
            async with running_controller(settings) as rig:
                locker.execute("BEGIN EXCLUSIVE")
                pending = await b.send(RpcMethod.REGISTER, request)
                await eventually(
                    lambda: "database unavailable" in caplog.text,
                    timeout_s=15,
                    what="outage logged",
                )
                assert not pending.done()
                assert (
                    rig.metrics.value(
                        "kbbus_messages_processed_total", {"channel": "rpc"}
                    )
                    >= 1
                )
        finally:
            locker.rollback()
            locker.close()
        with database(sqlite_url) as db:
            assert await db.agent(agent_id) is None
            async with running_controller(settings):
                async with asyncio.timeout(10):
                    reply = decode(RegisterReply, await pending)
                assert reply.agent is not None
                assert reply.agent.agent_id == agent_id
                assert await db.agent(agent_id) is not None
