"""broker_config/: Mosquitto's accounts and ACLs, and amqtt's keepalive enforcement.

The Mosquitto tests run the committed ``broker_config/mosquitto/mosquitto.conf``
and its ACL files as they are, started by its ``entrypoint.sh`` as in
compose.yaml; only ports and paths are rewritten for a temporary directory, and
the agents' password file is made here with ``mosquitto_passwd``.

MQTT 3.1.1 gives a client no sign that the broker refused a publish (it still
gets its PUBACK) or a subscription (Mosquitto grants it and then delivers
nothing). So every "cannot" below is shown by ordering: the refused action comes
first, then an allowed one, and a receiver that sees the allowed message without
the refused one before it proves the refusal, with no waiting on a guess.
"""

import asyncio
import getpass
import os
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiomqtt
import pytest
import yaml

from kbbus import broker as embedded
from schemas.bus import BusClient
from tests.support.infra import BrokerHandle, free_port, missing, port_open
from tests.support.wait import wait_until

CONFIG_DIR = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto"
ROOT = "kbbus/v1"
AGENT_A = str(uuid.uuid4())
AGENT_B = str(uuid.uuid4())
CONTROLLER = "kbbus-controller"
BRIDGE = "kbbus-bridge"
OPERATOR = "kbbus-operator"
AGENT_ACCOUNTS = [AGENT_A, AGENT_B]
SERVICE_ACCOUNTS = [CONTROLLER, BRIDGE, OPERATOR]
DELIVERY_TIMEOUT_S = 5.0


def password(account: str) -> str:
    # URL-unsafe characters on purpose: they must survive mqtt://user:pw@host.
    return f"s3cret/{account}@x"


def agent_topic(agent_id: str, channel: str) -> str:
    return f"{ROOT}/agents/{agent_id}/{channel}"


# --- a Mosquitto run from the committed configuration ----------------------------


@dataclass
class SecuredMosquitto:
    agents_port: int
    services_port: int
    host: str = "127.0.0.1"

    def agent(self, agent_id: str, *, identifier: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.agents_port,
            username=agent_id,
            password=password(agent_id),
            identifier=identifier or agent_id,
        )

    def service(self, account: str, *, identifier: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.services_port,
            username=account,
            password=password(account),
            identifier=identifier or f"{account}-{uuid.uuid4().hex[:8]}",
        )


def deployable_config(agents_port: int, services_port: int, data_dir: Path) -> str:
    """The committed mosquitto.conf with test ports and paths swapped in."""
    text = (CONFIG_DIR / "mosquitto.conf").read_text()
    replacements = {
        "listener 1883\n": f"listener {agents_port} 127.0.0.1\n",
        "listener 1884\n": f"listener {services_port} 127.0.0.1\n",
        "/mosquitto/config/": f"{CONFIG_DIR}/",
        "/mosquitto/data/": f"{data_dir}/",
    }
    for old, new in replacements.items():
        # A layout change in the committed file must fail here, not silently
        # leave the test running some other configuration.
        assert old in text, f"mosquitto.conf no longer contains {old!r}"
        text = text.replace(old, new)
    # Started as root, Mosquitto would drop to the "mosquitto" user, which cannot
    # read our temporary directory.
    return text + f"user {getpass.getuser()}\n"


def make_password_file(path: Path, accounts: list[str]) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        missing("mosquitto_passwd is not installed (apt-get install mosquitto)")
        return
    path.touch(mode=0o600)
    for account in accounts:
        subprocess.run([tool, "-b", str(path), account, password(account)], check=True)


