"""Thousands of MQTT agents in one process, on one event loop.

aiomqtt costs a client, several tasks and an executor round trip per
connection; for 10,000 agents that is too much memory and too slow a connect.
Here each agent is a paho client driven by paho's external-loop API: its socket
is registered with the asyncio loop (``add_reader``/``add_writer``), one
fleet-wide timer calls ``loop_misc`` for keepalives, and the TCP connect is
done by the loop (``sock_connect``) before paho sends CONNECT, so nothing
blocks. Agents are callbacks and a few fields, not coroutines.

Each agent behaves like ``runtime.MqttAgent`` (same state file, epochs, Will,
registration, task rules from ``core``), plus chaos for presence tests:

- drop: close the socket without DISCONNECT (the broker publishes the Will);
- freeze: stop reading and pinging with the socket left open (the broker
  drops the client after 1.5 x keepalive and publishes the Will);
- restart: say goodbye cleanly and come back as a fresh process would.

Dropped and frozen agents come back after ``--chaos-down-s``.
"""

import asyncio
import contextlib
import logging
import random
import resource
import socket
import sys
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent_sim.core import AgentCore, Counters
from agent_sim.enrol import EnrolmentFailed, enrol, must_enrol
from agent_sim.runtime import local_address, os_name, runner_from
from agent_sim.settings import Settings
from agent_sim.store import AgentState, state_path
from agent_sim.trust import TrustStore
from agent_sim.wire import (
    Backoff,
    heartbeat_payload,
    now_ms,
    register_request,
    status_payload,
)
from schemas import MessageError, decode
from schemas.messages import RegisterReply
from schemas.topics import RpcMethod, Topics

log = logging.getLogger("kbbus.agent")

MISC_INTERVAL_S = 1.0
MAX_CONCURRENT_CONNECTS = 128
STOP_TIMEOUT_S = 10.0


class _PahoClient(mqtt.Client):
    """paho's client, handed a socket the event loop already connected.

    paho 2.2 connects with a blocking ``socket.create_connection``; overriding
    this (private, pinned-version) hook keeps the loop free. Revisit when paho
    is upgraded.
    """

    prepared: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.prepared = self.prepared, None
        if sock is None:
            raise OSError("no connected socket was prepared for paho")
        return sock


# paho callbacks, shared by every agent (the agent is the client's userdata), so
# no agent pays for bound methods.
def _on_socket_open(client: mqtt.Client, agent: "FleetAgent", sock: Any) -> None:
    agent.fleet.loop.add_reader(sock, client.loop_read)


def _on_socket_close(client: mqtt.Client, agent: "FleetAgent", sock: Any) -> None:
    agent.fleet.loop.remove_reader(sock)
    agent.fleet.loop.remove_writer(sock)


def _on_register_write(client: mqtt.Client, agent: "FleetAgent", sock: Any) -> None:
    if not agent.frozen:
        agent.fleet.want_write(agent)


def _on_unregister_write(client: mqtt.Client, agent: "FleetAgent", sock: Any) -> None:
    agent.fleet.loop.remove_writer(sock)


def _on_connect(
    client: mqtt.Client, agent: "FleetAgent", flags: Any, rc: Any, props: Any
) -> None:
    future = agent.connack
    if future is not None and not future.done():
        if rc.is_failure:
            future.set_exception(ConnectionError(f"CONNACK refused: {rc}"))
        else:
            future.set_result(None)


def _on_disconnect(
    client: mqtt.Client, agent: "FleetAgent", flags: Any, rc: Any, props: Any
) -> None:
    agent.on_disconnect(str(rc))


def _on_message(
    client: mqtt.Client, agent: "FleetAgent", msg: mqtt.MQTTMessage
) -> None:
    if msg.topic.endswith("/tasks"):
        agent.core.on_payload(bytes(msg.payload))
    elif "/replies/" in msg.topic:
        agent.on_reply(bytes(msg.payload))
    elif msg.topic == agent.fleet.keys_topic:
        # Every agent receives the retained set; the store checks it once.
        agent.fleet.trust.key_set(bytes(msg.payload))


