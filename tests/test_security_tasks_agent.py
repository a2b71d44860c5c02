"""The agent's side of signed tasks: what it refuses, what it reports, and how it
learns new keys. The task rules run here on ``AgentCore`` with a real keyring
and a real state directory; ``test_security_tasks_bus.py`` runs them through a
broker with the real controller.
"""

import asyncio
import logging
import uuid
from datetime import timedelta
from pathlib import Path
from random import Random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_sim import core as core_mod
from agent_sim.actions import ActionRunner, run_argv
from agent_sim.core import AgentCore
from agent_sim.store import AgentState
from agent_sim.trust import Mode, TrustStore
from controller.signing import Keyring, rotate
from schemas import decode, encode
from schemas.messages import ControllerKeys, Task, TaskResult, utcnow
from schemas.signing import b64url, canonical_task
from tests.support.wait import async_wait_until

AGENT = "agent-a"


def task_for(
    agent_id: str = AGENT, *, expires_in_s: float = 30, action: str = "echo"
) -> Task:
    now = utcnow()
    return Task(
        task_id=str(uuid.uuid4()),
        agent_id=agent_id,
        workflow_id="wf-1",
        kb_id="test-kb",
        step_id="s0",
        step_index=0,
        attempt=1,
        action=action,
        args={"text": "hi"},
        timeout_s=30,
        issued_at=now,
        expires_at=now + timedelta(seconds=expires_in_s),
    )


class Agent:
    """One ``AgentCore`` with a trust store, recording what it sends."""

    def __init__(self, tmp_path: Path, keyring: Keyring | None) -> None:
        self.sent: list[TaskResult] = []
        self.state = AgentState(tmp_path / "agent-0.json", AGENT)
        self.trust = TrustStore.load(tmp_path)
        if keyring is not None:
            self.trust.registered(keyring.signing_keys())
        self.core = AgentCore(
            self.state,
            ActionRunner(),
            lambda payload: self.sent.append(decode(TaskResult, payload)),
            trust=self.trust,
        )

    def deliver(self, task: Task) -> None:
        """As the MQTT transport does: the bytes of the retained message."""
        self.core.on_payload(encode(task))

    async def sent_count(self, n: int) -> None:
        async def enough() -> bool:
            return len(self.sent) >= n

        await async_wait_until(enough, timeout_s=5, what=f"{n} results sent")

    def mode(self) -> Mode:
        return self.trust.mode

    async def result(self, task_id: str) -> TaskResult:
        async def sent() -> bool:
            return any(r.task_id == task_id for r in self.sent)

        await async_wait_until(sent, timeout_s=5, what=f"result of {task_id}")
        return next(r for r in self.sent if r.task_id == task_id)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.load(tmp_path / "controller-keys")


def resigned(keyring: Keyring, task: Task, **changes: object) -> Task:
    """``task`` changed and signed again with the controller's key, as a
    controller that misbehaved (or whose key leaked) would."""
    key = keyring._keys[0]
    update = {"key_id": key.key_id, **changes, "signature": None}
    unsigned = task.model_copy(update=update)
    signature = b64url(key.private.sign(canonical_task(unsigned)))
    return unsigned.model_copy(update={"signature": signature})


async def test_a_signed_task_runs(tmp_path: Path, keyring: Keyring) -> None:
    agent = Agent(tmp_path, keyring)
    task = keyring.sign_task(task_for())
    agent.deliver(task)
    result = await agent.result(task.task_id)
    assert result.status == "succeeded", result
    assert agent.state.result_of(task.task_id) is not None


