"""``kbbus bench``: the figures we quote, measured against the raw broker.

Each scenario starts what it measures as real processes (broker, controller,
bridge, simulated agents) on free ports with a database of its own, unless
``--mqtt-url``/``--db-url`` name existing ones. Rates are counted from
committed database state, never from what a client believes it sent.
"""

import asyncio
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from controller.db import Agent
from kbbus.bench_raw import requester as raw_requester
from kbbus.stack import (
    BrokerProcess,
    Process,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    postgres_available,
)
from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentState,
    AgentStatus,
    Heartbeat,
    LookupKind,
    LookupRequest,
    RegisterReply,
    RegisterRequest,
    TriggerReply,
    TriggerRequest,
)
from schemas.topics import RpcMethod, Topics

BENCH_KB_STEPS = 10
#: Workflows each agent gets before the rate is known, and how long it is
#: measured then (the workflow scenario).
WARMUP_WORKFLOWS = 2
WARMUP_S = 1.0
BENCH_KB = """\
v: 1
id: bench-echo-kb
title: Benchmark - ten echo steps
description: Ten zero-work steps, for measuring the engine.
steps:
{steps}
"""


@dataclass
class Sizes:
    """How big each scenario is; ``--quick`` keeps the whole run under a minute."""

    workflow_agents: int
    workflow_duration_s: float
    heartbeat_agents: int
    heartbeats: int
    presence_agents: int
    keepalive_s: int
    longpoll_samples: int
    fleet_agents: int
    fleet_window_s: float

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(50, 5.0, 500, 20_000, 10, 2, 30, 1000, 5.0)

    @classmethod
    def full(cls) -> "Sizes":
        return cls(200, 20.0, 5000, 200_000, 50, 2, 200, 10_000, 20.0)


@dataclass
class BenchContext:
    broker_kind: str
    db_kind: str
    sizes: Sizes
    workdir: Path
    console: Console
    mqtt_url: str | None = None
    db_url: str | None = None
    results: dict[str, Any] = field(default_factory=dict)


# --- the stack ----------------------------------------------------------------


class Stack:
    """Broker, database, controller and (optionally) bridge for one scenario."""

    def __init__(self, ctx: BenchContext, name: str) -> None:
        self.ctx = ctx
        self.dir = ctx.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.broker: BrokerProcess | None = None
        self.db_url = ctx.db_url or ""
        self._own_db = False
        self.processes: list[Process] = []
        self.controller: Process | None = None
        self.http_url = ""
        self.topics = Topics()

    @property
    def mqtt_url(self) -> str:
        if self.ctx.mqtt_url:
            return self.ctx.mqtt_url
        assert self.broker is not None
        return self.broker.url

    def start_infra(self) -> None:
        if not self.ctx.mqtt_url:
            self.broker = BrokerProcess(self.ctx.broker_kind, self.dir / "broker")
            self.broker.start()
        if not self.db_url:
            if self.ctx.db_kind == "postgres":
                self.db_url = create_postgres_database("kbbus_bench")
                self._own_db = True
            else:
                self.db_url = f"sqlite:///{self.dir / 'kbbus.db'}"

    def spawn(self, name: str, module: str, *args: str) -> Process:
        proc = Process(
            name,
            [sys.executable, "-m", module, *args],
            self.dir / f"{name}.log",
            env={"KBBUS_LOG_LEVEL": os.environ.get("KBBUS_BENCH_LOG_LEVEL", "WARNING")},
        ).start()
        self.processes.append(proc)
        return proc

    def start_controller(self, *extra: str) -> Process:
        kb_dir = self.dir / "kbs"
        kb_dir.mkdir(exist_ok=True)
        steps = "\n".join(
            f"  - id: s{i}\n    action: echo\n    args: {{message: step {i}}}\n"
            "    timeout_s: 60"
            for i in range(BENCH_KB_STEPS)
        )
        (kb_dir / "bench-echo-kb.yaml").write_text(BENCH_KB.format(steps=steps))
        self.controller = self.spawn(
            "controller",
            "controller",
            "--mqtt-url",
            self.mqtt_url,
            "--db-url",
            self.db_url,
            "--kb-dir",
            str(kb_dir),
            "--client-id",
            f"kbbus-controller-bench-{uuid.uuid4().hex[:6]}",
            # The bench measures the bus, not security: anonymous, open.
            "--open-enrolment",
            *extra,
        )
        return self.controller

    def start_bridge(self) -> None:
        port = free_port()
        self.http_url = f"http://127.0.0.1:{port}"
        self.spawn(
            "bridge", "bridge_http", "--mqtt-url", self.mqtt_url, "--port", str(port)
        )

    def start_agents(self, count: int, *extra: str, name: str = "agents") -> Process:
        return self.spawn(
            name,
            "agent_sim",
            "--mqtt-url",
            self.mqtt_url,
            "--count",
            str(count),
            "--state-dir",
            str(self.dir / name),
            "--summary-interval-s",
            "0",
            *extra,
        )

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.db_url)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.broker:
            self.broker.stop()
        if self._own_db:
            with contextlib.suppress(Exception):
                drop_postgres_database(self.db_url)


