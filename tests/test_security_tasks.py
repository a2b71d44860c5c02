"""Signed task envelopes: the controller's keyring, signing and key rotation.

The agent's side (refusing forged, replayed, expired and misaddressed tasks)
is in ``test_security_tasks_agent.py``.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from controller.signing import MAX_KEYS, Keyring, SigningError, retire, rotate
from schemas import decode, encode
from schemas.messages import (
    ControllerKeys,
    RegisterReply,
    RegisterRequest,
    SigningKey,
    Task,
    TaskResult,
    TriggerReply,
    TriggerRequest,
    utcnow,
)
from schemas.signing import (
    canonical_keys,
    canonical_task,
    http_token,
    public_key,
    verify,
)
from schemas.topics import RpcMethod, Topics
from tests.support.controller_rig import bus, controller_settings, running_controller
from tests.support.infra import BrokerHandle

ROOT = "kbbus/v1"


def a_task(agent_id: str = "agent-1", task_id: str = "task-1") -> Task:
    now = utcnow()
    return Task(
        task_id=task_id,
        agent_id=agent_id,
        workflow_id="wf-1",
        kb_id="dns-flush-kb",
        step_id="flush",
        step_index=0,
        attempt=1,
        action="dns.flush",
        args={"name": "example.org", "n": 1.5, "ü": ["x"]},
        timeout_s=30,
        issued_at=now,
        expires_at=now,
    )


def verifies(keys: ControllerKeys | list[SigningKey], task: Task) -> bool:
    listed = keys.keys if isinstance(keys, ControllerKeys) else keys
    by_id = {k.key_id: k.public_key for k in listed}
    assert task.key_id is not None
    assert task.signature is not None
    encoded = by_id.get(task.key_id)
    return encoded is not None and verify(
        public_key(encoded), canonical_task(task), task.signature
    )


def set_verifies(keys: ControllerKeys) -> bool:
    by_id = {k.key_id: public_key(k.public_key) for k in keys.keys}
    message = canonical_keys(keys)
    return {s.key_id for s in keys.signatures} == set(by_id) and all(
        verify(by_id[s.key_id], message, s.signature) for s in keys.signatures
    )


# --- the keyring, without a broker ---------------------------------------------


def test_first_load_creates_one_key_and_later_loads_keep_it(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    first = Keyring.load(key_dir)
    assert len(first.key_ids) == 1
    assert Keyring.load(key_dir).key_ids == first.key_ids
    assert first.reload() is None
    pem = key_dir / f"{first.active_key_id}.pem"
    assert pem.stat().st_mode & 0o077 == 0, "private key readable by others"


def test_signature_covers_every_field(tmp_path: Path) -> None:
    keyring = Keyring.load(tmp_path)
    signed = keyring.sign_task(a_task())
    assert signed.key_id == keyring.active_key_id
    assert signed.nonce == keyring.nonce("task-1")
    # Through the wire and back, as an agent sees it.
    received = decode(Task, encode(signed))
    assert verifies(keyring.signing_keys(), received)
    for change in (
        {"agent_id": "agent-2"},
        {"task_id": "task-2"},
        {"nonce": "other"},
        {"expires_at": received.expires_at.replace(year=2099)},
        {"args": {"name": "evil.example"}},
        {"action": "sleep"},
        {"attempt": 2},
    ):
        tampered = received.model_copy(update=change)
        assert not verifies(keyring.signing_keys(), tampered), change


def test_keys_rotated_within_one_millisecond_still_sort_newest_first(
    tmp_path: Path,
) -> None:
    # Key ids carry a millisecond stamp; rotations in a tight loop share one,
    # and a tie ordered by the random suffix made an older key sign (a flaky
    # rotation test). Each new key must become the active one.
    made = [Keyring.load(tmp_path).active_key_id]
    for _ in range(30):
        made.append(rotate(tmp_path))
        keyring = Keyring.load(tmp_path)
        assert keyring.active_key_id == made[-1]
        assert keyring.key_ids == list(reversed(made))[:MAX_KEYS]
        if len(made) == MAX_KEYS:  # only that many are listed: retire one
            retire(tmp_path, made.pop(0))


def test_rotation_keeps_old_keys_listed_and_nonces_stable(tmp_path: Path) -> None:
    keyring = Keyring.load(tmp_path)
    old_id = keyring.active_key_id
    old_task = decode(Task, encode(keyring.sign_task(a_task())))
    new_id = rotate(tmp_path)
    fresh = keyring.reload()
    assert fresh is not None
    assert fresh.key_ids == [new_id, old_id]
    new_task = fresh.sign_task(a_task())
    assert new_task.key_id == new_id
    # A task republished after the rotation keeps its nonce: agents tell a
    # redelivery from a replay by it.
    assert new_task.nonce == old_task.nonce
    assert verifies(fresh.signing_keys(), old_task)
    key_set = fresh.key_set()
    assert [k.key_id for k in key_set.keys] == [new_id, old_id]
    assert set_verifies(decode(ControllerKeys, encode(key_set)))
    retire(tmp_path, old_id)
    after = fresh.reload()
    assert after is not None
    assert after.key_ids == [new_id]
    assert not verifies(after.signing_keys(), old_task)
    with pytest.raises(SigningError, match="only key"):
        retire(tmp_path, new_id)


# --- the running controller ------------------------------------------------------


@contextlib.asynccontextmanager
async def watcher(
    broker: BrokerHandle, agent_id: str
) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
    """Every message on the agent's task topic and the controller's key topic."""
    topics = Topics(ROOT)
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"watch-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(
            [(topics.tasks(agent_id), 1), (topics.controller_keys(), 1)]
        )

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                await queue.put((message.topic.value, payload))

        reader = asyncio.create_task(read())
        try:
            yield queue
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


async def next_on(
    queue: asyncio.Queue[tuple[str, bytes]], topic: str, timeout_s: float = 10.0
) -> bytes:
    async with asyncio.timeout(timeout_s):
        while True:
            got, payload = await queue.get()
            if got == topic and payload:
                return payload


async def test_controller_signs_tasks_and_rotates_keys_without_reregistering(
    broker: BrokerHandle, db_url: str, tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    settings = controller_settings(
        broker,
        db_url,
        signing_key_dir=key_dir,
        signing_key_check_s=0.1,
        agent_secret="s3cret-for-tests",
    )
    topics = Topics(ROOT)
    agent_id = str(uuid.uuid4())
    async with (
        running_controller(settings),
        bus(broker) as b,
        watcher(broker, agent_id) as seen,
    ):
        keys_at_start = decode(
            ControllerKeys, await next_on(seen, topics.controller_keys())
        )
        assert set_verifies(keys_at_start)
        agent = await b.register("signed-host", agent_id=agent_id)
        assert agent.credentials is not None
        assert agent.credentials["http_token"] == http_token(
            "s3cret-for-tests", agent_id
        )
        reply = await b.request(
            RpcMethod.REGISTER,
            b.new_request(RegisterRequest, hostname="signed-host", agent_id=agent_id),
            RegisterReply,
        )
        assert reply.signing_keys == keys_at_start.keys

        trigger = b.new_request(
            TriggerRequest, agent_id=agent_id, kb_id="dns-flush-kb", params={}
        )
        assert (await b.request(RpcMethod.TRIGGER, trigger, TriggerReply)).error is None
        first = decode(Task, await next_on(seen, topics.tasks(agent_id)))
        assert first.key_id == keys_at_start.keys[0].key_id
        assert verifies(reply.signing_keys, first)

        new_id = rotate(key_dir)
        rotated = decode(ControllerKeys, await next_on(seen, topics.controller_keys()))
        assert rotated.keys[0].key_id == new_id
        assert rotated.issued_at >= keys_at_start.issued_at
        # Signed by the old key too: an agent that knows only that one accepts it.
        old_id = keys_at_start.keys[0].key_id
        assert old_id in {s.key_id for s in rotated.signatures}
        assert set_verifies(rotated)

        result = TaskResult(
            agent_id=agent_id, task_id=first.task_id, status="succeeded", exit_code=0
        )
        await b.client.publish(topics.results(agent_id), encode(result), qos=1)
        second = decode(Task, await next_on(seen, topics.tasks(agent_id)))
        assert second.task_id != first.task_id
        assert second.key_id == new_id
        assert verifies(rotated, second)
        assert not verifies(keys_at_start, second)
