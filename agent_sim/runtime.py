"""One MQTT agent: what a real machine runs (``python -m agent_sim``).

Each connection: a new epoch (stored first), a Last Will saying ``offline``
with that epoch, CONNECT with the agent id as client id and a persistent
session, subscriptions to its task topic and its reply topic, registration
(once per process), a retained ``online`` status, then heartbeats until the
link drops or the agent is stopped. On stop it reports a running task as
interrupted and publishes ``offline`` (reason ``shutdown``) before DISCONNECT,
because a clean DISCONNECT suppresses the Will.
"""

import asyncio
import logging
import os
import platform
import socket
import uuid
from contextlib import suppress

import aiomqtt

from agent_sim.actions import ActionRunner
from agent_sim.core import AgentCore, Counters
from agent_sim.enrol import enrol, must_enrol
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
from schemas.bus import BusClient, redact_url
from schemas.messages import RegisterReply
from schemas.topics import RpcMethod, Topics

log = logging.getLogger("kbbus.agent")

GOODBYE_TIMEOUT_S = 3.0


def runner_from(settings: Settings) -> ActionRunner:
    return ActionRunner(
        exec_real=settings.exec,
        allow=settings.exec_allowed,
        latency_ms=settings.latency_ms,
        latency_dist=settings.latency_dist,
        fail_rate=settings.fail_rate,
        action_timeout_s=settings.action_timeout_s,
        cleanup_dirs=settings.cleanup_dirs,
    )


def local_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def os_name() -> str:
    return f"{platform.system()} {platform.release()}".strip()