@contextlib.asynccontextmanager
async def stack(ctx: BenchContext, name: str) -> AsyncIterator[Stack]:
    s = Stack(ctx, name)
    try:
        s.start_infra()
        yield s
    finally:
        s.stop()


async def wait_for(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float,
    what: str,
    procs: list[Process] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        for proc in procs or []:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.05)


def count(engine: sa.Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar() or 0)


def at_least(engine: sa.Engine, sql: str, n: int) -> bool:
    return count(engine, sql) >= n


class Rpc:
    """The benchmark's own requests to the controller, many at once."""

    def __init__(self, client: BusClient, topics: Topics, identifier: str) -> None:
        self.client = client
        self.topics = topics
        self.reply_to = topics.reply(identifier)
        self.waiters: dict[str, asyncio.Future[bytes]] = {}

    async def run_replies(self) -> None:
        await self.client.subscribe(self.reply_to, qos=1)
        async for message in self.client.messages:
            if str(message.topic) != self.reply_to:
                continue
            payload = bytes(message.payload)
            request_id = json.loads(payload).get("request_id", "")
            fut = self.waiters.pop(request_id, None)
            if fut and not fut.done():
                fut.set_result(payload)

    async def call(
        self, method: RpcMethod, request: Any, timeout_s: float = 30
    ) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters[request.request_id] = fut
        await self.client.publish(self.topics.rpc(method), encode(request), qos=1)
        return await asyncio.wait_for(fut, timeout_s)

    def new_id(self) -> str:
        return uuid.uuid4().hex


