"""The bridge's one MQTT connection: subscriptions, dispatch, publishes.

Every HTTP request shares this connection. It follows the agents' retained
task topics (the long-poll board), their retained status topics (which agents
exist), the bridge's own reply topic, and the event stream while somebody
watches it. The session is clean: after a reconnect the broker sends every
retained task again, so nothing here needs to survive a disconnect.
"""

import asyncio
import logging

import aiomqtt

from bridge_http.board import TaskBoard
from bridge_http.errors import BusUnavailable
from bridge_http.events import EventHub
from bridge_http.metrics import BridgeMetrics
from bridge_http.rpc import ReplyRouter
from schemas import KbbusError, decode
from schemas.bus import BusClient, parse_mqtt_url, redact_url
from schemas.messages import Event, Task
from schemas.topics import AgentChannel, Topics

log = logging.getLogger("kbbus.bridge")

KEEPALIVE_S = 30
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
# Bounded so that a broker that stops acknowledging turns into 503s, not into
# memory growth.
MAX_INFLIGHT = 200
MAX_QUEUED_OUT = 10_000


class Bus:
    def __init__(
        self,
        url: str,
        client_id: str,
        topics: Topics,
        board: TaskBoard,
        router: ReplyRouter,
        metrics: BridgeMetrics,
    ) -> None:
        parse_mqtt_url(url)  # a bad URL fails at start, not at first connect
        self.url = url
        #: What logs and error messages may show: no password.
        self.shown_url = redact_url(url)
        self.client_id = client_id
        self.topics = topics
        self.reply_topic = topics.reply(client_id)
        self._tasks_filter = topics.all_agents(AgentChannel.TASKS)
        self._status_filter = topics.all_agents(AgentChannel.STATUS)
        self._events_filter = topics.events_filter()
        self._keys_topic = topics.controller_keys()
        #: The controller's signing key set as last published (retained), for
        #: HTTP agents that meet a task signed by a key they do not know yet.
        self.controller_keys: bytes | None = None
        self._board = board
        self._router = router
        self._metrics = metrics
        self._client: aiomqtt.Client | None = None
        self._hub: EventHub | None = None
        self._follow_events = False
        self._background: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    def attach_events(self, hub: EventHub) -> None:
        self._hub = hub

    # --- connection loop ---------------------------------------------------
    async def run(self) -> None:
        """Stay connected until cancelled, reconnecting with backoff."""
        delay = RECONNECT_MIN_S
        while True:
            try:
                async with self._new_client() as client:
                    # Set before subscribing so that follow_events() during
                    # the subscribe calls is not lost.
                    self._client = client
                    await self._subscribe_all(client)
                    self._set_connected(True)
                    delay = RECONNECT_MIN_S
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if self.connected.is_set():
                    log.warning("lost the broker at %s: %s", self.shown_url, exc)
                else:
                    log.warning(
                        "cannot reach the broker at %s: %s", self.shown_url, exc
                    )
            except Exception:
                # A bug in handling one message must not leave the bridge
                # disconnected for good: start over with a fresh session.
                log.exception("MQTT loop failed; reconnecting")
            finally:
                self._client = None
                if self.connected.is_set():
                    self._set_connected(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _new_client(self) -> BusClient:
        return BusClient(
            self.url,
            self.client_id,
            clean_session=True,
            keepalive=KEEPALIVE_S,
            logger=logging.getLogger("kbbus.bridge.mqtt"),
            max_inflight=MAX_INFLIGHT,
            max_queued_outgoing=MAX_QUEUED_OUT,
        )

    async def _subscribe_all(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self._tasks_filter, qos=1)
        # Retained status messages list every registered agent; QoS 0 is
        # enough, a miss only costs one look-up request later.
        await client.subscribe(self._status_filter, qos=0)
        await client.subscribe(self.reply_topic, qos=1)
        await client.subscribe(self._keys_topic, qos=1)
        if self._follow_events:
            await client.subscribe(self._events_filter, qos=0)

    def _set_connected(self, up: bool) -> None:
        self._metrics.mqtt_connected.set(1 if up else 0)
        if up:
            self.connected.set()
            log.info(
                "connected to the broker at %s as %s", self.shown_url, self.client_id
            )
        else:
            self.connected.clear()
            self._board.forget_tasks()
            self._router.fail_all(
                "The bridge lost its connection to the MQTT broker; retry shortly."
            )

    # --- incoming ------------------------------------------------------------
    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        try:
            if topic.value == self.reply_topic:
                self._router.resolve(bytes(payload))
            elif topic.matches(self._tasks_filter):
                self._on_task(topic.value, bytes(payload))
            elif topic.matches(self._status_filter):
                if payload:
                    self._board.note_agent(
                        self.topics.parse_agent(topic.value).agent_id
                    )
            elif topic.value == self._keys_topic:
                # Kept as published: agents verify its signatures themselves.
                self.controller_keys = bytes(payload) or None
            elif self._follow_events and topic.matches(self._events_filter):
                self._on_event(bytes(payload))
            else:
                # amqtt hands a new client retained messages of topics it
                # never subscribed to; they are none of our business.
                self._metrics.mqtt_messages.labels("other", "ignored").inc()
        except KbbusError as exc:
            self._metrics.mqtt_messages.labels("other", "rejected").inc()
            log.warning("message on %s rejected: %s", topic.value, exc)

    def _on_task(self, topic: str, payload: bytes) -> None:
        agent_id = self.topics.parse_agent(topic).agent_id
        if not payload:
            self._board.set_task(agent_id, None)
            self._metrics.mqtt_messages.labels("task", "cleared").inc()
            return
        task = decode(Task, payload)
        if task.agent_id != agent_id:
            self._metrics.mqtt_messages.labels("task", "rejected").inc()
            log.warning(
                "task_id=%s for agent_id=%s found on the topic of agent_id=%s; ignored",
                task.task_id,
                task.agent_id,
                agent_id,
            )
            return
        self._metrics.mqtt_messages.labels("task", "accepted").inc()
        self._board.set_task(agent_id, task)

    def _on_event(self, payload: bytes) -> None:
        if self._hub is not None:
            self._hub.publish(decode(Event, payload))

    # --- outgoing ------------------------------------------------------------
    async def publish(
        self, topic: str, payload: bytes, *, qos: int, timeout_s: float
    ) -> None:
        """Publish; with QoS 1 return only once the broker acknowledged it."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise BusUnavailable(
                f"The bridge is not connected to the MQTT broker at {self.shown_url}; "
                "retry shortly."
            )
        try:
            await client.publish(topic, payload, qos=qos, timeout=timeout_s)
        except aiomqtt.MqttError as exc:
            log.warning("publish on %s failed: %s", topic, exc)
            raise BusUnavailable(
                f"The MQTT broker did not accept the message within {timeout_s:g} s "
                f"({exc}); retry shortly."
            ) from None

    def follow_events(self, on: bool) -> None:
        """Subscribe to or leave ``{root}/events/#`` (from sync callbacks)."""
        self._follow_events = on
        client = self._client
        if client is None:
            return  # _subscribe_all picks the flag up on connect
        task = asyncio.ensure_future(self._change_events(client, on))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _change_events(self, client: aiomqtt.Client, on: bool) -> None:
        try:
            if on:
                await client.subscribe(self._events_filter, qos=0)
            else:
                await client.unsubscribe(self._events_filter)
        except aiomqtt.MqttError as exc:
            # The reconnect path subscribes again from the flag.
            log.warning("events subscription change failed: %s", exc)
