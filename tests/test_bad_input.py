"""Bad input on every topic the controller reads: refused, counted, survived.

The controller runs as a process of its own with ``--metrics-port``; the test
publishes malformed, mistyped, incomplete, future-versioned, oversized,
misaddressed, foreign and replayed messages on ``agents/+/status``,
``agents/+/heartbeat``, ``agents/+/results`` and ``rpc/*``, then reads the
rejection counters over HTTP: each message is counted once, under its reason,
and valid traffic still flows. The flood test sends thousands from one client
while a real workflow runs, and checks the controller's memory afterwards.
"""

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.store import upgrade
from kbbus.stack import Process
from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentState,
    AgentStatus,
    ErrorCode,
    Heartbeat,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
    Request,
    ResultStatus,
    TaskResult,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import AgentChannel, RpcMethod, Topics
from tests.support.controller_rig import Bus, bus
from tests.support.infra import BrokerHandle, free_port
from tests.support.system import (
    Audit,
    Children,
    agents_process,
    controller_answers,
    controller_process,
    trigger,
    write_kbs,
)
from tests.support.wait import async_wait_until

T = Topics()
OVERSIZED = b'{"v":1,"pad":"' + b"x" * (300 * 1024) + b'"}'
# Nested 20,000 deep, well under the size limit: must not crash a parser.
DEEP = b'{"v":1,"agent_id":"a","params":' + b"[" * 20_000 + b"]" * 20_000 + b"}"

Case = tuple[str, bytes, str, str]  # topic, payload, reason, channel