@contextlib.asynccontextmanager
async def rpc_client(mqtt_url: str, topics: Topics) -> AsyncIterator[Rpc]:
    identifier = f"bench-{uuid.uuid4().hex[:8]}"
    async with BusClient(mqtt_url, identifier) as client:
        rpc = Rpc(client, topics, identifier)
        task = asyncio.create_task(rpc.run_replies())
        await asyncio.sleep(0)  # let the subscription go out first
        try:
            yield rpc
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def bounded(coros: list[Awaitable[Any]], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# --- scenarios ------------------------------------------------------------------


async def register_agents(rpc: Rpc, count_: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{uuid.uuid4().hex[:12]}" for _ in range(count_)]

    async def one(agent_id: str) -> None:
        request = RegisterRequest(
            request_id=rpc.new_id(),
            reply_to=rpc.reply_to,
            hostname=f"bench-{agent_id}",
            agent_id=agent_id,
        )
        reply = decode(RegisterReply, await rpc.call(RpcMethod.REGISTER, request))
        if reply.error:
            raise RuntimeError(f"register {agent_id}: {reply.error.message}")

    await bounded([one(a) for a in ids], 200)
    return ids


async def scenario_workflow(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    n_agents = sizes.workflow_agents
    async with stack(ctx, "workflow") as s:
        responder = s.spawn(
            "raw-responder", "kbbus.bench_raw", "--mqtt-url", s.mqtt_url
        )
        await wait_for(
            lambda: "ready" in responder.log_tail(), 20, "raw responder", [responder]
        )
        raw = await raw_requester(s.mqtt_url, n_agents, sizes.workflow_duration_s)
        responder.stop()
        ctx.results["raw_roundtrip_per_s"] = round(raw, 1)

        controller = s.start_controller()
        await wait_controller(s)
        # The agents of a real fleet run on machines of their own; one
        # simulator process for all of them pegged a core and capped the rate
        # (650 steps/s with one process, 850 with two, same run otherwise).
        procs = max(1, min(os.cpu_count() or 1, n_agents))
        agent_procs = [
            s.start_agents(
                n_agents // procs + (i < n_agents % procs),
                "--latency-ms",
                "0",
                "--heartbeat-s",
                "10",
                name=f"agents-{i}",
            )
            for i in range(procs)
        ]
        eng = s.engine()
        online_sql = "select count(*) from agents where status = 'online'"
        await wait_for(
            lambda: _safe_count(eng, online_sql) >= n_agents,
            120,
            f"{n_agents} agents online",
            [controller, *agent_procs],
        )
        with eng.connect() as conn:
            agent_ids = [r[0] for r in conn.execute(sa.text("select id from agents"))]
        done_sql = "select count(*) from step_executions where status = 'succeeded'"
        async with rpc_client(s.mqtt_url, s.topics) as rpc:

            async def trigger(agent_id: str) -> None:
                request = TriggerRequest(
                    request_id=rpc.new_id(),
                    reply_to=rpc.reply_to,
                    agent_id=agent_id,
                    kb_id="bench-echo-kb",
                )
                reply = decode(TriggerReply, await rpc.call(RpcMethod.TRIGGER, request))
                if reply.error:
                    raise RuntimeError(f"trigger: {reply.error.message}")

            async def trigger_each(per_agent: int) -> None:
                await bounded(
                    [trigger(a) for _ in range(per_agent) for a in agent_ids], 100
                )

            # A warm-up of two workflows an agent tells how fast steps go here;
            # then enough work to keep every agent busy well past the window
            # at that rate. (Sizing it from the raw rate queued ten times the
            # work needed, and triggering it took longer than the window.)
            await trigger_each(WARMUP_WORKFLOWS)
            await wait_for(lambda: count(eng, done_sql) > n_agents, 60, "first steps")
            w0, started = count(eng, done_sql), time.monotonic()
            await asyncio.sleep(WARMUP_S)
            warm_rate = (count(eng, done_sql) - w0) / (time.monotonic() - started)
            steps_needed = warm_rate * (sizes.workflow_duration_s + WARMUP_S) * 2
            await trigger_each(int(steps_needed / BENCH_KB_STEPS / n_agents) + 1)
        c0, t0 = count(eng, done_sql), time.monotonic()
        await asyncio.sleep(sizes.workflow_duration_s)
        c1, t1 = count(eng, done_sql), time.monotonic()
        running = count(
            eng, "select count(*) from workflows where status in ('queued','running')"
        )
        rate = (c1 - c0) / (t1 - t0)
        ctx.results["workflow_steps_per_s"] = round(rate, 1)
        ctx.results["ratio_to_raw"] = round(rate / raw, 3) if raw else None
        ctx.results["workflow_agents"] = n_agents
        if running == 0:
            ctx.results["workflow_note"] = "work ran out before the window ended"
        eng.dispose()


def _safe_count(engine: sa.Engine, sql: str) -> int:
    try:
        return count(engine, sql)
    except sa.exc.SQLAlchemyError:
        return 0  # the controller has not created its tables yet


async def scenario_heartbeats(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    async with stack(ctx, "heartbeats") as s:
        controller = s.start_controller()
        eng = s.engine()
        await wait_controller(s)
        async with rpc_client(s.mqtt_url, s.topics) as rpc:
            ids = await register_agents(rpc, sizes.heartbeat_agents, "hb")
            rounds = max(1, sizes.heartbeats // len(ids))
            sem = asyncio.Semaphore(1000)
            pending: set[asyncio.Task[None]] = set()

            async def send(agent_id: str, seq: int) -> None:
                try:
                    payload = encode(Heartbeat(agent_id=agent_id, seq=seq))
                    await rpc.client.publish(
                        s.topics.heartbeat(agent_id), payload, qos=1
                    )
                finally:
                    sem.release()

            started = time.monotonic()
            last_round_wall = 0.0
            for seq in range(rounds):
                if seq == rounds - 1:
                    last_round_wall = time.time()
                for agent_id in ids:
                    await sem.acquire()
                    task = asyncio.create_task(send(agent_id, seq))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        since = _utc(last_round_wall)
        seen_sql = (
            sa.select(sa.func.count())
            .select_from(Agent)
            .where(Agent.last_seen_at >= since)
        )

        def reflected() -> bool:
            with eng.connect() as conn:
                return int(conn.execute(seen_sql).scalar() or 0) >= len(ids)

        await wait_for(
            reflected,
            60,
            "every heartbeat reflected in the database",
            [controller],
        )
        elapsed = time.monotonic() - started
        ctx.results["heartbeats_per_s"] = round(rounds * len(ids) / elapsed, 1)
        ctx.results["heartbeats_sent"] = rounds * len(ids)
        eng.dispose()


async def wait_controller(s: Stack) -> None:
    """Until the controller answers a request (it has subscribed)."""
    assert s.controller is not None
    deadline = time.monotonic() + 60
    async with rpc_client(s.mqtt_url, s.topics) as rpc:
        while True:
            request = LookupRequest(
                request_id=rpc.new_id(), reply_to=rpc.reply_to, kind=LookupKind.KBS
            )
            try:
                await rpc.call(RpcMethod.LOOKUP, request, timeout_s=0.5)
                return
            except TimeoutError:
                if not s.controller.alive():
                    raise RuntimeError(
                        f"controller died:\n{s.controller.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the controller did not answer in 60s") from None


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def _paho_agent(mqtt_url: str, topics: Topics, agent_id: str, keepalive_s: int) -> Any:
    """A bare agent for presence faults: Will, online status, paho network thread."""
    import paho.mqtt.client as mqtt

    from schemas.bus import parse_mqtt_url

    host, port = parse_mqtt_url(mqtt_url)
    epoch = time.time_ns() // 1_000_000
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent_id)
    will = AgentStatus(
        agent_id=agent_id, state=AgentState.OFFLINE, reason="will", epoch=epoch
    )
    client.will_set(topics.status(agent_id), encode(will), qos=1, retain=True)
    client.connect(host, port, keepalive=keepalive_s)
    client.loop_start()
    online = AgentStatus(agent_id=agent_id, state=AgentState.ONLINE, epoch=epoch)
    client.publish(topics.status(agent_id), encode(online), qos=1, retain=True)
    return client


def _stop_network_threads(clients: dict[str, Any]) -> dict[str, float]:
    """Stops every client's paho thread at once (each takes up to 1 s to see
    it must stop; one after the other, the last agent's fault came seconds
    after the first's, and so did the start of the measurement); returns
    when each had stopped."""
    stopped: dict[str, float] = {}

    def stop(agent_id: str, client: Any) -> None:
        client.loop_stop()
        stopped[agent_id] = time.monotonic()

    threads = [threading.Thread(target=stop, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stopped


async def _offline_times(
    http_url: str, ids: list[str], faulted_at: dict[str, float], timeout_s: float
) -> list[float]:
    """Seconds from each agent's fault until the API shows it offline."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=http_url, timeout=5) as client:
        while len(seen) < len(ids) and time.monotonic() < deadline:
            response = await client.get("/api/v1/agents", params={"limit": 1000})
            now = time.monotonic()
            for agent in response.json():
                aid = agent["agent_id"]
                if (
                    aid in faulted_at
                    and aid not in seen
                    and agent["status"] == "offline"
                ):
                    seen[aid] = now - faulted_at[aid]
            await asyncio.sleep(0.02)
    if len(seen) < len(ids):
        raise RuntimeError(f"{len(ids) - len(seen)} agents never showed offline")
    return list(seen.values())


async def scenario_presence(ctx: BenchContext) -> None:
    sizes = ctx.sizes
    keepalive = sizes.keepalive_s
    async with stack(ctx, "presence") as s:
        s.start_controller()
        s.start_bridge()
        eng = s.engine()
        await wait_controller(s)
        await _wait_http(s.http_url)
        for kind in ("abrupt", "frozen"):
            async with rpc_client(s.mqtt_url, s.topics) as rpc:
                ids = await register_agents(rpc, sizes.presence_agents, kind)
            clients = {a: _paho_agent(s.mqtt_url, s.topics, a, keepalive) for a in ids}
            # Registration alone counts as online; wait for each connection's epoch.
            connected_sql = (
                "select count(*) from agents where status = 'online' and epoch > 0 "
                f"and id like '{kind}-%'"
            )
            await wait_for(
                functools.partial(at_least, eng, connected_sql, len(ids)),
                30,
                f"{kind} agents online",
            )
            # A frozen agent's fault is the moment its network thread is gone
            # (it sends nothing after that).
            faulted_at = await asyncio.to_thread(_stop_network_threads, clients)
            if kind == "abrupt":
                # Then close each socket without DISCONNECT, as a crash would:
                # well within 1.5 x keepalive of the threads' last packet.
                for aid, client in clients.items():
                    faulted_at[aid] = time.monotonic()
                    client.socket().close()
            times = await _offline_times(s.http_url, ids, faulted_at, 30)
            ctx.results[f"offline_{kind}_p99_s"] = round(percentile(times, 99), 3)
            ctx.results[f"offline_{kind}_p50_s"] = round(percentile(times, 50), 3)
        ctx.results["keepalive_s"] = keepalive
        eng.dispose()


async def _wait_http(http_url: str) -> None:
    async with httpx.AsyncClient(base_url=http_url, timeout=2) as client:

        async def ready() -> bool:
            try:
                return (await client.get("/api/v1/kbs")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(ready, 60, f"bridge at {http_url}")


async def scenario_longpoll(ctx: BenchContext) -> None:
    samples = ctx.sizes.longpoll_samples
    async with stack(ctx, "longpoll") as s:
        s.start_controller()
        s.start_bridge()
        await _wait_http(s.http_url)
        wake_ms: list[float] = []
        async with httpx.AsyncClient(base_url=s.http_url, timeout=40) as client:
            for i in range(samples):
                reg = await client.post(
                    "/api/v1/agent/register",
                    json={"hostname": f"lp-{i}", "ip_address": "127.0.0.1", "os": "x"},
                )
                agent_id = reg.json()["agent_id"]
                await client.post(
                    "/api/v1/agent/heartbeat", json={"agent_id": agent_id}
                )
                poll = asyncio.create_task(
                    client.get(
                        "/api/v1/agent/tasks",
                        params={"agent_id": agent_id, "timeout": 30},
                    )
                )
                # Let the poll park in the bridge before the trigger goes out.
                await asyncio.sleep(0.05)
                started = time.monotonic()
                trig = await client.post(
                    "/api/v1/internal/trigger_kb",
                    json={"agent_id": agent_id, "kb_id": "bench-echo-kb"},
                )
                if trig.status_code != 202:
                    raise RuntimeError(f"trigger: {trig.status_code} {trig.text}")
                response = await poll
                elapsed_ms = (time.monotonic() - started) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"long poll: {response.status_code}")
                wake_ms.append(elapsed_ms)
        ctx.results["longpoll_wake_p50_ms"] = round(percentile(wake_ms, 50), 2)
        ctx.results["longpoll_wake_p99_ms"] = round(percentile(wake_ms, 99), 2)


async def scenario_fleet(ctx: BenchContext) -> None:
    n = ctx.sizes.fleet_agents
    async with stack(ctx, "fleet") as s:
        controller = s.start_controller()
        eng = s.engine()
        await wait_controller(s)
        agents = s.start_agents(
            n, "--heartbeat-s", "10", "--keepalive-s", "30", "--ramp-per-s", "2000"
        )
        # Registration alone counts as online: wait for each connection's
        # status (epoch > 0), so the window below measures the steady state.
        online_sql = "select count(*) from agents where status = 'online' and epoch > 0"
        started = time.monotonic()
        await wait_for(
            lambda: count(eng, online_sql) >= n,
            max(60.0, n / 50),
            f"{n} agents online",
            [controller, agents],
        )
        ctx.results["fleet_connect_s"] = round(time.monotonic() - started, 1)
        proc = psutil.Process(controller.pid)
        proc.cpu_percent(None)
        await asyncio.sleep(ctx.sizes.fleet_window_s)
        ctx.results["controller_cpu_pct"] = round(proc.cpu_percent(None), 1)
        ctx.results["controller_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
        ctx.results["agents_connected"] = count(eng, online_sql)
        eng.dispose()


SCENARIOS: dict[str, Callable[[BenchContext], Awaitable[None]]] = {
    "workflow": scenario_workflow,
    "heartbeats": scenario_heartbeats,
    "presence": scenario_presence,
    "longpoll": scenario_longpoll,
    "fleet": scenario_fleet,
}

LABELS = {
    "raw_roundtrip_per_s": "raw round trips/s (ceiling)",
    "workflow_steps_per_s": "workflow steps/s",
    "ratio_to_raw": "ratio to raw",
    "heartbeats_per_s": "heartbeats/s into the database",
    "offline_abrupt_p99_s": "offline after abrupt close, p99 (s)",
    "offline_frozen_p99_s": "offline after freeze, p99 (s)",
    "keepalive_s": "keepalive (s)",
    "longpoll_wake_p50_ms": "long-poll wake p50 (ms)",
    "longpoll_wake_p99_ms": "long-poll wake p99 (ms)",
    "agents_connected": "agents connected",
    "controller_rss_mb": "controller RSS (MB)",
    "controller_cpu_pct": "controller CPU (% of a core)",
}


async def run_bench(ctx: BenchContext, only: list[str]) -> dict[str, Any]:
    ctx.results.update(
        broker=ctx.broker_kind if not ctx.mqtt_url else ctx.mqtt_url,
        db=ctx.db_kind if not ctx.db_url else ctx.db_url.split(":", 1)[0],
        python=platform.python_version(),
        cpus=os.cpu_count(),
    )
    errors: dict[str, str] = {}
    for name in only:
        with ctx.console.status(f"bench: {name} ..."):
            started = time.monotonic()
            try:
                await SCENARIOS[name](ctx)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                ctx.console.print(f"[red]{name} failed:[/] {errors[name]}")
            else:
                ctx.console.print(
                    f"[green]✔[/] {name} ({time.monotonic() - started:.1f}s)"
                )
    if errors:
        ctx.results["errors"] = errors
    return ctx.results


def report(results: dict[str, Any], console: Console) -> None:
    table = Table("figure", "value", "key", box=None)
    for key, label in LABELS.items():
        if key in results:
            table.add_row(label, str(results[key]), key)
    console.print(table)
    console.print(
        f"broker={results['broker']} db={results['db']} "
        f"python={results['python']} cpus={results['cpus']}"
    )


def main(
    *,
    quick: bool,
    json_path: Path | None,
    broker: str,
    db: str,
    mqtt_url: str | None,
    db_url: str | None,
    only: list[str],
    console: Console,
) -> int:
    if db == "postgres" and not db_url and not postgres_available():
        console.print("kbbus bench: PostgreSQL is not reachable; use --db sqlite")
        return 2
    with tempfile.TemporaryDirectory(prefix="kbbus-bench-") as tmp:
        ctx = BenchContext(
            broker_kind=broker,
            db_kind=db,
            sizes=Sizes.quick() if quick else Sizes.full(),
            workdir=Path(tmp),
            console=console,
            mqtt_url=mqtt_url,
            db_url=db_url,
        )
        results = asyncio.run(run_bench(ctx, only or list(SCENARIOS)))
    report(results, console)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        console.print(f"figures written to {json_path}")
    return 1 if results.get("errors") else 0
