"""A TCP proxy for network faults: clients connect to it, it connects onwards.

``cut()`` freezes the link the way a pulled cable or a dead NAT entry does:
every socket stays open but nothing is forwarded either way, and new
connections are accepted and then left hanging. Neither side sees a FIN or a
RST, so only keepalives (MQTT's PINGREQ) can notice. ``restore()`` drops the
frozen connections (the data they held is gone, as it would be) and forwards
new ones again.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tests.support.infra import free_port

CHUNK_BYTES = 64 * 1024


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pumps: list["asyncio.Task[None]"] = field(default_factory=list)

    def close(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                # abort(): no FIN, the data held is dropped; close() as well,
                # or the StreamWriter warns that it was never closed.
                writer.transport.abort()
                writer.close()


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        # Every task of ours (connection handlers and pumps), so stop() can
        # end them all before the event loop goes away.
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Connections accepted since the proxy started (reconnects show here).
        self.accepted = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return not self._flowing.is_set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        self._links.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _track(self, task: "asyncio.Task[None]") -> "asyncio.Task[None]":
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cut(self) -> None:
        """Stop forwarding; hold every socket open, old and new."""
        self._flowing.clear()

    def restore(self) -> None:
        """Drop the frozen connections and forward again."""
        for link in list(self._links):
            link.close()
        self._links.clear()
        self._flowing.set()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        current = asyncio.current_task()
        if current is not None:
            self._track(current)
        link = _Link(writer)
        self._links.add(link)
        try:
            # A connection made during a cut hangs until the cut ends, like a
            # SYN answered by nobody (restore() then aborts it).
            await self._flowing.wait()
            if link not in self._links:
                return  # dropped by restore() while it hung
            up_reader, up_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except (OSError, asyncio.CancelledError):
            link.close()
            self._links.discard(link)
            return
        link.upstream = up_writer
        if link not in self._links:  # restore() came while we connected
            link.close()
            return
        link.pumps = [
            self._track(asyncio.create_task(self._pump(reader, up_writer, link))),
            self._track(asyncio.create_task(self._pump(up_reader, writer, link))),
        ]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                # Frozen: bytes read during a cut are held, never delivered
                # (restore() aborts the link before they could be).
                await self._flowing.wait()
                if link not in self._links:
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if link in self._links and not self.is_cut:
                self._links.discard(link)
                link.close()


@contextlib.asynccontextmanager
async def tcp_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_host, target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
