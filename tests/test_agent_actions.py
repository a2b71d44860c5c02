"""Actions, the state file and backoff: the agent's logic without a network."""

import asyncio
from pathlib import Path
from random import Random

import pytest

from agent_sim.actions import ACTIONS, ActionRunner
from agent_sim.errors import StateFileError
from agent_sim.settings import Settings
from agent_sim.store import AgentState
from agent_sim.wire import Backoff
from schemas.messages import ResultStatus


async def test_simulated_actions_are_deterministic_under_a_seed() -> None:
    runner = ActionRunner(fail_rate=0.3, latency_ms=1, latency_dist="exponential")

    async def outcomes(seed: int) -> list[tuple[str, str]]:
        out = []
        for n, name in enumerate(sorted(ACTIONS) * 3):
            if name == "sleep":
                continue
            rng = Random(f"{seed}:0:{n}")
            o = await runner.run(name, {"name": "example.org"}, 5, rng)
            out.append((o.status.value, o.output))
        return out

    first = await outcomes(1)
    assert first == await outcomes(1)
    assert first != await outcomes(2)
    statuses = {status for status, _ in first}
    assert statuses == {"succeeded", "failed"}


async def test_zero_latency_and_certain_failure() -> None:
    ok = await ActionRunner().run("dns.flush", {}, 5, Random(1))
    assert ok.status is ResultStatus.SUCCEEDED
    assert "Flushed" in ok.output
    bad = await ActionRunner(fail_rate=1.0).run("dns.flush", {}, 5, Random(1))
    assert bad.status is ResultStatus.FAILED
    assert bad.error == "dns.flush failed (simulated)"


async def test_a_slow_action_times_out() -> None:
    runner = ActionRunner(latency_ms=5000)
    outcome = await runner.run("echo", {}, 0.05, Random(1))
    assert outcome.status is ResultStatus.FAILED
    assert outcome.error is not None
    assert "within 0.05s" in outcome.error


async def test_an_unknown_action_fails_with_the_known_ones() -> None:
    for exec_real in (False, True):
        runner = ActionRunner(exec_real=exec_real, allow=frozenset({"echo"}))
        outcome = await runner.run("dns.teleport", {}, 5, Random(1))
        assert outcome.status is ResultStatus.FAILED
        assert outcome.error is not None
        assert "unknown action 'dns.teleport'" in outcome.error
        assert "dns.resolve" in outcome.error


async def test_dns_resolve_simulated_and_real() -> None:
    simulated = await ActionRunner().run(
        "dns.resolve", {"name": "localhost"}, 5, Random(1)
    )
    assert simulated.status is ResultStatus.SUCCEEDED
    assert simulated.output.startswith("localhost -> 10.")

    real_runner = ActionRunner(exec_real=True, allow=Settings().exec_allowed)
    real = await real_runner.run("dns.resolve", {"name": "localhost"}, 5, Random(1))
    assert real.status is ResultStatus.SUCCEEDED, real
    assert "127.0.0.1" in real.output or "::1" in real.output

    missing = await real_runner.run(
        "dns.resolve", {"name": "no-such-host.invalid"}, 5, Random(1)
    )
    assert missing.status is ResultStatus.FAILED
    assert missing.error is not None
    assert "cannot resolve no-such-host.invalid" in missing.error


async def test_exec_runs_only_allow_listed_actions() -> None:
    runner = ActionRunner(exec_real=True, allow=frozenset({"disk.usage"}))
    usage = await runner.run("disk.usage", {"path": "/"}, 5, Random(1))
    assert usage.status is ResultStatus.SUCCEEDED
    assert usage.output.startswith("/: total ")
    refused = await runner.run("service.restart", {"name": "nginx"}, 5, Random(1))
    assert refused.status is ResultStatus.FAILED
    assert (
        refused.error
        == "action 'service.restart' is not on this agent's --exec-allow list"
    )