@pytest.fixture
def secured_mosquitto(tmp_path: Path) -> Iterator[SecuredMosquitto]:
    """Mosquitto started the way compose.yaml starts it: through entrypoint.sh."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        missing("mosquitto is not installed (apt-get install mosquitto)")
        return
    config_dir, data_dir = tmp_path / "config", tmp_path / "data"
    config_dir.mkdir()
    data_dir.mkdir()
    # Agents' accounts are the operator's to add; the entrypoint keeps them and
    # writes the services' accounts from the environment.
    make_password_file(data_dir / "agents.passwd", AGENT_ACCOUNTS)
    broker = SecuredMosquitto(agents_port=free_port(), services_port=free_port())
    (config_dir / "mosquitto.conf").write_text(
        deployable_config(broker.agents_port, broker.services_port, data_dir)
    )
    env = {
        "PATH": f"{Path(binary).parent}:{os.environ.get('PATH', '')}",
        "MOSQUITTO_CONFIG_DIR": str(config_dir),
        "MOSQUITTO_DATA_DIR": str(data_dir),
        "KBBUS_MQTT_CONTROLLER_PASSWORD": password(CONTROLLER),
        "KBBUS_MQTT_BRIDGE_PASSWORD": password(BRIDGE),
        "KBBUS_MQTT_OPERATOR_PASSWORD": password(OPERATOR),
    }
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["sh", str(CONFIG_DIR / "entrypoint.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (
                proc.poll() is not None
                or (port_open(broker.agents_port) and port_open(broker.services_port))
            ),
            timeout_s=10,
            what="mosquitto listening on both listeners",
        )
        assert proc.poll() is None, log_path.read_text()
        yield broker
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# --- agents ------------------------------------------------------------------------


async def test_agent_reads_only_its_own_task_and_replies(
    secured_mosquitto: SecuredMosquitto,
) -> None:
    broker = secured_mosquitto
    async with broker.service(CONTROLLER) as controller:
        for agent_id in (AGENT_A, AGENT_B):
            task = f"task-for-{agent_id}".encode()
            await controller.publish(agent_topic(agent_id, "tasks"), task, 1, True)
        async with broker.agent(AGENT_A) as agent:
            # B's topics first: anything they let through would arrive first.
            for topic in (
                agent_topic(AGENT_B, "tasks"),
                f"{ROOT}/replies/{AGENT_B}",
                f"{ROOT}/agents/+/tasks",
                agent_topic(AGENT_A, "tasks"),
                f"{ROOT}/replies/{AGENT_A}",
            ):
                await agent.subscribe(topic, qos=1)
            retained = await received(agent, 2)
            await controller.publish(agent_topic(AGENT_B, "tasks"), b"b2", 1, True)
            await controller.publish(f"{ROOT}/replies/{AGENT_B}", b"for-b", 1)
            await controller.publish(f"{ROOT}/replies/{AGENT_A}", b"for-a", 1)
            live = await received(agent, 1)

    # Once for the wildcard, once for its own topic: both A's task, never B's.
    own_task = (agent_topic(AGENT_A, "tasks"), f"task-for-{AGENT_A}".encode())
    assert retained == [own_task, own_task]
    assert live == [(f"{ROOT}/replies/{AGENT_A}", b"for-a")]


async def test_agent_publishes_only_on_its_own_topics(
    secured_mosquitto: SecuredMosquitto,
) -> None:
    broker = secured_mosquitto
    refused = [
        agent_topic(AGENT_B, "status"),
        agent_topic(AGENT_B, "heartbeat"),
        agent_topic(AGENT_B, "results"),
        agent_topic(AGENT_B, "tasks"),
        agent_topic(AGENT_A, "tasks"),  # tasks come from the controller only
        f"{ROOT}/rpc/trigger",
        f"{ROOT}/replies/{AGENT_B}",
        f"{ROOT}/events/agents/{AGENT_A}/agent.online",
    ]
    allowed = [
        agent_topic(AGENT_A, "status"),
        agent_topic(AGENT_A, "heartbeat"),
        agent_topic(AGENT_A, "results"),
        f"{ROOT}/rpc/register",
        f"{ROOT}/rpc/heartbeat",
    ]
    async with broker.service(CONTROLLER) as controller:
        await controller.subscribe(f"{ROOT}/#", qos=1)
        async with broker.agent(AGENT_A) as agent:
            # Each QoS 1 publish returns after the broker has routed (or
            # dropped) it, so the refused ones are settled before the first
            # allowed one is sent.
            for topic in [*refused, *allowed]:
                await agent.publish(topic, b"from-a", qos=1)
            seen = await received(controller, len(allowed), until=allowed[-1])

    assert [topic for topic, _ in seen] == allowed


async def test_agent_cannot_borrow_another_agents_client_id(
    secured_mosquitto: SecuredMosquitto,
) -> None:
    broker = secured_mosquitto
    async with broker.service(CONTROLLER) as controller:
        await controller.subscribe(f"{ROOT}/agents/+/status", qos=1)
        await controller.publish(agent_topic(AGENT_B, "tasks"), b"b-task", 1, True)
        await controller.publish(agent_topic(AGENT_A, "tasks"), b"a-task", 1, True)
        # Authenticated as A, claiming to be B: the broker makes the client id A.
        async with broker.agent(AGENT_A, identifier=AGENT_B) as impostor:
            await impostor.subscribe(agent_topic(AGENT_B, "tasks"), qos=1)
            await impostor.subscribe(agent_topic(AGENT_A, "tasks"), qos=1)
            tasks = await received(impostor, 1)
            await impostor.publish(agent_topic(AGENT_B, "status"), b"b-off", qos=1)
            await impostor.publish(agent_topic(AGENT_A, "status"), b"a-on", qos=1)
            statuses = await received(controller, 1)

    assert tasks == [(agent_topic(AGENT_A, "tasks"), b"a-task")]
    assert statuses == [(agent_topic(AGENT_A, "status"), b"a-on")]


# --- authentication ------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "username", "secret"),
    [
        ("agents", None, None),
        ("services", None, None),
        ("agents", AGENT_A, "wrong"),
        ("services", CONTROLLER, "wrong"),
        # Each listener has its own password file.
        ("agents", CONTROLLER, password(CONTROLLER)),
        ("services", AGENT_A, password(AGENT_A)),
    ],
)
async def test_broker_refuses_clients_without_valid_credentials(
    secured_mosquitto: SecuredMosquitto,
    listener: str,
    username: str | None,
    secret: str | None,
) -> None:
    broker = secured_mosquitto
    port = broker.agents_port if listener == "agents" else broker.services_port
    client = aiomqtt.Client(
        broker.host, port, username=username, password=secret, identifier=AGENT_A
    )
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with client:
            pass


async def test_bus_client_logs_in_with_the_credentials_in_its_url(
    secured_mosquitto: SecuredMosquitto,
) -> None:
    """How compose.yaml hands the bridge and the controller their accounts."""
    broker = secured_mosquitto
    secret = quote(password(BRIDGE), safe="")
    url = f"mqtt://{BRIDGE}:{secret}@{broker.host}:{broker.services_port}"
    heartbeat = agent_topic(AGENT_A, "heartbeat")
    async with broker.service(CONTROLLER) as controller:
        await controller.subscribe(heartbeat, qos=1)
        async with BusClient(url, "kbbus-bridge-test") as bridge:
            await bridge.publish(heartbeat, b"via-http", qos=1)
        assert await received(controller, 1) == [(heartbeat, b"via-http")]


# --- operator ------------------------------------------------------------------


async def test_operator_reads_the_fleet_and_writes_nothing(
    secured_mosquitto: SecuredMosquitto,
) -> None:
    broker = secured_mosquitto
    async with broker.service(CONTROLLER) as controller:
        await controller.subscribe(f"{ROOT}/#", qos=1)
        async with broker.agent(AGENT_A) as agent:
            await agent.publish(agent_topic(AGENT_A, "status"), b"online", 1, True)
        assert await received(controller, 1) == [
            (agent_topic(AGENT_A, "status"), b"online")
        ]
        # Even with an agent's id as client id, the services listener has no
        # pattern lines to lend the operator that agent's rights.
        async with broker.service(OPERATOR, identifier=AGENT_A) as operator:
            await operator.subscribe(f"{ROOT}/agents/+/status", qos=1)
            fleet = await received(operator, 1)
            for topic in (
                agent_topic(AGENT_A, "status"),
                agent_topic(AGENT_A, "tasks"),
                agent_topic(AGENT_A, "results"),
                f"{ROOT}/rpc/trigger",
                f"{ROOT}/events/agents/{AGENT_A}/agent.offline",
            ):
                await operator.publish(topic, b"operator-was-here", 1, True)
        marker = f"{ROOT}/events/test/marker"
        await controller.publish(marker, b"end", qos=1)
        seen = await received(controller, until=marker)

    assert fleet == [(agent_topic(AGENT_A, "status"), b"online")]
    assert seen == [(marker, b"end")]


# --- amqtt keepalive enforcement -------------------------------------------------

KEEPALIVE_S = 2
# Scheduling slack on a loaded two-core machine.
TOLERANCE_S = 1.0
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _field(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def connect_packet(
    client_id: str, keepalive_s: int, will_topic: str, will_payload: bytes
) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, Will at QoS 1, not retained."""
    clean_session, will_flag, will_qos1 = 0x02, 0x04, 0x08
    variable = (
        _field(b"MQTT")
        + bytes([4, clean_session | will_flag | will_qos1])
        + struct.pack("!H", keepalive_s)
    )
    payload = (
        _field(client_id.encode()) + _field(will_topic.encode()) + _field(will_payload)
    )
    body = variable + payload
    return b"\x10" + _remaining_length(len(body)) + body


