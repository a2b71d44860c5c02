"""The controller process: the bus on one side, the database on the other.

One MQTT connection (clean session off, a stable client id) carries everything.
Incoming messages are handled in arrival order by one consumer, a batch at a
time, each kind in as few transactions as is safe:

- heartbeats are coalesced per agent and written every ``heartbeat_flush_ms``
  (or sooner when many agents are waiting), in two statements;
- status messages and results are applied a batch per transaction; a batch
  that fails is replayed one message per transaction, so one bad message
  cannot hold back the others;
- result batches overlap: the consumer takes the next one while the database
  works on the last (a few at most), publishing and acknowledging them in
  arrival order; a status or request waits until every earlier result is in;
- requests get one transaction each and a reply on their ``reply_to``.

QoS 1 messages are acknowledged to the broker only after the transaction that
holds their effect has committed, and the publishes a transaction asked for are
made only after that commit too. Timers run beside the consumer: the engine's
tick and the presence sweep. After a lost broker connection everything tied to
it stops, and a new connection starts over: re-subscribe (the broker replays
the retained statuses, which are idempotent here), republish dispatched tasks
(``Engine.reconcile``), carry on.
"""

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import aiomqtt
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from controller.effects import Publish
from controller.engine import Engine, EngineError
from controller.kb import KBCatalog
from controller.metrics import Metrics
from controller.presence import (
    HeartbeatBuffer,
    Outcome,
    Touched,
    Transition,
    apply_status,
    sweep,
    touch,
    transition_effects,
)
from controller.registry import count_active, count_by_status
from controller.results import ResultsOutcome
from controller.rpc import Call, Rejected, Rpc, RpcError, refusal, reply_publish
from controller.settings import Settings
from controller.signing import Keyring, TaskSealer, agent_http_token
from controller.store import BACKOFF_MAX_S, Store, is_unavailable, upgrade
from schemas.bus import BusClient, redact_url
from schemas.codec import decode, encode
from schemas.errors import MessageError, TopicError
from schemas.messages import (
    AgentState,
    AgentStatus,
    ErrorCode,
    Heartbeat,
    RegisterReply,
    Reply,
    TaskResult,
    utcnow,
)
from schemas.topics import AgentChannel, Topics

log = logging.getLogger("kbbus.controller")
mqtt_log = logging.getLogger("kbbus.controller.mqtt")

T = TypeVar("T")
M = TypeVar("M", AgentStatus, Heartbeat, TaskResult)

STATUS = AgentChannel.STATUS.value
HEARTBEAT = AgentChannel.HEARTBEAT.value
RESULTS = AgentChannel.RESULTS.value
RPC = "rpc"
OTHER = "other"
# Result batches whose transactions may run at once. More than one lets the
# consumer take the next batch while the database works on the last one;
# each batch is applied with compare-and-set, so batches that touch the same
# workflow (a resent result) serialise by retrying, never by double effects.
RESULT_BATCHES_IN_FLIGHT = 3