async def test_real_disk_cleanup_stays_inside_its_roots(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    old = root / "old.log"
    old.write_text("x" * 2048)
    runner = ActionRunner(
        exec_real=True,
        allow=frozenset({"disk.cleanup"}),
        cleanup_dirs=(root.resolve(),),
    )
    outside = await runner.run("disk.cleanup", {"path": str(tmp_path)}, 5, Random(1))
    assert outside.status is ResultStatus.FAILED
    assert old.exists()
    inside = await runner.run(
        "disk.cleanup", {"path": str(root), "older_than_days": 0}, 5, Random(1)
    )
    assert inside.status is ResultStatus.SUCCEEDED, inside
    assert "removed 1 files" in inside.output
    assert not old.exists()


def test_state_keeps_id_raises_epochs_and_bounds_finished_tasks(tmp_path: Path) -> None:
    path = tmp_path / "agent-0.json"
    state = AgentState.load_or_create(path, "agent-a", max_finished=3)
    first = state.next_epoch(1000)
    assert state.next_epoch(500) == first + 1  # the clock went back
    for n in range(5):
        state.finish(f"t{n}", f'{{"n":{n}}}')
    state.save()
    again = AgentState.load_or_create(path, "agent-b", max_finished=3)
    assert again.agent_id == "agent-a"
    assert again.last_epoch == first + 1
    assert list(again.finished) == ["t2", "t3", "t4"]
    assert again.result_of("t4") == '{"n":4}'
    assert again.result_of("t0") is None


async def test_persist_writes_off_the_loop_and_keeps_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "agent-0.json"
    state = AgentState(path, "agent-a")
    writes = []
    for n in range(10):
        state.finish(f"t{n}", "{}")
        writes.append(asyncio.create_task(state.persist()))
    await asyncio.gather(*writes)
    loaded = AgentState.load(path)
    assert loaded is not None
    assert len(loaded.finished) == 10


@pytest.mark.timeout(20)
async def test_persist_right_after_a_write_finished_does_not_spin(
    tmp_path: Path,
) -> None:
    # Found by the soak: a task persisting between the moment an earlier
    # write finished and the moment its owner resumed awaited the done
    # future again and again without yielding, at 100% CPU, forever.
    state = AgentState(tmp_path / "agent-0.json", "agent-a")
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    state._writing = done  # an earlier write, finished, owner not yet back
    state.finish("t1", "{}")
    await asyncio.wait_for(state.persist(), timeout=5)
    loaded = AgentState.load(tmp_path / "agent-0.json")
    assert loaded is not None
    assert list(loaded.finished) == ["t1"]


async def test_persist_under_many_interleaved_callers_keeps_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent-0.json"
    state = AgentState(path, "agent-a", max_finished=1000)

    async def one(n: int) -> None:
        for _ in range(n % 3):
            await asyncio.sleep(0)
        state.finish(f"t{n}", "{}")
        await state.persist()

    await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(200))), 30)
    loaded = AgentState.load(path, max_finished=1000)
    assert loaded is not None
    assert len(loaded.finished) == 200


def test_a_broken_state_file_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "agent-0.json"
    path.write_text('{"agent_id": ')
    with pytest.raises(StateFileError, match="delete it to start as a new agent"):
        AgentState.load(path)


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, Random(1))
    delays = [backoff.next_s() for _ in range(6)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert delays[-1] >= 2.0
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next_s() <= 0.5


def test_state_survives_a_write_cut_short_in_either_slot(tmp_path: Path) -> None:
    path = tmp_path / "agent-0.json"
    state = AgentState(path, "agent-a")
    for n in range(4):  # slots written in turn: .json, .json.b, .json, .json.b
        state.finish(f"t{n}", f'{{"n":{n}}}')
        state.save()
    newest = path.with_name("agent-0.json.b")
    assert newest.exists()
    loaded = AgentState.load(path)
    assert loaded is not None
    assert list(loaded.finished) == ["t0", "t1", "t2", "t3"]
    # A crash in the middle of the next write: that slot holds a torn state.
    torn = newest.read_bytes()
    newest.write_bytes(torn[: len(torn) // 2])
    loaded = AgentState.load(path)
    assert loaded is not None
    assert list(loaded.finished) == ["t0", "t1", "t2"]  # the write before it
    # And the next write after that load goes to the torn slot, not the good one.
    loaded.finish("t9", "{}")
    loaded.save()
    again = AgentState.load(path)
    assert again is not None
    assert list(again.finished) == ["t0", "t1", "t2", "t9"]
    assert path.read_bytes().startswith(b"kbbus-agent-state v1 seq=3 ")


def test_a_plain_json_state_file_is_read_and_kept_until_replaced(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent-0.json"
    path.write_text('{"v":1,"agent_id":"agent-a","last_epoch":7,"finished":[]}')
    state = AgentState.load(path)
    assert state is not None
    assert (state.agent_id, state.last_epoch) == ("agent-a", 7)
    state.finish("t1", "{}")
    state.save()
    # The first write goes to the other slot: the old file stays whole.
    assert path.read_text().startswith('{"v":1')
    again = AgentState.load(path)
    assert again is not None
    assert list(again.finished) == ["t1"]


def test_a_new_identity_outranks_what_an_older_one_left(tmp_path: Path) -> None:
    path = tmp_path / "agent-0.json"
    old = AgentState(path, "agent-old")
    for _ in range(3):
        old.save()
    new = AgentState(path, "agent-new")  # registered afresh, same file
    new.save()
    loaded = AgentState.load(path)
    assert loaded is not None
    assert loaded.agent_id == "agent-new"
    assert not path.with_name("agent-0.json.b").exists()
