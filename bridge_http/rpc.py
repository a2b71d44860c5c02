"""Requests to the controller over ``{root}/rpc/{method}``, replies by id.

MQTT 3.1.1 has no response topic, so each request names the bridge's own
reply topic and a fresh ``request_id``; the reply is matched back to the
waiting future by that id. A request that gets no reply within the deadline
fails with ``ControllerTimeout`` (503 over HTTP) instead of hanging.
"""

import asyncio
import logging
import time
import uuid
from typing import Any, Protocol, TypeVar

from bridge_http.errors import BusUnavailable, ControllerRefused, ControllerTimeout
from bridge_http.metrics import BridgeMetrics
from schemas import MessageError, decode, encode
from schemas.messages import Reply, Request
from schemas.topics import RpcMethod

log = logging.getLogger("kbbus.bridge")

Req = TypeVar("Req", bound=Request)
Rep = TypeVar("Rep", bound=Reply)


class Publisher(Protocol):
    async def publish(
        self, topic: str, payload: bytes, *, qos: int, timeout_s: float
    ) -> None: ...


class ReplyRouter:
    """Futures of requests in flight, keyed by request id."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._metrics = metrics

    def expect(self, request_id: str) -> "asyncio.Future[bytes]":
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def resolve(self, payload: bytes) -> None:
        try:
            reply = decode(Reply, payload)
        except MessageError as exc:
            self._metrics.mqtt_messages.labels("reply", "rejected").inc()
            log.warning("reply rejected: %s", exc)
            return
        future = self._pending.pop(reply.request_id, None)
        if future is None or future.done():
            # Late: its requester already gave up and answered 503.
            self._metrics.mqtt_messages.labels("reply", "late").inc()
            return
        self._metrics.mqtt_messages.labels("reply", "accepted").inc()
        future.set_result(payload)

    def fail_all(self, message: str) -> None:
        """The connection dropped: no reply can arrive on this session."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BusUnavailable(message))
        self._pending.clear()

    @property
    def in_flight(self) -> int:
        return len(self._pending)


class RpcClient:
    def __init__(
        self,
        publisher: Publisher,
        router: ReplyRouter,
        topics_rpc: dict[RpcMethod, str],
        reply_to: str,
        timeout_s: float,
        metrics: BridgeMetrics,
    ) -> None:
        self._publisher = publisher
        self._router = router
        self._topics_rpc = topics_rpc
        self._reply_to = reply_to
        self._timeout_s = timeout_s
        self._metrics = metrics

    async def call(
        self,
        method: RpcMethod,
        request_cls: type[Req],
        reply_cls: type[Rep],
        **fields: Any,
    ) -> Rep:
        """Send a request and return its reply; raise if refused or unanswered.

        ``fields`` must already be valid for ``request_cls``: the HTTP layer
        validated them, so a failure here is a bug, not bad input.
        """
        request_id = uuid.uuid4().hex
        request = request_cls(request_id=request_id, reply_to=self._reply_to, **fields)
        started = time.perf_counter()
        deadline = started + self._timeout_s
        future = self._router.expect(request_id)
        try:
            await self._publisher.publish(
                self._topics_rpc[method],
                encode(request),
                qos=1,
                timeout_s=self._timeout_s,
            )
            remaining = max(deadline - time.perf_counter(), 0.0)
            try:
                async with asyncio.timeout(remaining):
                    payload = await future
            except TimeoutError:
                self._metrics.rpc_timeouts.labels(method.value).inc()
                log.warning(
                    "controller did not answer method=%s request_id=%s within %.1fs",
                    method.value,
                    request_id,
                    self._timeout_s,
                )
                raise ControllerTimeout(method.value, self._timeout_s) from None
        finally:
            self._router.forget(request_id)
            if future.done() and not future.cancelled():
                # Failed by a disconnect while the publish was still out:
                # mark the exception seen, the publish raised its own.
                future.exception()
        self._metrics.rpc_latency.labels(method.value).observe(
            time.perf_counter() - started
        )
        try:
            reply = decode(reply_cls, payload)
        except MessageError as exc:
            log.warning("bad %s reply request_id=%s: %s", method.value, request_id, exc)
            raise ControllerRefused.malformed(f"{method.value} reply") from None
        if reply.error is not None:
            raise ControllerRefused(reply.error.code, reply.error.message)
        return reply
