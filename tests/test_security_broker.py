"""Broker accounts, topic rules and TLS, on amqtt and on Mosquitto.

Both brokers run with the same accounts (tests/support/secure.py): amqtt with
``kbbus.broker_auth``, Mosquitto with its dynamic-security plugin. As in
tests/test_broker_config.py, every "cannot" is shown by ordering, since MQTT
3.1.1 does not tell a client its publish was dropped: the refused action comes
first, an allowed one after it, and a receiver that sees the allowed message
with nothing before it proves the refusal.
"""

import asyncio
import gc
import ssl
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from schemas.access import (
    BRIDGE_USERNAME,
    CONTROLLER_USERNAME,
    ENROL_USERNAME,
    OPERATOR_USERNAME,
    enrol_reply_topic,
    mqtt_password,
)
from schemas.bus import BusClient
from tests.support.secure import ROOT, SecuredBroker, make_test_ca, secured_broker

DELIVERY_TIMEOUT_S = 5.0


@pytest.fixture(params=["amqtt", "mosquitto"])
def secure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecuredBroker]:
    with secured_broker(request.param, tmp_path) as broker:
        yield broker


def agent_topic(agent_id: str, channel: str) -> str:
    return f"{ROOT}/agents/{agent_id}/{channel}"


async def received(
    client: aiomqtt.Client, count: int | None = None, *, until: str | None = None
) -> list[tuple[str, bytes]]:
    """The next ``count`` messages, or all up to the first on topic ``until``."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(DELIVERY_TIMEOUT_S):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append((message.topic.value, message.payload))
            if len(got) == count or message.topic.value == until:
                break
    return got


def controller(broker: SecuredBroker) -> aiomqtt.Client:
    return broker.client(
        broker.service_url(CONTROLLER_USERNAME), f"controller-{uuid.uuid4().hex[:6]}"
    )


# --- authentication ---------------------------------------------------------------


async def test_clients_without_valid_credentials_cannot_connect(
    secure: SecuredBroker,
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await secure.provision(a, b)
    refused = [
        (secure.anonymous_url, a),
        (secure.url(a, "wrong"), a),
        (secure.url(a, mqtt_password(secure.agent_secret, b)), a),  # B's password
        (secure.url(CONTROLLER_USERNAME, "wrong"), "c-1"),
        (secure.url(OPERATOR_USERNAME, secure.passwords[BRIDGE_USERNAME]), "o-1"),
        (secure.url(ENROL_USERNAME, "not-the-token"), f"kbbus-enrol-{uuid.uuid4()}"),
    ]
    for url, identifier in refused:
        with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
            async with secure.client(url, identifier):
                pass
    # The same agent account is accepted only under its own client id.
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with secure.client(secure.agent_url(a), b):
            pass
    async with secure.client(secure.agent_url(a), a):
        pass


async def test_a_refused_client_does_not_disconnect_the_agent_it_claims_to_be(
    secure: SecuredBroker,
) -> None:
    """amqtt took over a connected session before asking for credentials."""
    a = str(uuid.uuid4())
    await secure.provision(a)
    async with controller(secure) as ctl, secure.client(secure.agent_url(a), a) as ag:
        await ag.subscribe(agent_topic(a, "tasks"), qos=1)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with secure.client(secure.anonymous_url, a):
                pass
        await ctl.publish(agent_topic(a, "tasks"), b"still-yours", qos=1)
        assert await received(ag, 1) == [(agent_topic(a, "tasks"), b"still-yours")]


# --- agents ------------------------------------------------------------------------


async def test_agent_reads_only_its_own_tasks_and_replies(
    secure: SecuredBroker,
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await secure.provision(a, b)
    async with controller(secure) as ctl:
        # A subscription to every agent's tasks, so amqtt would hand a new
        # client those retained messages at connect (its leak).
        await ctl.subscribe(f"{ROOT}/agents/+/tasks", qos=1)
        for agent_id in (b, a):
            task = f"task-for-{agent_id}".encode()
            await ctl.publish(agent_topic(agent_id, "tasks"), task, 1, True)
        async with secure.client(secure.agent_url(a), a) as agent:
            for topic in (
                agent_topic(b, "tasks"),
                f"{ROOT}/replies/{b}",
                f"{ROOT}/agents/+/tasks",
                f"{ROOT}/#",
                agent_topic(a, "tasks"),
            ):
                await agent.subscribe(topic, qos=1)
            await ctl.publish(agent_topic(b, "tasks"), b"b2", 1, True)
            await ctl.publish(f"{ROOT}/replies/{b}", b"for-b", 1)
            await agent.subscribe(f"{ROOT}/replies/{a}", qos=1)
            await ctl.publish(f"{ROOT}/replies/{a}", b"for-a", 1)
            seen = await received(agent, until=f"{ROOT}/replies/{a}")

    # A's own task (amqtt may send it twice: at connect and on subscribing),
    # then the marker; never anything of B's.
    own_task = (agent_topic(a, "tasks"), f"task-for-{a}".encode())
    assert own_task in seen
    assert set(seen) == {own_task, (f"{ROOT}/replies/{a}", b"for-a")}


async def test_agent_publishes_only_on_its_own_topics(secure: SecuredBroker) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await secure.provision(a, b)
    refused = [
        agent_topic(b, "status"),
        agent_topic(b, "heartbeat"),
        agent_topic(b, "results"),
        agent_topic(b, "tasks"),
        agent_topic(a, "tasks"),  # tasks come from the controller only
        f"{ROOT}/rpc/trigger",
        f"{ROOT}/rpc/cancel",
        f"{ROOT}/replies/{b}",
        f"{ROOT}/events/agents/{a}/agent.online",
        f"{ROOT}/controller/keys",
    ]
    allowed = [
        agent_topic(a, "status"),
        agent_topic(a, "heartbeat"),
        agent_topic(a, "results"),
        f"{ROOT}/rpc/register",
        f"{ROOT}/rpc/heartbeat",
    ]
    async with controller(secure) as ctl:
        await ctl.subscribe(f"{ROOT}/#", qos=1)
        async with secure.client(secure.agent_url(a), a) as agent:
            for topic in [*refused, *allowed]:
                # amqtt may close the connection of a refused publish; the
                # broker has handled each before the next is sent (QoS 1).
                await agent.publish(topic, b"from-a", qos=1)
            seen = await received(ctl, len(allowed), until=allowed[-1])

    assert [topic for topic, _ in seen] == allowed


async def test_agent_will_cannot_name_another_agent(secure: SecuredBroker) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await secure.provision(a, b)
    will = aiomqtt.Will(agent_topic(b, "status"), b"forged-offline", qos=1)
    client = aiomqtt.Client(
        secure.host,
        secure.port,
        identifier=a,
        username=a,
        password=mqtt_password(secure.agent_secret, a),
        will=will,
    )
    if secure.kind == "amqtt":
        # Refused at CONNECT.
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client:
                pass
        return
    # Mosquitto accepts the connection and checks the Will when it fires: a
    # real client (mosquitto_sub) is SIGKILLed, and nothing may reach B's
    # status before a marker.
    tasks = agent_topic(a, "tasks")
    async with controller(secure) as ctl:
        await ctl.subscribe(f"{ROOT}/agents/+/status", qos=1)
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            *("-h", secure.host, "-p", str(secure.port), "-i", a, "-u", a),
            *("-P", mqtt_password(secure.agent_secret, a), "-t", tasks, "-C", "1"),
            *("--will-topic", agent_topic(b, "status"), "--will-payload", "forged"),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            # Connected and subscribed once it prints the retained task.
            await ctl.publish(tasks, b"hello", qos=1, retain=True)
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                assert await proc.stdout.readline() == b"hello\n"
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        async with secure.client(secure.agent_url(a), a) as again:
            await again.publish(agent_topic(a, "status"), b"marker", qos=1)
        seen = await received(ctl, until=agent_topic(a, "status"))
    assert seen == [(agent_topic(a, "status"), b"marker")]


# --- enrolment account ---------------------------------------------------------------


async def test_enrolling_client_reads_only_its_own_reply(secure: SecuredBroker) -> None:
    victim = str(uuid.uuid4())
    me, other = f"kbbus-enrol-{uuid.uuid4().hex}", f"kbbus-enrol-{uuid.uuid4().hex}"
    enrol = secure.client(secure.url(ENROL_USERNAME, secure.enrolment_token), me)
    async with controller(secure) as ctl, enrol as client:
        await ctl.subscribe(f"{ROOT}/rpc/#", qos=1)
        for topic in (
            f"{ROOT}/replies/enrol/+",
            f"{ROOT}/replies/enrol/#",
            f"{ROOT}/replies/+",
            f"{ROOT}/replies/{victim}",
            agent_topic(victim, "tasks"),
            # Mosquitto 2.0's roles cannot name the client's own reply topic
            # (no %c): there the other client's random name is what protects it.
            *([enrol_reply_topic(ROOT, other)] if secure.kind == "amqtt" else []),
        ):
            await client.subscribe(topic, qos=1)
        await client.subscribe(enrol_reply_topic(ROOT, me), qos=1)
        for topic in (
            f"{ROOT}/replies/{victim}",
            enrol_reply_topic(ROOT, other),
            agent_topic(victim, "tasks"),
            enrol_reply_topic(ROOT, me),
        ):
            await ctl.publish(topic, b"reply", qos=1)
        got = await received(client, 1)
        # It may register, and nothing else.
        await client.publish(f"{ROOT}/rpc/trigger", b"t", qos=1)
        await client.publish(agent_topic(victim, "status"), b"s", qos=1)
        await client.publish(f"{ROOT}/rpc/register", b"r", qos=1)
        requests = await received(ctl, 1)

    assert got == [(enrol_reply_topic(ROOT, me), b"reply")]
    assert requests == [(f"{ROOT}/rpc/register", b"r")]


# --- services ------------------------------------------------------------------------


async def test_operator_reads_everything_and_writes_nothing(
    secure: SecuredBroker,
) -> None:
    a = str(uuid.uuid4())
    await secure.provision(a)
    operator = secure.client(secure.service_url(OPERATOR_USERNAME), "operator-1")
    async with controller(secure) as ctl, operator as op:
        await ctl.subscribe(f"{ROOT}/#", qos=1)
        await ctl.publish(agent_topic(a, "status"), b"online", 1, True)
        await op.subscribe(f"{ROOT}/#", qos=1)
        fleet = await received(op, 1)
        for topic in (
            agent_topic(a, "tasks"),
            agent_topic(a, "status"),
            f"{ROOT}/rpc/trigger",
        ):
            await op.publish(topic, b"operator-was-here", qos=1)
        await ctl.publish(f"{ROOT}/events/marker", b"end", qos=1)
        seen = await received(ctl, until=f"{ROOT}/events/marker")

    assert fleet == [(agent_topic(a, "status"), b"online")]
    assert [t for t, _ in seen if t != agent_topic(a, "status")] == [
        f"{ROOT}/events/marker"
    ]


# --- TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_tls_listener_with_the_test_ca(kind: str, tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path)
    with secured_broker(kind, tmp_path, ca=ca) as broker:
        url = broker.service_url(CONTROLLER_USERNAME)
        async with broker.client(url, "tls-ok") as client:
            await client.subscribe(f"{ROOT}/events/x", qos=1)
            await client.publish(f"{ROOT}/events/x", b"over tls", qos=1)
            assert await received(client, 1) == [(f"{ROOT}/events/x", b"over tls")]
        # Without the CA (the system's CAs only) the certificate is refused,
        # and plain MQTT to the TLS port does not get in either.
        await refused(BusClient(url, "tls-no-ca"))
        await refused(BusClient(url.replace("mqtts://", "mqtt://"), "plain", timeout=2))


async def refused(client: BusClient) -> None:
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError)):
        await asyncio.wait_for(client.__aenter__(), DELIVERY_TIMEOUT_S)
    # paho leaves the socket of a failed TLS handshake open; collect it here
    # rather than as an unraisable warning in a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del client
        gc.collect()