class MqttAgent:
    """One agent over MQTT, reconnecting until cancelled."""

    def __init__(
        self, settings: Settings, index: int = 0, counters: Counters | None = None
    ) -> None:
        self.settings = settings
        self.index = index
        self.topics = Topics(settings.topic_root)
        self.counters = counters or Counters()
        self.state = AgentState.load_or_create(
            state_path(settings.state_dir, index),
            str(uuid.uuid4()),
            max_finished=settings.max_finished,
        )
        self.trust = TrustStore.load(settings.state_dir)
        self.core = AgentCore(
            self.state,
            runner_from(settings),
            self._send_result,
            counters=self.counters,
            seed=settings.seed,
            index=index,
            trust=self.trust,
        )
        self.registered = False
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[RegisterReply]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def agent_id(self) -> str:
        return self.state.agent_id

    async def run(self) -> None:
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        try:
            while True:
                try:
                    if must_enrol(self.settings, self.state):
                        await enrol(
                            self.settings,
                            self.topics,
                            self.state,
                            hostname=self.settings.hostname,
                            ip_address=local_address(),
                            os_name=os_name(),
                            trust=self.trust,
                        )
                    epoch = self.state.next_epoch(now_ms())
                    async with self._connect(epoch) as client:
                        self.counters.connects += 1
                        backoff.reset()
                        await self._session(client, epoch)
                    reason = "the session ended"
                except aiomqtt.MqttError as exc:
                    reason = str(exc)
                finally:
                    self._client = None
                delay = backoff.next_s()
                self.counters.reconnects += 1
                log.warning(
                    "connection to %s failed or lost (%s); reconnecting in %.2fs: "
                    "agent_id=%s attempt=%d",
                    redact_url(self.settings.mqtt_url),
                    reason,
                    delay,
                    self.agent_id,
                    backoff.attempt,
                )
                await asyncio.sleep(delay)
        finally:
            # Stopped while disconnected: the task is stored as interrupted and
            # answered so when it is redelivered.
            self.core.interrupt()

    def _connect(self, epoch: int) -> aiomqtt.Client:
        will = aiomqtt.Will(
            self.topics.status(self.agent_id),
            status_payload(self.agent_id, False, epoch, "will"),
            qos=1,
            retain=True,
        )
        return BusClient(
            self.settings.mqtt_url,
            self.agent_id,
            # Its own account once enrolled; anonymous on an open broker.
            username=self.agent_id if self.state.mqtt_password else None,
            password=self.state.mqtt_password,
            clean_session=False,
            keepalive=self.settings.keepalive_s,
            will=will,
            timeout=self.settings.connect_timeout_s,
            max_inflight=self.settings.max_inflight,
            max_queued_outgoing=self.settings.max_queued,
            max_queued_incoming_messages=self.settings.max_queued,
        )

    async def _session(self, client: aiomqtt.Client, epoch: int) -> None:
        self._client = client
        reader = asyncio.create_task(self._read(client))
        try:
            await client.subscribe(
                [
                    (self.topics.tasks(self.agent_id), 1),
                    (self.topics.reply(self.agent_id), 1),
                    (self.topics.controller_keys(), 1),
                ]
            )
            await self._register(client)
            await client.publish(
                self.topics.status(self.agent_id),
                status_payload(self.agent_id, True, epoch, "connected"),
                qos=1,
                retain=True,
            )
            log.info("online: agent_id=%s epoch=%d", self.agent_id, epoch)
            await self._heartbeats(client, reader)
        except asyncio.CancelledError:
            await self._goodbye(client, epoch)
            raise
        finally:
            reader.cancel()
            with suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader

    async def _heartbeats(
        self, client: aiomqtt.Client, reader: asyncio.Task[None]
    ) -> None:
        seq = 0
        while True:
            await asyncio.wait({reader}, timeout=self.settings.heartbeat_s)
            if reader.done():
                reader.result()  # raises what ended the connection
                raise aiomqtt.MqttError("the message reader stopped")
            if not self.registered:
                await self._register(client)
            seq += 1
            metrics = {"load1": os.getloadavg()[0]} if hasattr(os, "getloadavg") else {}
            await client.publish(
                self.topics.heartbeat(self.agent_id),
                heartbeat_payload(self.agent_id, seq, metrics),
                qos=0,
            )

    async def _read(self, client: aiomqtt.Client) -> None:
        tasks_topic = self.topics.tasks(self.agent_id)
        reply_topic = self.topics.reply(self.agent_id)
        keys_topic = self.topics.controller_keys()
        async for message in client.messages:
            payload = message.payload
            data = (
                payload if isinstance(payload, bytes) else str(payload or "").encode()
            )
            if message.topic.value == tasks_topic:
                self.core.on_payload(data)
            elif message.topic.value == reply_topic:
                self._on_reply(message.topic.value, data)
            elif message.topic.value == keys_topic:
                self.trust.key_set(data)
            else:
                # amqtt 0.12 sometimes hands a client messages it never
                # subscribed to (its own status); they are not for us.
                log.debug(
                    "ignoring a message on %s: agent_id=%s",
                    message.topic.value,
                    self.agent_id,
                )

    # --- registration -------------------------------------------------------
    async def _register(self, client: aiomqtt.Client) -> None:
        if self.registered:
            return
        request_id, payload = register_request(
            self.topics,
            self.agent_id,
            self.settings.hostname,
            local_address(),
            os_name(),
            mqtt_password=self.state.mqtt_password,
        )
        future: asyncio.Future[RegisterReply] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        try:
            await client.publish(self.topics.rpc(RpcMethod.REGISTER), payload, qos=1)
            async with asyncio.timeout(self.settings.register_timeout_s):
                reply = await future
        except TimeoutError:
            log.warning(
                "no answer to registration within %.1fs, will retry: agent_id=%s",
                self.settings.register_timeout_s,
                self.agent_id,
            )
            return
        finally:
            self._pending.pop(request_id, None)
        if reply.error is not None:
            log.error(
                "registration refused (%s: %s): agent_id=%s",
                reply.error.code,
                reply.error.message,
                self.agent_id,
            )
            return
        self.registered = True
        self.trust.registered(list(reply.signing_keys))
        log.info("registered: agent_id=%s", self.agent_id)

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            reply = decode(RegisterReply, payload)
        except MessageError as exc:
            log.warning(
                "ignoring an invalid reply: agent_id=%s topic=%s error=%s",
                self.agent_id,
                topic,
                exc,
            )
            return
        future = self._pending.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)

    # --- results and goodbye ---------------------------------------------------
    def _send_result(self, payload: bytes) -> None:
        client = self._client
        if client is None:
            # Stored already: the retained task comes back on reconnect and is
            # answered from the state file.
            return
        task = asyncio.create_task(self._publish_result(client, payload))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _publish_result(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            await client.publish(self.topics.results(self.agent_id), payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.info(
                "result not sent (%s); it is sent again when the task is redelivered: "
                "agent_id=%s",
                exc,
                self.agent_id,
            )

    async def _goodbye(self, client: aiomqtt.Client, epoch: int) -> None:
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                interrupted = self.core.interrupt()
                if interrupted is not None:
                    await client.publish(
                        self.topics.results(self.agent_id), interrupted, qos=1
                    )
                if self._sending:
                    await asyncio.wait(self._sending)
                await client.publish(
                    self.topics.status(self.agent_id),
                    status_payload(self.agent_id, False, epoch, "shutdown"),
                    qos=1,
                    retain=True,
                )
            log.info("offline (shutdown): agent_id=%s epoch=%d", self.agent_id, epoch)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning(
                "could not say goodbye (%s); the Will marks us offline: agent_id=%s",
                exc,
                self.agent_id,
            )