class _Once:
    """Remembers recently seen keys, so a repeated complaint is logged once."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._keys: OrderedDict[object, None] = OrderedDict()
        self._capacity = capacity

    def first(self, key: object) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return True


def _incoming_queue(limit: int, metrics: Metrics) -> type[asyncio.Queue[Any]]:
    """aiomqtt's incoming queue, bounded for QoS 0 messages only.

    A QoS 1 message dropped here would never be acknowledged and would hold
    one of the broker's in-flight slots for this session until we reconnect;
    the broker's in-flight window already bounds them. QoS 0 (heartbeats) has
    no such bound, so beyond ``limit`` queued messages those are dropped.
    """

    class IncomingQueue(asyncio.Queue[aiomqtt.Message]):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__()

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if item.qos == 0 and self.qsize() >= limit:
                metrics.dropped.inc()
                return
            super().put_nowait(item)

    return IncomingQueue


class Publisher:
    """Publishes effects in order, many in flight at once (bounded).

    aiomqtt hands a publish to paho before its first ``await``, and tasks start
    in creation order, so packets leave in the order given even though their
    PUBACKs are awaited concurrently.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        max_inflight: int,
        sent: Callable[[str], None] = lambda topic: None,
    ) -> None:
        self._client = client
        self._sent = sent
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.lost = 0

    async def publish(self, effects: Iterable[Publish]) -> None:
        for effect in effects:
            await self._slots.acquire()
            task = asyncio.create_task(self._send(effect))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, effect: Publish) -> None:
        try:
            await self._client.publish(
                effect.topic, effect.payload, qos=effect.qos, retain=effect.retain
            )
            self._sent(effect.topic)
        except aiomqtt.MqttError as exc:
            # The connection is gone; what mattered is committed, and the next
            # connection republishes tasks (reconcile). Events may be lost.
            self.lost += 1
            if self.lost == 1:
                mqtt_log.warning(
                    "publishes lost with the connection, first: topic=%s error=%s",
                    effect.topic,
                    exc,
                )
        finally:
            self._slots.release()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class Controller:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        engine: Engine,
        catalog: KBCatalog,
        metrics: Metrics,
        keyring: Keyring | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.topics = Topics(settings.topic_root)
        self.rpc = Rpc(
            self.topics,
            engine,
            catalog,
            settings.enrolment(),
            mosquitto_dynsec=settings.mosquitto_dynsec,
        )
        self._filters = {
            self.topics.all_agents(AgentChannel.STATUS): STATUS,
            self.topics.all_agents(AgentChannel.HEARTBEAT): HEARTBEAT,
            self.topics.all_agents(AgentChannel.RESULTS): RESULTS,
            self.topics.rpc_filter(): RPC,
        }
        self._logged = _Once()
        #: Set while connected: the consumer's client and its publisher.
        self._client: BusClient | None = None
        self._pub: Publisher | None = None
        self._heartbeats = HeartbeatBuffer(settings.heartbeat_flush_size)
        self._flush_lock = asyncio.Lock()
        self._connected_at = 0.0
        #: Set while connected: where result batches run, their bound, and the
        #: last one started (each publishes and acks after the one before).
        self._session_tasks: asyncio.TaskGroup | None = None
        self._result_slots = asyncio.Semaphore(RESULT_BATCHES_IN_FLIGHT)
        self._results_tail: asyncio.Task[None] | None = None
        self._keyring = keyring
        self._sealer = TaskSealer(self.topics, keyring) if keyring else None

    # --- connection ------------------------------------------------------------

    def _new_client(self) -> BusClient:
        s = self.settings
        return BusClient(
            s.mqtt_url,
            s.client_id,
            # Ack only after commit: the broker keeps (and, Mosquitto, resends)
            # a QoS 1 message we crashed on before committing its effect.
            manual_ack=True,
            max_inflight=s.max_inflight_publishes,
            # A persistent session: messages for us while we restart are kept.
            clean_session=False,
            keepalive=s.mqtt_keepalive_s,
            queue_type=_incoming_queue(s.max_queued_incoming, self.metrics),
            logger=mqtt_log,
        )

    async def serve(self) -> None:
        """Stay connected to the broker and process messages; until cancelled."""
        delay = self.settings.reconnect_min_s
        while True:
            error: BaseException | None = None
            try:
                async with self._new_client() as client:
                    log.info(
                        "connected to broker %s as client_id=%s",
                        redact_url(self.settings.mqtt_url),
                        self.settings.client_id,
                    )
                    delay = self.settings.reconnect_min_s
                    await self._session(client)
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]
            except* Exception as group:
                error = group.exceptions[0]
                log.error("controller session failed", exc_info=error)
            finally:
                self.metrics.mqtt_connected.set(0)
                self._client = None
                if self._pub is not None:
                    self._pub.cancel()
                    self._pub = None
            log.warning(
                "broker connection lost or refused (%s); reconnecting in %.1fs",
                error,
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _session(self, client: BusClient) -> None:
        self._client = client
        self._pub = Publisher(
            client,
            self.settings.max_inflight_publishes,
            lambda topic: self.metrics.published.labels(self.topics.kind(topic)).inc(),
        )
        self._heartbeats = HeartbeatBuffer(self.settings.heartbeat_flush_size)
        for topic_filter in self._filters:
            await client.subscribe(topic_filter, qos=1)
        self._connected_at = time.monotonic()
        self.metrics.mqtt_connected.set(1)
        # Before any task: an agent meets a new key in the set first.
        await self._announce_keys(client)
        await self._reconcile()
        self._result_slots = asyncio.Semaphore(RESULT_BATCHES_IN_FLIGHT)
        self._results_tail = None
        async with asyncio.TaskGroup() as tasks:
            self._session_tasks = tasks
            if self._keyring is not None:
                tasks.create_task(
                    self._every(self.settings.signing_key_check_s, self._check_keys)
                )
            tasks.create_task(self._consume(client))
            tasks.create_task(self._every(self._heartbeat_flush_s, self._flush))
            tasks.create_task(self._every(self.settings.sweep_interval_s, self._sweep))
            tasks.create_task(self._every(self.settings.tick_interval_s, self._tick))

    @property
    def _heartbeat_flush_s(self) -> float:
        return self.settings.heartbeat_flush_ms / 1000

    async def _every(self, interval_s: float, job: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception as exc:
                # A timer must outlive one bad round; the next may succeed.
                if self._logged.first((job.__name__, type(exc))):
                    log.error("%s failed (logged once)", job.__name__, exc_info=exc)

    async def _publish(self, effects: Sequence[Publish]) -> None:
        self.metrics.committed(effects)
        if effects and self._pub is not None:
            if self._sealer is not None:
                effects = self._sealer.seal(effects)
            await self._pub.publish(effects)

    def _ack(self, messages: Iterable[object]) -> None:
        client = self._client
        if client is None:
            return
        for message in messages:
            assert isinstance(message, aiomqtt.Message)
            client.ack(message)

    # --- the consumer ----------------------------------------------------------

    async def _consume(self, client: BusClient) -> None:
        messages = client.messages
        async for first in messages:
            batch = [first]
            while len(batch) < self.settings.batch_size and len(messages) > 0:
                batch.append(await anext(messages))
            for channel, group in itertools.groupby(batch, key=self._channel):
                await self._handle(channel, list(group))

    def _channel(self, message: aiomqtt.Message) -> str:
        for topic_filter, channel in self._filters.items():
            if message.topic.matches(topic_filter):
                return channel
        return OTHER

    async def _handle(self, channel: str, group: list[aiomqtt.Message]) -> None:
        self.metrics.processed.labels(channel).inc(len(group))
        if channel not in (RESULTS, HEARTBEAT):
            # Statuses and requests see every earlier result committed, as
            # if results were applied one batch at a time (a trigger after a
            # workflow's last result finds its agent idle).
            await self._results_applied()
        if channel == HEARTBEAT:
            await self._on_heartbeats(group)
        elif channel == STATUS:
            # A heartbeat still buffered must not land after an offline status
            # that followed it on the bus (it would revive a dead agent).
            await self._flush()
            await self._on_statuses(group)
        elif channel == RESULTS:
            await self._on_results(group)
        elif channel == RPC:
            for message in group:
                await self._on_request(message)
        else:
            # Not one of our subscriptions: amqtt 0.12 sends a connecting client
            # the retained messages of every other client's subscriptions too
            # (agents' tasks, say). Not garbage, and not for us.
            mqtt_log.debug(
                "ignored %d messages outside our subscriptions, first on %s",
                len(group),
                group[0].topic.value,
            )
            self._ack(group)

    def _decode(
        self, message: aiomqtt.Message, model: type[M], channel: str
    ) -> tuple[str, M]:
        topic = message.topic.value
        try:
            agent_id = self.topics.parse_agent(topic).agent_id
        except TopicError as exc:
            raise Rejected("bad_topic", str(exc)) from None
        if not message.payload:
            raise Rejected("empty", f"empty payload on {topic}", agent_id=agent_id)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray | str):
            raise Rejected("schema", f"unexpected payload type on {topic}")
        try:
            parsed = decode(model, payload)
        except MessageError as exc:
            raise Rejected(exc.reason, str(exc), agent_id=agent_id) from None
        if parsed.agent_id != agent_id:
            raise Rejected(
                "agent_mismatch",
                f"payload names agent {parsed.agent_id!r}, the topic {agent_id!r}",
                agent_id=agent_id,
            )
        return agent_id, parsed

    def _reject(self, rejected: Rejected, channel: str) -> None:
        self.metrics.reject(rejected.reason, channel)
        if rejected.reason == "unknown_agent":
            if self._logged.first(("unknown", rejected.agent_id)):
                log.warning(
                    "message from an unregistered agent rejected: agent_id=%s "
                    "channel=%s (logged once per agent)",
                    rejected.agent_id,
                    channel,
                )
            return
        if self._logged.first((rejected.reason, channel, rejected.agent_id)):
            log.warning(
                "message rejected: reason=%s channel=%s agent_id=%s: %s",
                rejected.reason,
                channel,
                rejected.agent_id,
                rejected,
            )

    # --- heartbeats ----------------------------------------------------------

    async def _on_heartbeats(self, group: list[aiomqtt.Message]) -> None:
        now = utcnow()
        accepted = 0
        for message in group:
            try:
                agent_id, _ = self._decode(message, Heartbeat, HEARTBEAT)
            except Rejected as rejected:
                self._reject(rejected, HEARTBEAT)
                self._ack([message])
                continue
            self._heartbeats.add(agent_id, now, message if message.qos else None)
            accepted += 1
        self.metrics.heartbeat_messages.inc(accepted)
        if self._heartbeats.full():
            await self._flush()

    async def _flush(self) -> None:
        """Write the buffered heartbeats in one transaction."""
        async with self._flush_lock:
            buffer = self._heartbeats
            seen, acks = buffer.take()
            if not seen:
                self._ack(acks)
                return
            started = time.perf_counter()
            touched, effects = await self.store.run(lambda s: self._touch(s, seen))
            elapsed = time.perf_counter() - started
            self.metrics.heartbeat_flush_seconds.observe(elapsed)
            self.metrics.batch(HEARTBEAT, len(seen), elapsed)
            self.metrics.heartbeats.inc(touched.updated)
            for agent_id in touched.unknown:
                self._reject(
                    Rejected("unknown_agent", "not registered", agent_id=agent_id),
                    HEARTBEAT,
                )
            self._log_transitions(touched.revived)
            await self._publish(effects)
            if buffer is self._heartbeats:
                self._ack(acks)

    def _touch(
        self, session: Session, seen: dict[str, datetime]
    ) -> tuple[Touched, list[Publish]]:
        now = utcnow()
        touched = touch(session, seen, now)
        return touched, self._transition_effects(session, touched.revived, now)

    def _transition_effects(
        self, session: Session, transitions: Sequence[Transition], now: datetime
    ) -> list[Publish]:
        effects: list[Publish] = []
        for transition in transitions:
            effects += transition_effects(self.topics, transition)
        online = [t.agent_id for t in transitions if t.state is AgentState.ONLINE]
        if online:
            effects += self.engine.agents_online(session, online, now)
        return effects

    def _log_transitions(self, transitions: Iterable[Transition]) -> None:
        for t in transitions:
            self.metrics.transitions.labels(t.state.value, t.reason).inc()
            log.info(
                "agent %s: agent_id=%s reason=%s epoch=%d%s",
                t.state.value,
                t.agent_id,
                t.reason,
                t.epoch,
                " (reconnected)" if t.reconnect else "",
            )

    # --- status messages -------------------------------------------------------

    async def _on_statuses(self, group: list[aiomqtt.Message]) -> None:
        items: list[tuple[aiomqtt.Message, AgentStatus]] = []
        for message in group:
            try:
                items.append((message, self._decode(message, AgentStatus, STATUS)[1]))
            except Rejected as rejected:
                self._reject(rejected, STATUS)
                self._ack([message])

        def work(
            session: Session, batch: list[tuple[aiomqtt.Message, AgentStatus]]
        ) -> tuple[list[tuple[Outcome, Transition | None]], list[Publish]]:
            now = utcnow()
            outcomes = [apply_status(session, status, now) for _, status in batch]
            applied = [t for _, t in outcomes if t is not None]
            return outcomes, self._transition_effects(session, applied, now)

        for batch, result in await self._in_batches(STATUS, items, work):
            if isinstance(result, BaseException):
                for _, status in batch:
                    self._failed(STATUS, status.agent_id, result)
            else:
                outcomes, effects = result
                for (_, status), (outcome, transition) in zip(
                    batch, outcomes, strict=True
                ):
                    self._status_outcome(status, outcome, transition)
                await self._publish(effects)
            self._ack(m for m, _ in batch)

    def _status_outcome(
        self, status: AgentStatus, outcome: Outcome, transition: Transition | None
    ) -> None:
        if transition is not None:
            self._log_transitions([transition])
        elif outcome is Outcome.UNKNOWN:
            self._reject(
                Rejected("unknown_agent", "not registered", agent_id=status.agent_id),
                STATUS,
            )
        elif outcome is Outcome.STALE and status.state is AgentState.OFFLINE:
            log.info(
                "stale offline status ignored: agent_id=%s epoch=%d reason=%s "
                "(from an earlier connection)",
                status.agent_id,
                status.epoch,
                status.reason,
            )

    def _failed(self, channel: str, agent_id: str | None, exc: BaseException) -> None:
        """A message whose transaction failed for a reason other than the database
        being away: dropped (and acknowledged), so it cannot block the others."""
        self.metrics.reject("internal", channel)
        log.error(
            "message dropped after an error: channel=%s agent_id=%s",
            channel,
            agent_id,
            exc_info=exc,
        )

    async def _in_batches(
        self, channel: str, items: list[T], work: Callable[[Session, list[T]], Any]
    ) -> list[tuple[list[T], Any]]:
        """``work`` on all items in one transaction; if that fails, on each alone.

        Returns ``(items, result or exception)`` pairs.
        """
        if not items:
            return []
        try:
            started = time.perf_counter()
            result = await self.store.run(lambda s: work(s, items))
            self.metrics.batch(channel, len(items), time.perf_counter() - started)
            return [(items, result)]
        except Exception as exc:
            if len(items) == 1:
                return [(items, exc)]
        out: list[tuple[list[T], Any]] = []
        for item in items:
            one = [item]

            def single(session: Session, one: list[T] = one) -> Any:
                return work(session, one)

            try:
                out.append((one, await self.store.run(single)))
            except Exception as exc:
                out.append((one, exc))
        return out

    # --- results ---------------------------------------------------------------

    async def _on_results(self, group: list[aiomqtt.Message]) -> None:
        """Start applying a group of results; returns once it is under way."""
        items: list[tuple[aiomqtt.Message, str, TaskResult]] = []
        for message in group:
            try:
                agent_id, result = self._decode(message, TaskResult, RESULTS)
            except Rejected as rejected:
                self._reject(rejected, RESULTS)
                self._ack([message])
                continue
            items.append((message, agent_id, result))
        if not items:
            return
        assert self._session_tasks is not None
        await self._result_slots.acquire()
        try:
            self._results_tail = self._session_tasks.create_task(
                self._apply_results(items, self._results_tail)
            )
        except BaseException:
            self._result_slots.release()
            raise

    async def _apply_results(
        self,
        items: list[tuple[aiomqtt.Message, str, TaskResult]],
        previous: "asyncio.Task[None] | None",
    ) -> None:
        def work(
            session: Session, batch: list[tuple[aiomqtt.Message, str, TaskResult]]
        ) -> ResultsOutcome:
            results = [(agent_id, result) for _, agent_id, result in batch]
            return self.engine.handle_results(session, results, utcnow())

        try:
            # One transaction for the whole group: refused results come back
            # one by one in the outcome; only an unexpected error replays the
            # group one result per transaction.
            outcomes = await self._in_batches(RESULTS, items, work)
            if previous is not None:
                # Publishes and acks in arrival order, whatever committed first.
                await asyncio.wait([previous])
            for batch, outcome in outcomes:
                if isinstance(outcome, BaseException):
                    self._failed(RESULTS, batch[0][1], outcome)
                else:
                    for index, exc in outcome.rejected:
                        agent_id = batch[index][1]
                        self._reject(
                            Rejected(exc.code, str(exc), agent_id=agent_id), RESULTS
                        )
                    self._duplicates([batch[i][2] for i in outcome.ignored])
                    await self._publish(outcome.effects)
                self._ack(m for m, _, _ in batch)
        finally:
            self._result_slots.release()

    async def _results_applied(self) -> None:
        """Wait until every result batch started so far is committed and acked."""
        tail = self._results_tail
        if tail is not None and not tail.done():
            await asyncio.wait([tail])

    def _duplicates(self, results: list[TaskResult]) -> None:
        """Count results that changed nothing (replayed, or after a timeout).

        Normal after a reconnect (agents answer republished tasks again), so
        counted, not warned about.
        """
        for result in results:
            self.metrics.reject("duplicate", RESULTS)
            mqtt_log.debug(
                "result for an ended attempt ignored: agent_id=%s task_id=%s",
                result.agent_id,
                result.task_id,
            )

    # --- requests ----------------------------------------------------------------

    async def _on_request(self, message: aiomqtt.Message) -> None:
        started = time.perf_counter()
        payload = message.payload
        try:
            if not isinstance(payload, bytes | bytearray):
                raise Rejected("schema", "request payload is not bytes")
            call = self.rpc.parse(message.topic.value, bytes(payload))
        except Rejected as rejected:
            self._reject(rejected, RPC)
            if rejected.answer is not None:
                answer = rejected.answer
                await self._publish([reply_publish(answer.reply_to, answer.reply)])
            self._ack([message])
            return
        effects = await self._answer(call)
        await self._publish(effects)
        self._ack([message])
        self.metrics.rpc_seconds.labels(call.method.value).observe(
            time.perf_counter() - started
        )

    async def _answer(self, call: Call) -> list[Publish]:
        """The publishes for a request: its effects, then its reply."""
        reply_to = call.request.reply_to
        try:
            outcome = await self.store.run(self.rpc.work(call, utcnow()))
        except (RpcError, EngineError) as exc:
            if isinstance(exc, RpcError) and exc.code is ErrorCode.UNAUTHORIZED:
                self._refused_enrolment(call)
            return [reply_publish(reply_to, refusal(call, exc))]
        except Exception as exc:
            log.error(
                "request failed: method=%s request_id=%s",
                call.method.value,
                call.request.request_id,
                exc_info=exc,
            )
            return [reply_publish(reply_to, refusal(call, exc))]
        reg = outcome.registration
        if reg is not None:
            log.info(
                "agent registered: agent_id=%s hostname=%s new=%s",
                reg.agent.agent_id,
                reg.agent.hostname,
                reg.created,
            )
        self._log_transitions(outcome.transitions)
        return [
            *outcome.effects,
            reply_publish(reply_to, self._credentials(outcome.reply)),
        ]

    def _credentials(self, reply: Reply) -> Reply:
        """A registration reply with the signing keys and the HTTP token."""
        if not isinstance(reply, RegisterReply) or reply.agent is None:
            return reply
        update: dict[str, Any] = {}
        if self._keyring is not None:
            update["signing_keys"] = self._keyring.signing_keys()
        secret = self.settings.agent_secret
        token = agent_http_token(
            secret.get_secret_value() if secret else None, reply.agent.agent_id
        )
        if token is not None:
            credentials = {**(reply.agent.credentials or {}), "http_token": token}
            update["agent"] = reply.agent.model_copy(
                update={"credentials": credentials}
            )
        return reply.model_copy(update=update) if update else reply

    # --- signing keys ------------------------------------------------------------

    async def _announce_keys(self, client: BusClient) -> None:
        """Publish the key set, retained, signed by each of its keys."""
        if self._keyring is None:
            return
        await client.publish(
            self.topics.controller_keys(),
            encode(self._keyring.key_set()),
            qos=1,
            retain=True,
        )
        log.info(
            "signing keys published: active=%s keys=%s",
            self._keyring.active_key_id,
            ",".join(self._keyring.key_ids),
        )

    async def _check_keys(self) -> None:
        """Pick up keys rotated or retired in the key directory meanwhile."""
        assert self._keyring is not None
        assert self._sealer is not None
        fresh = await asyncio.to_thread(self._keyring.reload)
        if fresh is None:
            return
        log.info(
            "signing keys changed on disk: active=%s (was %s)",
            fresh.active_key_id,
            self._keyring.active_key_id,
        )
        self._keyring = fresh
        client = self._client
        if client is not None:
            # Announced before the sealer switches: no task signed by the new
            # key is published before the set that names it.
            await self._announce_keys(client)
        self._sealer.keyring = fresh

    def _refused_enrolment(self, call: Call) -> None:
        # Counted and logged without what was sent: it may be a secret.
        self.metrics.reject("unauthorized", RPC)
        agent_id = getattr(call.request, "agent_id", None)
        if self._logged.first(("unauthorized", agent_id)):
            log.warning(
                "registration refused: no valid enrolment token or agent password: "
                "agent_id=%s (logged once per agent id)",
                agent_id,
            )

    # --- timers ----------------------------------------------------------------

    async def _sweep(self) -> None:
        """Mark offline the agents silent for longer than ``offline_after_s``."""
        offline_after_s = self.settings.offline_after_s
        # Heartbeats sent while we were away were lost (QoS 0): give every
        # agent a full interval to be heard from again before judging it.
        if time.monotonic() - self._connected_at < offline_after_s:
            return
        await self._flush()
        started = time.perf_counter()

        def work(
            session: Session,
        ) -> tuple[list[Transition], dict[str, int], dict[str, int]]:
            transitions = sweep(session, utcnow(), offline_after_s)
            return transitions, count_by_status(session), count_active(session)

        transitions, counts, workflows = await self.store.run(work)
        self.metrics.set_agent_counts(counts)
        self.metrics.set_workflow_counts(workflows)
        self._log_transitions(transitions)
        effects: list[Publish] = []
        for transition in transitions:
            effects += transition_effects(self.topics, transition)
        await self._publish(effects)
        self.metrics.sweep_seconds.observe(time.perf_counter() - started)

    async def _tick(self) -> None:
        effects = await self.store.run(lambda s: self.engine.tick(s, utcnow()))
        await self._publish(effects)

    async def _reconcile(self) -> None:
        """Republish every dispatched task; an agent may have missed one."""

        def work(session: Session) -> tuple[list[Publish], dict[str, int]]:
            return self.engine.reconcile(session, utcnow()), count_by_status(session)

        try:
            effects, counts = await self.store.run(work)
        except Exception as exc:
            log.error("reconcile failed; tasks were not republished", exc_info=exc)
            return
        self.metrics.set_agent_counts(counts)
        if effects:
            log.info("republished %d retained task messages", len(effects))
        await self._publish(effects)


async def _upgrade(db_url: str) -> None:
    """Migrate the schema, waiting for a database that is not up yet."""
    delay = 0.2
    while True:
        try:
            await asyncio.to_thread(upgrade, db_url)
            return
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning(
                "database unavailable for migrations, retrying in %.1fs: %s",
                delay,
                getattr(exc, "orig", exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)


async def run(settings: Settings, *, metrics: Metrics | None = None) -> None:
    """Run the controller until cancelled."""
    metrics = metrics or Metrics()
    await _upgrade(settings.db_url)
    catalog = KBCatalog.load(*([settings.kb_dir] if settings.kb_dir else []))
    keyring: Keyring | None = None
    if settings.sign_tasks:
        keyring = await asyncio.to_thread(Keyring.load, settings.signing_key_dir)
    else:
        log.warning(
            "task signing is OFF (--no-sign-tasks): agents without keys run "
            "whatever is published on their task topic"
        )
    engine = Engine(catalog, Topics(settings.topic_root))
    store = Store(settings.db_url)
    stop_metrics = (
        metrics.serve(settings.metrics_host, settings.metrics_port)
        if settings.metrics_port
        else None
    )
    log.info(
        "controller starting: client_id=%s db=%s kbs=%d signing_key=%s",
        settings.client_id,
        make_url(settings.db_url).render_as_string(hide_password=True),
        len(catalog.kbs),
        keyring.active_key_id if keyring else "off",
    )
    try:
        await Controller(settings, store, engine, catalog, metrics, keyring).serve()
    finally:
        if stop_metrics is not None:
            stop_metrics()
        await asyncio.to_thread(store.close)
        log.info("controller stopped")
