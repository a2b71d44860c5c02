"""Agents and presence against a real broker and database (each kind of both)."""

import asyncio
import signal
import sys
import time
import uuid

import httpx

from schemas import encode
from schemas.messages import (
    AgentState,
    AgentStatus,
    HeartbeatReply,
    HeartbeatRequest,
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

# How often the broker looks for silent clients. Mosquitto 2.0.11 (the Debian
# and Ubuntu package) runs its keepalive check once every 5 s, so its Wills
# come up to 5 s after the 1.5 x keepalive deadline; amqtt (kbbus.broker)
# watches each connection itself.
KEEPALIVE_CHECK_S = {"amqtt": 0.0, "mosquitto": 5.0}


def new_id() -> str:
    return str(uuid.uuid4())


async def publish_status(
    b: Bus, agent_id: str, state: AgentState, epoch: int, reason: str
) -> None:
    status = AgentStatus(agent_id=agent_id, state=state, epoch=epoch, reason=reason)
    await b.client.publish(
        b.topics.status(agent_id), encode(status), qos=1, retain=True
    )


async def test_register_over_mqtt_keeps_the_agents_id(
    broker: BrokerHandle, db_url: str
) -> None:
    agent_id = new_id()
    with database(db_url) as db:
        async with (
            running_controller(controller_settings(broker, db_url)),
            bus(broker) as b,
        ):
            agent = await b.register("alpha", agent_id=agent_id, os="linux")
            assert agent.agent_id == agent_id
            assert agent.status == "online"
            again = await b.register("alpha-renamed", agent_id=agent_id)
            assert again.agent_id == agent_id
            row = await db.agent(agent_id)
            assert row is not None
            assert row.hostname == "alpha-renamed"
            assert await db.count() == 1
            # The whole fleet is listed by the retained status topics.
            await eventually(
                lambda: agent_id in b.statuses,
                what="retained status",
            )
            assert b.statuses[agent_id].state is AgentState.ONLINE
            await eventually(
                lambda: b.events_of("agent.registered", agent_id),
                what="registered event",
            )


async def test_register_without_an_id_issues_one(
    broker: BrokerHandle, db_url: str
) -> None:
    """What the HTTP bridge sends for an HTTP agent."""
    async with (
        running_controller(controller_settings(broker, db_url)),
        bus(broker) as b,
    ):
        first = await b.register("http-agent", ip_address="10.0.0.5")
        second = await b.register("http-agent", ip_address="10.0.0.5")
        assert first.agent_id != second.agent_id
        assert uuid.UUID(first.agent_id).version == 4


async def test_heartbeats_update_last_seen_at(
    broker: BrokerHandle, db_url: str
) -> None:
    with database(db_url) as db:
        async with (
            running_controller(controller_settings(broker, db_url)) as rig,
            bus(broker) as b,
        ):
            agent = await b.register("beating", agent_id=new_id())
            before = await db.agent(agent.agent_id)
            assert before is not None
            assert before.last_seen_at is not None
            since = before.last_seen_at
            beat = (
                b'{"v":1,"agent_id":"%s","seq":1,"metrics":{"cpu":0.5}}'
                % agent.agent_id.encode()
            )
            for _ in range(20):
                await b.client.publish(b.topics.heartbeat(agent.agent_id), beat)

            async def advanced() -> bool:
                row = await db.agent(agent.agent_id)
                assert row is not None
                assert row.last_seen_at is not None
                return bool(row.last_seen_at > since)

            await async_wait_until(advanced, timeout_s=5, what="last_seen_at moved")
            # Twenty messages from one agent, coalesced into few writes.
            await eventually(
                lambda: rig.metrics.value("kbbus_heartbeat_messages_total") == 20,
                what="all heartbeats seen",
            )
            assert 1 <= rig.metrics.value("kbbus_heartbeats_ingested_total") < 20


async def test_sigkilled_agent_is_offline_within_a_second(
    broker: BrokerHandle, db_url: str
) -> None:
    agent_id = new_id()
    with database(db_url) as db:
        async with (
            running_controller(controller_settings(broker, db_url)),
            bus(broker) as b,
        ):
            agent = await AgentProcess.start(broker, agent_id)
            try:
                await db.wait_connected(agent_id, agent.epoch, timeout_s=5)
                killed_at = time.monotonic()
                agent.proc.send_signal(signal.SIGKILL)
                await db.wait_status(agent_id, "offline", timeout_s=1.0)
                assert time.monotonic() - killed_at < 1.0
                await eventually(
                    lambda: b.events_of("agent.offline", agent_id),
                    timeout_s=2,
                    what="offline event",
                )
                assert b.events_of("agent.offline", agent_id)[0].data["reason"] == (
                    "will"
                )
            finally:
                await agent.stop()


async def test_frozen_agent_is_offline_through_its_will(
    broker: BrokerHandle, db_url: str
) -> None:
    """SIGSTOP: the socket stays open, nothing is sent; the broker gives up on
    the connection after 1.5 x keepalive and publishes the Will."""
    keepalive_s = 1
    agent_id = new_id()
    with database(db_url) as db:
        # The timer must not be what marks it offline here.
        settings = controller_settings(broker, db_url, offline_after_s=60)
        async with running_controller(settings):
            agent = await AgentProcess.start(
                broker, agent_id, keepalive_s=keepalive_s, heartbeat_s=0.2
            )
            try:
                await db.wait_connected(agent_id, agent.epoch, timeout_s=5)
                frozen_at = time.monotonic()
                agent.proc.send_signal(signal.SIGSTOP)
                limit_s = 1.5 * keepalive_s + 1 + KEEPALIVE_CHECK_S[broker.kind]
                await db.wait_status(agent_id, "offline", timeout_s=limit_s + 1)
                assert time.monotonic() - frozen_at <= limit_s
            finally:
                agent.proc.send_signal(signal.SIGCONT)
                await agent.stop()


async def test_http_only_agent_is_offline_after_the_sweep(
    broker: BrokerHandle, db_url: str
) -> None:
    offline_after_s, sweep_interval_s = 1.0, 0.25
    settings = controller_settings(
        broker,
        db_url,
        offline_after_s=offline_after_s,
        sweep_interval_s=sweep_interval_s,
    )
    with database(db_url) as db:
        async with running_controller(settings), bus(broker) as b:
            agent = await b.register("http-only")
            request = b.new_request(HeartbeatRequest, agent_id=agent.agent_id)
            reply = await b.request(RpcMethod.HEARTBEAT, request, HeartbeatReply)
            assert reply.error is None
            last_heartbeat = time.monotonic()
            row = await db.agent(agent.agent_id)
            assert row is not None
            assert row.status == "online"
            limit_s = offline_after_s + sweep_interval_s
            await db.wait_status(agent.agent_id, "offline", timeout_s=limit_s + 2)
            took = time.monotonic() - last_heartbeat
            assert offline_after_s <= took <= limit_s + 0.3
            # The timer publishes the retained status an HTTP agent cannot.
            await eventually(
                lambda: (
                    agent.agent_id in b.statuses
                    and b.statuses[agent.agent_id].state is AgentState.OFFLINE
                ),
                what="retained offline status",
            )
            assert b.statuses[agent.agent_id].reason == "timeout"
            # A heartbeat brings it back.
            request = b.new_request(HeartbeatRequest, agent_id=agent.agent_id)
            await b.request(RpcMethod.HEARTBEAT, request, HeartbeatReply)
            await db.wait_status(agent.agent_id, "online", timeout_s=2)


async def test_heartbeat_request_for_unknown_agent_is_not_found(
    broker: BrokerHandle, db_url: str
) -> None:
    async with (
        running_controller(controller_settings(broker, db_url)),
        bus(broker) as b,
    ):
        request = b.new_request(HeartbeatRequest, agent_id="this-is-a-fake-id")
        reply = await b.request(RpcMethod.HEARTBEAT, request, HeartbeatReply)
        assert reply.error is not None
        assert reply.error.code == "not_found"


async def test_stale_will_after_a_reconnect_is_ignored(
    broker: BrokerHandle, db_url: str
) -> None:
    agent_id = new_id()
    with database(db_url) as db:
        async with (
            running_controller(controller_settings(broker, db_url)),
            bus(broker) as b,
        ):
            await b.register("flappy", agent_id=agent_id)
            await publish_status(b, agent_id, AgentState.ONLINE, 1000, "connect")
            await publish_status(b, agent_id, AgentState.ONLINE, 2000, "connect")

            async def epoch_is(value: int) -> bool:
                row = await db.agent(agent_id)
                return row is not None and row.epoch == value

            await async_wait_until(lambda: epoch_is(2000), what="epoch 2000")
            # The first connection's Will, delivered after the reconnect.
            await publish_status(b, agent_id, AgentState.OFFLINE, 1000, "will")
            # A marker after it on the same path: once the controller has
            # applied the marker, it has seen (and ignored) the stale Will.
            marker = new_id()
            await b.register("marker", agent_id=marker)
            await publish_status(b, marker, AgentState.ONLINE, 5, "connect")

            async def marker_applied() -> bool:
                row = await db.agent(marker)
                return row is not None and row.epoch == 5

            await async_wait_until(marker_applied, what="marker status applied")
            row = await db.agent(agent_id)
            assert row is not None
            assert (row.status, row.epoch) == ("online", 2000)
            # The Will of the current connection does take it offline.
            await publish_status(b, agent_id, AgentState.OFFLINE, 2000, "will")
            await db.wait_status(agent_id, "offline", timeout_s=3)


async def test_subprocess_agent_reconnect_with_new_epoch(
    broker: BrokerHandle, db_url: str
) -> None:
    """A real agent restarts: the new connection's epoch is kept, and a clean
    shutdown says offline at once."""
    agent_id = new_id()
    with database(db_url) as db:
        async with running_controller(controller_settings(broker, db_url)):
            first = await AgentProcess.start(broker, agent_id)
            await db.wait_connected(agent_id, first.epoch, timeout_s=5)
            first.proc.send_signal(signal.SIGTERM)
            assert await first.proc.wait() == 0
            await db.wait_status(agent_id, "offline", timeout_s=2)
            second = await AgentProcess.start(broker, agent_id)
            try:
                assert second.epoch > first.epoch

                async def back_online() -> bool:
                    row = await db.agent(agent_id)
                    return row is not None and (row.status, row.epoch) == (
                        "online",
                        second.epoch,
                    )

                await async_wait_until(back_online, timeout_s=5, what="reconnected")
            finally:
                await second.stop()


async def test_http_agent_through_the_bridge(broker: BrokerHandle, db_url: str) -> None:
    """Register and heartbeat over real HTTP (the bridge as its own process),
    then stop: the sweep marks the agent offline."""
    http_port = free_port()
    settings = controller_settings(
        broker, db_url, offline_after_s=1.0, sweep_interval_s=0.25
    )
    async with running_controller(settings):
        bridge = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge_http",
            "--mqtt-url",
            broker.url,
            "--port",
            str(http_port),
            cwd=REPO,
            stderr=asyncio.subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{http_port}/api/v1"
        try:
            await eventually(
                lambda: port_open(http_port), timeout_s=20, what="bridge listening"
            )
            async with httpx.AsyncClient(timeout=10) as http:
                created = await http.post(
                    f"{base}/agent/register",
                    json={"hostname": "web-1", "ip_address": "10.0.0.7", "os": "linux"},
                )
                assert created.status_code == 201, created.text
                agent_id = created.json()["agent_id"]
                beat = await http.post(
                    f"{base}/agent/heartbeat", json={"agent_id": agent_id}
                )
                assert beat.status_code == 200, beat.text
                fake = await http.post(
                    f"{base}/agent/heartbeat", json={"agent_id": "this-is-a-fake-id"}
                )
                assert fake.status_code == 404
                agent = (await http.get(f"{base}/agents/{agent_id}")).json()
                assert agent["status"] == "online"
                assert agent["last_seen_at"] is not None

                async def offline() -> bool:
                    view = (await http.get(f"{base}/agents/{agent_id}")).json()
                    return bool(view["status"] == "offline")

                await async_wait_until(offline, timeout_s=4, what="offline over HTTP")
        finally:
            bridge.terminate()
            await bridge.wait()