async def test_forged_tasks_are_refused_and_reported(
    tmp_path: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kbbus.agent")
    agent = Agent(tmp_path, keyring)
    genuine = keyring.sign_task(task_for())
    # The attacker's own key under the controller's key id.
    mallory = Ed25519PrivateKey.generate()
    forged = genuine.model_copy(
        update={"task_id": str(uuid.uuid4()), "signature": None}
    )
    forged = forged.model_copy(
        update={"signature": b64url(mallory.sign(canonical_task(forged)))}
    )
    tampered = genuine.model_copy(
        update={"task_id": str(uuid.uuid4()), "args": {"text": "rm -rf /"}}
    )
    unsigned = task_for()
    cases = [
        (forged, "refused: bad signature"),
        (tampered, "refused: bad signature"),
        (unsigned, "refused: unsigned"),
        (
            genuine.model_copy(update={"task_id": str(uuid.uuid4()), "signature": "x"}),
            "refused: bad signature",
        ),
    ]
    for task, error in cases:
        agent.deliver(task)
        result = await agent.result(task.task_id)
        assert (result.status, result.error) == ("failed", error), task
        assert result.agent_id == AGENT
        # Not run, and not remembered: a forgery cannot pre-empt a real task id.
        assert agent.state.result_of(task.task_id) is None
        assert not agent.state.started
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if "refused a task" in w]) == len(cases)
    assert all(f"agent_id={AGENT}" in w for w in warnings)
    assert agent.core.counters.rejected == len(cases)


async def test_replayed_tasks_are_refused(tmp_path: Path, keyring: Keyring) -> None:
    agent = Agent(tmp_path, keyring)
    first = keyring.sign_task(task_for())
    agent.deliver(first)
    done = await agent.result(first.task_id)
    assert done.status == "succeeded"

    # The same envelope again (a retained redelivery, or a replay of it): the
    # stored result, never a second run.
    agent.deliver(first)
    await agent.sent_count(2)
    assert agent.sent[1] == done

    # The same task id under another nonce.
    other_nonce = resigned(keyring, first, nonce="another-nonce")
    agent.deliver(other_nonce)
    await agent.sent_count(3)
    assert agent.sent[2].error == "refused: replayed"
    # A new task id under a nonce already used.
    reused = resigned(keyring, task_for(), nonce=first.nonce)
    agent.deliver(reused)
    refusal = await agent.result(reused.task_id)
    assert refusal.error == "refused: replayed"
    assert agent.state.result_of(reused.task_id) is None


async def test_expired_and_misaddressed_tasks_are_refused(
    tmp_path: Path, keyring: Keyring
) -> None:
    agent = Agent(tmp_path, keyring)
    expired = keyring.sign_task(task_for(expires_in_s=-1))
    agent.deliver(expired)
    result = await agent.result(expired.task_id)
    assert (result.status, result.error) == ("failed", "refused: expired")
    # Genuinely signed, for agent B, but on A's topic.
    elsewhere = keyring.sign_task(task_for("agent-b"))
    agent.deliver(elsewhere)
    result = await agent.result(elsewhere.task_id)
    assert (result.status, result.error) == ("failed", "refused: misaddressed")
    assert result.agent_id == AGENT
    assert agent.state.result_of(elsewhere.task_id) is None


async def test_rotated_key_is_learnt_from_the_signed_key_set(
    tmp_path: Path, keyring: Keyring
) -> None:
    agent = Agent(tmp_path, keyring)
    rotate(keyring.key_dir)
    fresh = keyring.reload()
    assert fresh is not None
    task = fresh.sign_task(task_for())
    # Signed by a key the agent does not know yet: it waits, neither runs
    # nor refuses...
    agent.deliver(task)
    await asyncio.sleep(0.05)
    assert agent.sent == []
    # ...until the controller's new set, signed by the old key too, arrives.
    assert agent.trust.key_set(encode(fresh.key_set()))
    result = await agent.result(task.task_id)
    assert result.status == "succeeded"
    assert agent.trust.key_ids == fresh.key_ids
    # Kept on disk: a restarted agent trusts the new key before registering.
    again = TrustStore.load(tmp_path)
    assert again.mode is Mode.SIGNED
    assert again.key_ids == fresh.key_ids