def _on_publish(
    client: mqtt.Client, agent: "FleetAgent", mid: int, rc: Any, props: Any
) -> None:
    if mid == agent.offline_mid:
        # DISCONNECT only once the broker has the offline status: a broker that
        # is still answering the PUBLISH when the socket closes may lose it
        # (amqtt then also leaks the connection).
        agent.offline_mid = None
        client.disconnect()
    elif mid == agent.online_mid:
        agent.online_mid = None
        if agent.connected and not agent.online:
            agent.online = True
            agent.fleet.counters.online += 1
            if agent.fleet.counters.online >= agent.fleet.settings.count:
                agent.fleet.all_online.set()


class FleetAgent:
    """One simulated agent: a paho client, its state and its task core."""

    __slots__ = (
        "backoff",
        "client",
        "connack",
        "connected",
        "core",
        "down",
        "epoch",
        "fleet",
        "frozen",
        "heartbeat",
        "index",
        "offline_mid",
        "online",
        "online_mid",
        "register_id",
        "registered",
        "seq",
        "state",
        "stopping",
    )

    def __init__(self, fleet: "Fleet", index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.connected = False
        self.online = False
        self.registered = False
        self.frozen = False
        self.down = False
        self.stopping = False
        self.epoch = 0
        self.seq = 0
        self.online_mid: int | None = None
        self.offline_mid: int | None = None
        self.register_id: str | None = None
        self.connack: asyncio.Future[None] | None = None
        self.heartbeat: asyncio.TimerHandle | None = None
        self.backoff = Backoff(
            fleet.settings.reconnect_min_s, fleet.settings.reconnect_max_s, fleet.rng
        )
        self._load()

    def _load(self) -> None:
        """Read the state file and build the paho client: what a process start does."""
        settings = self.fleet.settings
        path = state_path(settings.state_dir, self.index)
        # A new agent's file is first written with its first epoch, off the loop.
        self.state = AgentState.load(
            path, max_finished=settings.max_finished
        ) or AgentState(path, str(uuid.uuid4()), max_finished=settings.max_finished)
        self.core = AgentCore(
            self.state,
            self.fleet.runner,
            self._send_result,
            counters=self.fleet.counters,
            seed=settings.seed,
            index=self.index,
            trust=self.fleet.trust,
        )
        client = _PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.state.agent_id,
            clean_session=False,
            userdata=self,
        )
        if self.state.mqtt_password is not None:
            client.username_pw_set(self.state.agent_id, self.state.mqtt_password)
        client.max_inflight_messages_set(settings.max_inflight)
        client.max_queued_messages_set(settings.max_queued)
        client.on_socket_open = _on_socket_open
        client.on_socket_close = _on_socket_close
        client.on_socket_register_write = _on_register_write
        client.on_socket_unregister_write = _on_unregister_write
        client.on_connect = _on_connect
        client.on_disconnect = _on_disconnect
        client.on_message = _on_message
        client.on_publish = _on_publish
        client.connect_async(
            settings.mqtt_host, settings.mqtt_port, settings.keepalive_s
        )
        self.client = client
        self.registered = False

    @property
    def agent_id(self) -> str:
        return self.state.agent_id

    # --- connecting -----------------------------------------------------------
    async def connect(self) -> None:
        """Connect once; on failure schedule the next attempt with backoff."""
        try:
            async with self.fleet.connecting:
                await self._connect()
        except (OSError, TimeoutError, ConnectionError) as exc:
            self._close_socket()
            self.schedule_reconnect(f"connect failed: {exc}")

    async def _connect(self) -> None:
        fleet, settings, topics = self.fleet, self.fleet.settings, self.fleet.topics
        if must_enrol(settings, self.state):
            try:
                await enrol(
                    settings,
                    topics,
                    self.state,
                    hostname=f"{settings.hostname}-sim-{self.index}",
                    ip_address=fleet.ip_address,
                    os_name=fleet.os_name,
                    trust=fleet.trust,
                )
            except EnrolmentFailed as exc:
                raise ConnectionError(str(exc)) from None
            assert self.state.mqtt_password is not None
            self.client.username_pw_set(self.agent_id, self.state.mqtt_password)
        # Written in the background: on a busy disk a rename takes up to tens
        # of ms, and awaiting it capped the connect rate at ~300/s. The cost:
        # if the process dies before the write lands *and* the host clock then
        # steps back, an epoch could repeat. runtime.MqttAgent, what real
        # machines run, writes its epoch before connecting.
        self.epoch = self.state.last_epoch = max(now_ms(), self.state.last_epoch + 1)
        fleet.spawn(self.state.persist())
        self.client.will_set(
            topics.status(self.agent_id),
            status_payload(self.agent_id, False, self.epoch, "will"),
            qos=1,
            retain=True,
        )
        family, addr = await fleet.address()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await fleet.loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.prepared = sock
        self.connack = fleet.loop.create_future()
        self.client.reconnect()
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await self.connack
        finally:
            self.connack = None
        self.connected = True
        fleet.counters.connected += 1
        fleet.counters.connects += 1
        fleet.note_connected()
        self.backoff.reset()
        self.client.subscribe(
            [
                (topics.tasks(self.agent_id), 1),
                (topics.reply(self.agent_id), 1),
                (fleet.keys_topic, 1),
            ]
        )
        if not self.registered:
            self.send_register()
            fleet.loop.call_later(
                settings.register_timeout_s, self.go_online, self.epoch
            )
        else:
            self.go_online(self.epoch)
        self.schedule_heartbeat(first=True)

    def send_register(self) -> None:
        request_id, payload = register_request(
            self.fleet.topics,
            self.agent_id,
            f"{self.fleet.settings.hostname}-sim-{self.index}",
            self.fleet.ip_address,
            self.fleet.os_name,
            mqtt_password=self.state.mqtt_password,
        )
        self.register_id = request_id
        self.client.publish(self.fleet.topics.rpc(RpcMethod.REGISTER), payload, qos=1)

    def on_reply(self, payload: bytes) -> None:
        try:
            reply = decode(RegisterReply, payload)
        except MessageError as exc:
            log.warning(
                "ignoring an invalid reply: agent_id=%s error=%s", self.agent_id, exc
            )
            return
        if reply.request_id != self.register_id:
            return
        self.register_id = None
        if reply.error is not None:
            log.error(
                "registration refused (%s: %s): agent_id=%s",
                reply.error.code,
                reply.error.message,
                self.agent_id,
            )
            return
        self.registered = True
        self.fleet.trust.registered(list(reply.signing_keys))
        self.go_online(self.epoch)

    def go_online(self, epoch: int) -> None:
        """Publish retained ``online`` once per connection (after registering,
        or when registration took too long)."""
        if not self.connected or epoch != self.epoch or self.online_mid is not None:
            return
        if self.online:
            return
        info = self.client.publish(
            self.fleet.topics.status(self.agent_id),
            status_payload(self.agent_id, True, epoch, "connected"),
            qos=1,
            retain=True,
        )
        self.online_mid = info.mid

    def on_disconnect(self, reason: str) -> None:
        was_connected = self.connected
        self.connected = False
        self.online_mid = None
        if was_connected:
            self.fleet.counters.connected -= 1
            if self.fleet.counters.connected == 0:
                self.fleet.none_connected.set()
        if self.online:
            self.online = False
            self.fleet.counters.online -= 1
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None
        if self.stopping or self.down or self.fleet.stopping:
            return
        self.schedule_reconnect(f"connection lost: {reason}")

    def schedule_reconnect(self, reason: str) -> None:
        if self.fleet.stopping or self.down:
            return
        delay = self.backoff.next_s()
        self.fleet.counters.reconnects += 1
        log.info(
            "%s; reconnecting in %.2fs: agent_id=%s attempt=%d",
            reason,
            delay,
            self.agent_id,
            self.backoff.attempt,
        )
        self.fleet.loop.call_later(delay, self.fleet.spawn, self.connect())

    def _close_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self.fleet.loop.remove_reader(sock)
            self.fleet.loop.remove_writer(sock)

    # --- heartbeats and keepalive -------------------------------------------
    def schedule_heartbeat(self, first: bool = False) -> None:
        interval = self.fleet.settings.heartbeat_s
        # The first one lands at a random point of the interval, so a fleet that
        # connected together does not heartbeat together.
        delay = interval * self.fleet.rng.random() if first else interval
        self.heartbeat = self.fleet.loop.call_later(delay, self.beat)

    def beat(self) -> None:
        self.heartbeat = None
        if not self.connected:
            return
        if not self.frozen:
            if not self.registered and self.register_id is None:
                self.send_register()
            self.seq += 1
            self.client.publish(
                self.fleet.topics.heartbeat(self.agent_id),
                heartbeat_payload(self.agent_id, self.seq, {}),
                qos=0,
            )
        self.schedule_heartbeat()

    def misc(self) -> None:
        if self.connected and not self.frozen:
            self.client.loop_misc()

    # --- results and goodbye ---------------------------------------------------
    def _send_result(self, payload: bytes) -> None:
        # paho queues it while disconnected (bounded by --max-queued) and sends
        # it after the reconnect; the stored copy covers the rest.
        self.client.publish(self.fleet.topics.results(self.agent_id), payload, qos=1)

    def goodbye(self) -> None:
        """Report a running task as interrupted, say offline, then DISCONNECT."""
        self.stopping = True
        interrupted = self.core.interrupt()
        if not self.connected or self.frozen:
            return
        if interrupted is not None:
            self._send_result(interrupted)
        info = self.client.publish(
            self.fleet.topics.status(self.agent_id),
            status_payload(self.agent_id, False, self.epoch, "shutdown"),
            qos=1,
            retain=True,
        )
        self.offline_mid = info.mid  # DISCONNECT follows its PUBACK

    # --- chaos ---------------------------------------------------------------
    def drop(self) -> None:
        """Close the socket without DISCONNECT: the broker publishes the Will."""
        sock = self.client.socket()
        if not self.connected or not isinstance(sock, socket.socket):
            return
        self.down = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        # paho reads EOF next and reports the disconnect.

    def freeze(self) -> None:
        """Stop reading, writing and pinging; the socket stays open."""
        sock = self.client.socket()
        if not self.connected or sock is None:
            return
        self.down = True
        self.frozen = True
        self.fleet.loop.remove_reader(sock)
        self.fleet.loop.remove_writer(sock)

    def restart(self) -> None:
        """A clean stop and a new start, as if the process restarted."""
        if not self.connected:
            return
        self.goodbye()
        self.fleet.loop.call_soon(self._start_again)

    def _start_again(self) -> None:
        if self.connected:  # DISCONNECT not written yet
            self.fleet.loop.call_later(0.05, self._start_again)
            return
        self._load()
        self.stopping = False
        self.fleet.spawn(self.connect())

    def recover(self) -> None:
        """End a drop or a freeze: read again (finding the broker gone) or reconnect."""
        self.down = False
        if self.frozen:
            self.frozen = False
            sock = self.client.socket()
            if sock is not None and self.connected:
                self.fleet.loop.add_reader(sock, self.client.loop_read)
                if self.client.want_write():
                    self.fleet.loop.add_writer(sock, self.client.loop_write)
                return
        if not self.connected and not self.fleet.stopping:
            self.fleet.spawn(self.connect())