class ControllerMetrics:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    async def read(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient() as http:
            text = (await http.get(self.url)).text
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = sample.value
        return values

    async def rejected(self) -> collections.Counter[tuple[str, str]]:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for (name, labels), value in (await self.read()).items():
            if name == "kbbus_messages_rejected_total" and value:
                label = dict(labels)
                counts[(label["reason"], label["channel"])] = int(value)
        return counts

    async def value(self, name: str) -> float:
        return (await self.read()).get((name, ()), 0.0)

    async def wait_rejected(
        self, expected: collections.Counter[tuple[str, str]], timeout_s: float = 20
    ) -> collections.Counter[tuple[str, str]]:
        async def counted() -> collections.Counter[tuple[str, str]]:
            got = await self.rejected()
            if all(got[k] >= n for k, n in expected.items()):
                return got
            return collections.Counter()

        try:
            return await async_wait_until(
                counted, timeout_s=timeout_s, what="rejections counted"
            )
        except AssertionError:
            raise AssertionError(
                f"expected {dict(expected)}, counted {dict(await self.rejected())}"
            ) from None


@pytest.fixture
def migrated(db_url: str) -> str:
    upgrade(db_url)
    return db_url


@contextlib.asynccontextmanager
async def controller_with_metrics(
    broker: BrokerHandle, db_url: str, workdir: Path
) -> AsyncIterator[tuple[Process, ControllerMetrics, Bus]]:
    port = free_port()
    with Children() as children:
        controller = children.start(
            controller_process(
                workdir,
                broker.url,
                db_url,
                client_id=f"kbbus-controller-bad-{uuid.uuid4().hex[:8]}",
                kb_dir=write_kbs(workdir / "kbs"),
                metrics_port=port,
            )
        )
        async with bus(broker) as b:
            await controller_answers(b)
            yield controller, ControllerMetrics(port), b


@contextlib.asynccontextmanager
async def listening(broker: BrokerHandle, *filters: str) -> AsyncIterator[list[str]]:
    """The topics of everything published on ``filters`` while the block runs."""
    seen: list[str] = []
    async with BusClient(broker.url, f"listen-{uuid.uuid4().hex[:8]}") as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def read() -> None:
            async for message in client.messages:
                if not message.retain:
                    seen.append(message.topic.value)

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


def status_cases(known: str, stranger: str) -> list[Case]:
    topic = T.status(known)
    good = AgentStatus(agent_id=known, state=AgentState.ONLINE, epoch=1)
    return [
        (topic, b'{"v":1,"agent_id":', "malformed_json", "status"),
        (topic, b"\x00\x01\x02", "malformed_json", "status"),
        (topic, b"[1, 2]", "schema", "status"),
        (topic, good_with(good, epoch="soon"), "schema", "status"),
        (topic, good_with(good, state="asleep"), "schema", "status"),
        (topic, good_with(good, epoch=-1), "schema", "status"),
        (topic, b'{"v":1,"agent_id":"%s"}' % known.encode(), "schema", "status"),
        (topic, good_with(good, v=2), "version", "status"),
        (topic, good_with(good, v="1"), "version", "status"),
        (topic, OVERSIZED, "oversized", "status"),
        (topic, good_with(good, agent_id="a+b"), "schema", "status"),
        (topic, good_with(good, agent_id="#"), "schema", "status"),
        (topic, good_with(good, agent_id=stranger), "agent_mismatch", "status"),
        (
            T.status(stranger),
            good_with(good, agent_id=stranger),
            "unknown_agent",
            "status",
        ),
        (f"{T.root}/agents/not an id/status", encode(good), "bad_topic", "status"),
    ]


def heartbeat_cases(known: str, stranger: str) -> list[Case]:
    topic = T.heartbeat(known)
    good = Heartbeat(agent_id=known)
    return [
        (topic, b"}{", "malformed_json", "heartbeat"),
        (topic, good_with(good, seq=-5), "schema", "heartbeat"),
        (topic, good_with(good, metrics={"cpu": "high"}), "schema", "heartbeat"),
        (
            topic,
            good_with(good, metrics={f"m{i}": 1.0 for i in range(65)}),
            "schema",
            "heartbeat",
        ),
        (topic, b'{"v":1}', "schema", "heartbeat"),
        (topic, good_with(good, v=2), "version", "heartbeat"),
        (topic, OVERSIZED, "oversized", "heartbeat"),
        (topic, b"", "empty", "heartbeat"),
        (topic, good_with(good, agent_id=stranger), "agent_mismatch", "heartbeat"),
        (
            T.heartbeat(stranger),
            good_with(good, agent_id=stranger),
            "unknown_agent",
            "heartbeat",
        ),
    ]


def result_cases(known: str, other: str, others_task: str) -> list[Case]:
    topic = T.results(known)
    good = TaskResult(agent_id=known, task_id="no-such-task", status="failed")
    return [
        (topic, b"not json at all", "malformed_json", "results"),
        (topic, good_with(good, status="maybe"), "schema", "results"),
        (topic, good_with(good, exit_code="zero"), "schema", "results"),
        (topic, b'{"v":1,"agent_id":"%s"}' % known.encode(), "schema", "results"),
        (topic, good_with(good, v=2), "version", "results"),
        (topic, OVERSIZED, "oversized", "results"),
        (topic, good_with(good, task_id="t/../x"), "schema", "results"),
        (topic, good_with(good, task_id="+"), "schema", "results"),
        (topic, encode(good), "not_found", "results"),
        # Another agent's task, claimed on our own topic under our own name.
        (topic, good_with(good, task_id=others_task), "conflict", "results"),
        # Another agent's task, on its topic but in our name.
        (
            T.results(other),
            good_with(good, task_id=others_task),
            "agent_mismatch",
            "results",
        ),
    ]


def rpc_cases(reply_to: str, known: str) -> list[Case]:
    register = T.rpc(RpcMethod.REGISTER)
    trigger_topic = T.rpc(RpcMethod.TRIGGER)
    good = RegisterRequest(request_id="r", reply_to=reply_to, hostname="h")
    return [
        (register, b"{{{", "malformed_json", "rpc"),
        (register, good_with(good, hostname=7), "schema", "rpc"),
        (register, good_with(good, hostname=""), "schema", "rpc"),
        (register, b'{"v":1,"request_id":"r"}', "schema", "rpc"),
        (register, good_with(good, v=2), "version", "rpc"),
        (register, OVERSIZED, "oversized", "rpc"),
        (register, good_with(good, request_id="r#1"), "schema", "rpc"),
        (register, good_with(good, agent_id="a/b"), "schema", "rpc"),
        (trigger_topic, DEEP, "malformed_json", "rpc"),
        (f"{T.root}/rpc/no_such_method", encode(good), "unknown_method", "rpc"),
        # reply_to must lie under {root}/replies/: never an agent's task topic,
        # never a wildcard (publishing there would cost us the connection).
        (register, good_with(good, reply_to="elsewhere/x"), "bad_reply_to", "rpc"),
        (register, good_with(good, reply_to=T.tasks(known)), "bad_reply_to", "rpc"),
        (
            register,
            good_with(good, reply_to=f"{T.root}/replies/+"),
            "bad_reply_to",
            "rpc",
        ),
        (
            register,
            good_with(good, reply_to=f"{T.root}/replies/#"),
            "bad_reply_to",
            "rpc",
        ),
        (
            register,
            good_with(good, reply_to=f"{T.root}/replies/../agents"),
            "bad_reply_to",
            "rpc",
        ),
    ]


async def send_raw(b: Bus, method: RpcMethod, request: Request, raw: bytes) -> bytes:
    """Publish ``raw`` as a request; the reply to ``request``'s id."""
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    b._replies[request.request_id] = future
    await b.client.publish(T.rpc(method), raw, qos=1)
    return await asyncio.wait_for(future, 5)


def good_with(model: object, **changes: object) -> bytes:
    """A valid message's JSON with some fields replaced (None: removed)."""
    assert hasattr(model, "model_dump")
    data = model.model_dump(mode="json", exclude_none=True)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


@pytest.mark.timeout(90)
async def test_every_bad_input_is_refused_and_counted_once(
    broker: BrokerHandle, migrated: str, tmp_path: Path
) -> None:
    """Invariant: each bad message on each channel is refused and counted
    exactly once under its reason; none makes the controller publish anything
    (no reply outside the replies tree, nothing on a task topic); refused
    requests still answerable are told why; valid traffic flows afterwards."""
    async with (
        controller_with_metrics(broker, migrated, tmp_path) as (controller, m, b),
        listening(broker, "elsewhere/#", T.all_agents(AgentChannel.TASKS)) as stray,
    ):
        known = (await b.register("known", agent_id=str(uuid.uuid4()))).agent_id
        other = (await b.register("other", agent_id=str(uuid.uuid4()))).agent_id
        workflow = await trigger(b, other)
        others_task = workflow.steps[0].attempts[0].task_id
        stray.clear()  # the trigger's own task message for ``other``
        stranger = str(uuid.uuid4())
        cases = [
            *status_cases(known, stranger),
            *heartbeat_cases(known, stranger),
            *result_cases(known, other, others_task),
            *rpc_cases(b.reply_to, known),
        ]
        before = await m.rejected()
        for topic, payload, _, _ in cases:
            await b.client.publish(topic, payload, qos=1)
        expected = collections.Counter((r, c) for _, _, r, c in cases)
        counted = await m.wait_rejected(expected + before)
        # Once each, and nothing else refused.
        assert counted - before == expected

        # Requests that parse but are refused are answered with the reason.
        ghost = b.new_request(HeartbeatRequest, agent_id=stranger)
        reply = await b.request(RpcMethod.HEARTBEAT, ghost, HeartbeatReply)
        assert reply.error is not None
        assert reply.error.code is ErrorCode.NOT_FOUND
        nobody = b.new_request(
            TriggerRequest, agent_id=stranger, kb_id="fault-kb", params={}
        )
        answer = await b.request(RpcMethod.TRIGGER, nobody, TriggerReply)
        assert answer.error is not None
        assert answer.error.code is ErrorCode.NOT_FOUND
        typo = b.new_request(RegisterRequest, hostname="h")
        typo_bytes = good_with(typo, hostname="")
        told = decode(
            RegisterReply, await send_raw(b, RpcMethod.REGISTER, typo, typo_bytes)
        )
        assert told.error is not None
        assert told.error.code is ErrorCode.INVALID

        # Valid traffic still flows; nothing went where it must not.
        fresh = await b.register("after-the-garbage", agent_id=str(uuid.uuid4()))
        assert fresh.status == "online"
        assert controller.alive()
        assert stray == []


@pytest.mark.timeout(60)
async def test_replayed_results_change_nothing_and_are_counted(
    broker: BrokerHandle, migrated: str, tmp_path: Path
) -> None:
    """Invariant: a result replayed after its attempt ended (an old message
    again, or a different outcome for the same task) changes nothing in the
    database and is counted as a duplicate, once per message."""
    audit = Audit(migrated)
    async with controller_with_metrics(broker, migrated, tmp_path) as (_, m, b):
        agent_id = (await b.register("replayer", agent_id=str(uuid.uuid4()))).agent_id
        workflow = await trigger(b, agent_id)
        task_id = workflow.steps[0].attempts[0].task_id
        first = TaskResult(
            agent_id=agent_id,
            task_id=task_id,
            status=ResultStatus.SUCCEEDED,
            output="the first answer",
        )
        await b.client.publish(T.results(agent_id), encode(first), qos=1)

        async def next_step() -> bool:
            snap = await audit.snapshot()
            return any(s.step_index == 1 for s in snap.steps)

        await async_wait_until(next_step, what="the second step dispatched")
        other = first.model_copy(
            update={"status": ResultStatus.FAILED, "output": "a later answer"}
        )
        for replay in (first, other, first):
            await b.client.publish(T.results(agent_id), encode(replay), qos=1)
        counted = await m.wait_rejected(
            collections.Counter({("duplicate", "results"): 3})
        )
        assert counted[("duplicate", "results")] == 3
    snap = await audit.snapshot()
    audit.close()
    (step,) = [s for s in snap.steps if s.task_id == task_id]
    assert (step.status, step.output) == ("succeeded", "the first answer")
    assert [s.step_index for s in snap.steps if s.status != "dispatched"] == [0]


def flood_messages(known: str, reply_to: str) -> list[tuple[str, bytes, int]]:
    """One round of the flood: (topic, payload, qos), every channel, bad."""
    status = AgentStatus(agent_id=known, state=AgentState.ONLINE, epoch=1)
    request = RegisterRequest(request_id="r", reply_to=reply_to, hostname="h")
    ghost = TaskResult(agent_id=known, task_id="ghost", status=ResultStatus.FAILED)
    return [
        (T.heartbeat(known), b"{not json", 0),
        (T.heartbeat(known), good_with(Heartbeat(agent_id=known), seq=-1), 0),
        (T.status(known), good_with(status, epoch="x"), 1),
        (T.results(known), encode(ghost), 1),
        (T.rpc(RpcMethod.REGISTER), good_with(request, reply_to="elsewhere/x"), 1),
        (T.rpc(RpcMethod.TRIGGER), b"[]", 1),
    ]


FLOOD_TOTAL = 12_000


class Flood:
    """Publishes ``total`` messages from one client, as fast as it can."""

    def __init__(self, client: aiomqtt.Client, messages: list[tuple[str, bytes, int]]):
        self.client = client
        self.messages = messages
        self.sent = 0
        #: Set once ``warm_up`` messages are out.
        self.warm = asyncio.Event()
        self.warm_up = 2_000

    async def run(self, total: int, oversized_every: int = 500) -> None:
        while self.sent < total:
            batch = []
            for i in range(min(len(self.messages) * 50, total - self.sent)):
                topic, payload, qos = self.messages[i % len(self.messages)]
                if (self.sent + i) % oversized_every == 0:
                    topic, payload, qos = T.heartbeat("x"), OVERSIZED, 0
                batch.append(self.client.publish(topic, payload, qos=qos))
            # QoS 1 publishes wait for their PUBACK: send a round at once.
            await asyncio.gather(*batch)
            self.sent += len(batch)
            if self.sent >= self.warm_up:
                self.warm.set()


@pytest.mark.mosquitto
@pytest.mark.timeout(90)
async def test_flood_from_one_client_is_counted_and_survived(
    mosquitto_broker: BrokerHandle, sqlite_url: str, tmp_path: Path
) -> None:
    """Invariant: while one client floods every channel with bad messages, a
    valid workflow still completes; afterwards every flood message is
    accounted for (rejected under its reason, or a QoS 0 message dropped at
    the bounded queue), and the controller's memory has not grown with the
    number of messages."""
    broker = mosquitto_broker
    upgrade(sqlite_url)
    audit = Audit(sqlite_url)
    async with controller_with_metrics(broker, sqlite_url, tmp_path) as (
        controller,
        m,
        b,
    ):
        with Children() as children:
            children.start(
                agents_process(
                    tmp_path, broker.url, tmp_path / "agents", count=1, heartbeat_s=1
                )
            )
            (agent_id,) = await audit.online(1)
            await trigger(b, agent_id)
            await audit.all_final(1, timeout_s=20)
            rss = psutil.Process(controller.pid)
            rss_before = rss.memory_info().rss
            before = await m.rejected()
            dropped_before = await m.value("kbbus_messages_dropped_total")
            async with BusClient(broker.url, "flooder") as client:
                flood = Flood(client, flood_messages(agent_id, b.reply_to))
                clock = time.monotonic()
                flooding = asyncio.create_task(flood.run(FLOOD_TOTAL))
                await asyncio.wait_for(flood.warm.wait(), 60)
                started = await audit.snapshot()
                sent_at_trigger = flood.sent
                triggered_at = time.monotonic()
                await trigger(b, agent_id, timeout_s=30)
                snap = await audit.all_final(2, timeout_s=45)
                workflow_s = time.monotonic() - triggered_at
                await flooding
        sent = flood.sent

        async def accounted() -> bool:
            rejected = sum((await m.rejected() - before).values())
            dropped = await m.value("kbbus_messages_dropped_total") - dropped_before
            return rejected + dropped >= sent

        await async_wait_until(accounted, timeout_s=60, what="the flood accounted")
        drain_s = time.monotonic() - clock
        rejected = await m.rejected() - before
        dropped = await m.value("kbbus_messages_dropped_total") - dropped_before
        rss_after = rss.memory_info().rss
        assert controller.alive()
    audit.close()
    assert len(started.workflows) == 1
    assert all(s == "succeeded" for _, s in snap.workflows.values()), snap.workflows
    assert sent == FLOOD_TOTAL
    assert sent_at_trigger < FLOOD_TOTAL
    assert sum(rejected.values()) + dropped == sent, (dict(rejected), dropped, sent)
    assert set(rejected) <= {
        ("malformed_json", "heartbeat"),
        ("schema", "heartbeat"),
        ("oversized", "heartbeat"),
        ("bad_topic", "heartbeat"),
        ("schema", "status"),
        ("not_found", "results"),
        ("bad_reply_to", "rpc"),
        ("schema", "rpc"),
    }, rejected
    growth_mb = (rss_after - rss_before) / 2**20
    print(
        f"flood: sent={sent} dropped={dropped:.0f} drained in {drain_s:.1f}s "
        f"({sent / drain_s:.0f}/s) workflow={workflow_s:.1f}s "
        f"rss growth={growth_mb:.1f} MiB"
    )
    assert growth_mb < 64, f"controller RSS grew {growth_mb:.0f} MiB over the flood"