async def test_key_sets_not_signed_by_a_trusted_key_or_older_are_ignored(
    tmp_path: Path, keyring: Keyring
) -> None:
    agent = Agent(tmp_path, keyring)
    stranger = Keyring.load(tmp_path / "mallory")
    assert not agent.trust.key_set(encode(stranger.key_set()))
    assert agent.trust.key_ids == keyring.key_ids
    current = keyring.key_set()
    rotate(keyring.key_dir)
    fresh = keyring.reload()
    assert fresh is not None
    assert agent.trust.key_set(encode(fresh.key_set()))
    # The earlier set, played back, cannot bring back what it listed.
    assert not agent.trust.key_set(encode(current.model_copy(update={})))
    assert agent.trust.key_ids == fresh.key_ids
    # A set with the signatures stripped or moved to other keys: ignored.
    stripped = fresh.key_set().model_copy(update={"signatures": []})
    assert not agent.trust.key_set(encode(stripped))
    mixed = decode(ControllerKeys, encode(fresh.key_set()))
    mixed = mixed.model_copy(update={"keys": stranger.signing_keys()})
    assert not agent.trust.key_set(encode(mixed))


async def test_unknown_key_is_refused_after_the_grace(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_mod, "UNKNOWN_KEY_GRACE_S", 0.1)
    agent = Agent(tmp_path, keyring)
    stranger = Keyring.load(tmp_path / "mallory")
    task = stranger.sign_task(task_for())
    agent.deliver(task)
    result = await agent.result(task.task_id)
    assert result.error == "refused: unknown key"


async def test_tasks_wait_for_registration_and_open_mode_needs_no_keys(
    tmp_path: Path, keyring: Keyring
) -> None:
    # A fresh agent: no keys on disk, no registration answer yet.
    agent = Agent(tmp_path, None)
    assert agent.mode() is Mode.UNKNOWN
    signed = keyring.sign_task(task_for())
    agent.deliver(signed)
    await asyncio.sleep(0.05)
    assert agent.sent == []
    agent.trust.registered(keyring.signing_keys())
    assert (await agent.result(signed.task_id)).status == "succeeded"
    # Keys trusted: a controller that stops signing is not believed.
    agent.trust.registered([])
    assert agent.mode() is Mode.SIGNED
    unsigned = task_for()
    agent.deliver(unsigned)
    assert (await agent.result(unsigned.task_id)).error == "refused: unsigned"

    # Another host, whose controller runs with --no-sign-tasks.
    lab = Agent(tmp_path / "lab", None)
    lab.trust.registered([])
    assert lab.mode() is Mode.OPEN
    task = task_for()
    lab.deliver(task)
    assert (await lab.result(task.task_id)).status == "succeeded"
    # Open is never written down: a restart waits for the controller again.
    assert TrustStore.load(tmp_path / "lab").mode is Mode.UNKNOWN


# --- real actions: allow-list and argument vectors ----------------------------------


async def test_real_actions_never_go_through_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = f"x; touch {marker} && echo $(id) `id` | cat > {marker}"
    # An argument vector is passed as is: the metacharacters stay text.
    echoed = await run_argv(["echo", hostile], timeout_s=5)
    assert echoed.status == "succeeded"
    assert echoed.output.strip() == hostile
    runner = ActionRunner(
        exec_real=True,
        allow=frozenset({"service.status", "service.restart", "dns.resolve"}),
        cleanup_dirs=(tmp_path / "allowed",),
    )
    for action, args in [
        ("service.status", {"name": hostile}),
        ("service.restart", {"name": "sshd;reboot"}),
        ("dns.resolve", {"name": f"example.org;touch {marker}"}),
        ("disk.cleanup", {"path": "/"}),  # not on the allow-list here
    ]:
        outcome = await runner.run(action, args, 5, Random(0))
        assert outcome.status == "failed", (action, outcome)
    assert not marker.exists()