class Fleet:
    """N agents, started at ``--ramp-per-s``, with a summary line and chaos."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.keys_topic = self.topics.controller_keys()
        #: One trust store for every agent of this process (one state dir).
        self.trust = TrustStore.load(settings.state_dir)
        self.counters = Counters()
        self.rng = random.Random(settings.seed)
        self.runner = runner_from(settings)
        self.agents: list[FleetAgent] = []
        self.stopping = False
        self.ip_address = local_address()
        self.os_name = os_name()
        self.started_at = 0.0
        #: Seconds from the start until every agent had connected once.
        self.all_connected_s: float | None = None
        self.all_connected = asyncio.Event()
        self.none_connected = asyncio.Event()
        self.all_online = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._address: tuple[int, tuple[str, int]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connecting = asyncio.Semaphore(MAX_CONCURRENT_CONNECTS)
        self._writers: list[FleetAgent] = []
        self._flush_scheduled = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the fleet is not running"
        return self._loop

    def want_write(self, agent: FleetAgent) -> None:
        """paho has bytes to send for ``agent``: send them on this loop pass.

        Registering a writer for every packet costs two epoll changes and a
        loop pass each; most packets fit the socket buffer at once, so write
        first and wait for writability only when the socket is full.
        """
        self._writers.append(agent)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        writers, self._writers = self._writers, []
        for agent in writers:
            client = agent.client
            if agent.frozen or client.socket() is None:
                continue
            client.loop_write()
            sock = client.socket()
            if sock is not None and client.want_write():
                self.loop.add_writer(sock, client.loop_write)

    async def address(self) -> tuple[int, tuple[str, int]]:
        if self._address is None:
            infos = await self.loop.getaddrinfo(
                self.settings.mqtt_host,
                self.settings.mqtt_port,
                type=socket.SOCK_STREAM,
            )
            family, _, _, _, addr = infos[0]
            self._address = (family, (str(addr[0]), int(addr[1])))
        return self._address

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def note_connected(self) -> None:
        if (
            self.all_connected_s is None
            and self.counters.connected >= self.settings.count
        ):
            self.all_connected_s = time.monotonic() - self.started_at
            self.all_connected.set()
            log.info(
                "all %d agents connected in %.2fs (%.0f connects/s)",
                self.settings.count,
                self.all_connected_s,
                self.settings.count / max(self.all_connected_s, 1e-9),
            )

    async def run(self) -> None:
        """Start the agents and run until cancelled; then stop them cleanly."""
        self._loop = asyncio.get_running_loop()
        raise_fd_limit(self.settings.count + 256)
        self.started_at = time.monotonic()
        background = [
            self.loop.create_task(self._misc()),
            self.loop.create_task(self._summary()),
            self.loop.create_task(self._chaos()),
        ]
        try:
            await self._ramp()
            await asyncio.Event().wait()
        finally:
            for task in background:
                task.cancel()
            await self.stop()

    async def _ramp(self) -> None:
        rate = self.settings.ramp_per_s
        for index in range(self.settings.count):
            if rate > 0:
                due = self.started_at + index / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            agent = FleetAgent(self, index)
            self.agents.append(agent)
            self.spawn(agent.connect())
            if index % 64 == 63:
                await asyncio.sleep(0)  # let connects and reads progress

    async def stop(self) -> None:
        """Every connected agent says goodbye; wait (bounded) for the DISCONNECTs."""
        self.stopping = True
        self.none_connected.clear()
        for task in list(self._tasks):
            task.cancel()
        for agent in self.agents:
            agent.goodbye()
        if self.counters.connected == 0:
            self.none_connected.set()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self.none_connected.wait()
        except TimeoutError:
            log.warning(
                "%d agents did not disconnect within %.0fs",
                self.counters.connected,
                STOP_TIMEOUT_S,
            )
        for agent in self.agents:
            sock = agent.client.socket()
            if sock is not None:
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
                sock.close()

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            for agent in self.agents:
                agent.misc()

    def summary(self) -> str:
        c = self.counters
        return (
            f"agents {c.connected}/{self.settings.count} connected, {c.online} online; "
            f"tasks {c.tasks_done} done, {c.tasks_failed} failed, "
            f"{c.duplicates} seen again, {c.expired} expired; "
            f"reconnects {c.reconnects}"
        )

    async def _summary(self) -> None:
        interval = self.settings.summary_interval_s
        if interval <= 0:
            return
        tty = sys.stderr.isatty()
        while True:
            await asyncio.sleep(interval)
            if tty:
                sys.stderr.write("\r" + self.summary() + "\033[K")
                sys.stderr.flush()
            else:
                log.info("%s", self.summary())

    async def _chaos(self) -> None:
        s = self.settings
        if s.chaos_every_s <= 0:
            return
        while True:
            await asyncio.sleep(s.chaos_every_s)
            up = [a for a in self.agents if a.connected and not a.down]
            picks = self.rng.sample(up, len(up))
            n_drop = round(len(up) * s.chaos_drop)
            n_freeze = round(len(up) * s.chaos_freeze)
            n_restart = round(len(up) * s.chaos_restart)
            dropped = picks[:n_drop]
            frozen = picks[n_drop : n_drop + n_freeze]
            restarted = picks[n_drop + n_freeze : n_drop + n_freeze + n_restart]
            for agent in dropped:
                agent.drop()
            for agent in frozen:
                agent.freeze()
            for agent in restarted:
                agent.restart()
            for agent in dropped + frozen:
                self.loop.call_later(s.chaos_down_s, agent.recover)
            log.info(
                "chaos: dropped %d, froze %d, restarted %d agents",
                len(dropped),
                len(frozen),
                len(restarted),
            )


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted``; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < wanted:
        log.warning(
            "open-file limit %d is below the %d this fleet needs; raise it "
            "(ulimit -n) or run fewer agents",
            soft,
            wanted,
        )
    return soft
