"""Fan-out of controller events to Server-Sent Events clients.

Each client owns a bounded queue; a client too slow to keep up loses events
(counted) rather than making the bridge buffer without bound. The hub tells
its owner when the first client arrives and the last one leaves, so the
bridge follows ``{root}/events/#`` only while somebody watches.
"""

import asyncio
from collections.abc import Callable

from schemas.messages import Event

QUEUE_SIZE = 1000


class EventFeed:
    """One client's view: its queue and optional filters."""

    def __init__(self, agent_id: str | None, workflow_id: str | None) -> None:
        self.agent_id = agent_id
        self.workflow_id = workflow_id
        # None is the end-of-stream mark put by ``EventHub.close``.
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)

    def wants(self, event: Event) -> bool:
        if self.agent_id is not None and event.agent_id != self.agent_id:
            return False
        return self.workflow_id is None or event.workflow_id == self.workflow_id


class EventHub:
    def __init__(
        self,
        on_first: Callable[[], None],
        on_last: Callable[[], None],
        on_drop: Callable[[], None],
    ) -> None:
        self._feeds: set[EventFeed] = set()
        self._on_first = on_first
        self._on_last = on_last
        self._on_drop = on_drop
        self.closed = False

    @property
    def client_count(self) -> int:
        return len(self._feeds)

    def open(self, agent_id: str | None, workflow_id: str | None) -> EventFeed:
        feed = EventFeed(agent_id, workflow_id)
        if self.closed:
            feed.queue.put_nowait(None)
            return feed
        self._feeds.add(feed)
        if len(self._feeds) == 1:
            self._on_first()
        return feed

    def close_feed(self, feed: EventFeed) -> None:
        if feed in self._feeds:
            self._feeds.discard(feed)
            if not self._feeds:
                self._on_last()

    def publish(self, event: Event) -> None:
        for feed in self._feeds:
            if not feed.wants(event):
                continue
            try:
                feed.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._on_drop()

    def close(self) -> None:
        """End every stream (the bridge is stopping)."""
        self.closed = True
        for feed in self._feeds:
            # Make room for the end mark in a full queue: the client is
            # leaving anyway.
            while feed.queue.full():
                feed.queue.get_nowait()
            feed.queue.put_nowait(None)
