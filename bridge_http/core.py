"""The bridge's parts wired together: one bus, one board, one RPC client."""

import asyncio
import contextlib
import logging
import secrets

from bridge_http.auth import Auth, RateLimiter
from bridge_http.board import TaskBoard
from bridge_http.bus import Bus
from bridge_http.errors import ControllerRefused
from bridge_http.events import EventHub
from bridge_http.metrics import BridgeMetrics
from bridge_http.rpc import ReplyRouter, RpcClient
from bridge_http.settings import Settings
from schemas.messages import ErrorCode, LookupKind, LookupReply, LookupRequest
from schemas.topics import RpcMethod, Topics

log = logging.getLogger("kbbus.bridge")


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.metrics = BridgeMetrics()
        self.board = TaskBoard()
        self.auth = Auth(settings)
        self.register_limit = RateLimiter(
            settings.register_rate_per_s, settings.register_burst
        )
        self.router = ReplyRouter(self.metrics)
        client_id = settings.client_id or f"kbbus-bridge-{secrets.token_hex(6)}"
        self.bus = Bus(
            settings.mqtt_url,
            client_id,
            self.topics,
            self.board,
            self.router,
            self.metrics,
        )
        self.rpc = RpcClient(
            self.bus,
            self.router,
            {m: self.topics.rpc(m) for m in RpcMethod},
            self.bus.reply_topic,
            settings.request_timeout_s,
            self.metrics,
        )
        self.hub = EventHub(
            on_first=lambda: self.bus.follow_events(True),
            on_last=lambda: self.bus.follow_events(False),
            on_drop=self.metrics.sse_dropped.inc,
        )
        self.bus.attach_events(self.hub)
        self.metrics.waiters.set_function(lambda: self.board.waiter_count)
        self.metrics.sse_clients.set_function(lambda: self.hub.client_count)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.bus.run(), name="kbbus-bridge-bus"),
            asyncio.create_task(self._sweep_waiters(), name="kbbus-bridge-sweep"),
        ]

    async def _sweep_waiters(self) -> None:
        # One pass over every parked poll per interval, instead of a timer
        # per poll: a vanished client is freed within disconnect_check_s.
        while True:
            await asyncio.sleep(self.settings.disconnect_check_s)
            self.board.sweep()

    def release_clients(self) -> None:
        """Answer parked long polls and end event streams, before shutdown."""
        self.board.release_all()
        self.hub.close()

    async def stop(self) -> None:
        self.release_clients()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def require_agent(self, agent_id: str) -> None:
        """Return if the agent exists; raise ControllerRefused(404) if not.

        Known agents come free from the retained status topics; only an id
        not seen there costs a look-up request.
        """
        if self.board.knows(agent_id):
            return
        reply = await self.rpc.call(
            RpcMethod.LOOKUP,
            LookupRequest,
            LookupReply,
            kind=LookupKind.AGENT,
            id=agent_id,
        )
        if not reply.agents:
            raise ControllerRefused(
                ErrorCode.NOT_FOUND, f"No agent with agent_id {agent_id!r}."
            )
        self.board.note_agent(agent_id)