@asynccontextmanager
async def raw_client(
    broker: BrokerHandle, client_id: str, will_topic: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connected socket that sends only what the test tells it to."""
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    try:
        writer.write(connect_packet(client_id, KEEPALIVE_S, will_topic, b"gone"))
        await writer.drain()
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            assert await reader.readexactly(4) == CONNACK_ACCEPTED
        yield reader, writer
        if not reader.at_eof():
            # A DISCONNECT, and its EOF back, settle the connection before the
            # broker stops; amqtt leaks the socket of a client it is still
            # reading when it shuts down.
            writer.write(DISCONNECT)
            await writer.drain()
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                assert await reader.read() == b""
    finally:
        writer.close()
        # The broker may have closed its side already.
        with suppress(OSError):
            await writer.wait_closed()


async def test_amqtt_publishes_the_will_of_a_frozen_client(
    amqtt_broker: BrokerHandle,
) -> None:
    will_topic = f"kbbus-test/will/{uuid.uuid4().hex}"
    async with aiomqtt.Client(
        amqtt_broker.host, amqtt_broker.port, identifier="watcher"
    ) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        async with raw_client(amqtt_broker, "frozen", will_topic) as (reader, _):
            connected_at = time.monotonic()
            # The client now says nothing at all, with its socket open.
            will = await received(watcher, 1)
            elapsed_s = time.monotonic() - connected_at
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                assert await reader.read() == b"", "the broker kept the socket open"

    assert will == [(will_topic, b"gone")]
    assert KEEPALIVE_S <= elapsed_s <= 1.5 * KEEPALIVE_S + TOLERANCE_S


async def test_amqtt_keeps_a_client_that_pings(amqtt_broker: BrokerHandle) -> None:
    will_topic = f"kbbus-test/will/{uuid.uuid4().hex}"
    async with aiomqtt.Client(
        amqtt_broker.host, amqtt_broker.port, identifier="watcher"
    ) as watcher:
        await watcher.subscribe(will_topic, qos=1)
        async with raw_client(amqtt_broker, "pinger", will_topic) as (reader, writer):
            # Ping at half the keepalive until well past the 1.5 x keepalive
            # deadline: a connection dropped in between fails the next read.
            interval_s = KEEPALIVE_S / 2
            pings = int(1.5 * KEEPALIVE_S / interval_s) + 1
            for _ in range(pings):
                # The client's own ping schedule, not a wait for a condition.
                await asyncio.sleep(interval_s)
                writer.write(PINGREQ)
                await writer.drain()
                async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                    assert await reader.readexactly(2) == PINGRESP
            # A Will fired at any point would reach the watcher before this.
            await watcher.publish(will_topic, b"still-here", qos=1)
            first = await received(watcher, 1)

    assert first == [(will_topic, b"still-here")]


def test_embedded_broker_defaults_match_amqtt_yaml() -> None:
    """An installed kbbus without broker_config/ falls back to the same settings."""
    assert yaml.safe_load(embedded.CONFIG_FILE.read_text()) == embedded.DEFAULT_CONFIG
