"""The ceiling for ``kbbus bench``: request/echo round trips on the raw broker.

A requester publishes QoS 1 requests on per-agent topics; a responder in another
process echoes each one QoS 1; the requester counts replies. ``concurrency``
agents each keep one request in flight, as the controller keeps one task in
flight per agent, so the figure is directly comparable with workflow steps.
"""

import argparse
import asyncio
import contextlib
import time

from schemas.bus import BusClient

PREFIX = "kbbus-bench/raw"


def _client(url: str, identifier: str) -> BusClient:
    return BusClient(url, identifier)


async def responder(url: str, ready: asyncio.Event | None = None) -> None:
    """Echo every request on its agent's reply topic until cancelled."""
    pending: set[asyncio.Task[None]] = set()
    async with _client(url, "bench-raw-responder") as client:
        await client.subscribe(f"{PREFIX}/+/req", qos=1)
        if ready:
            ready.set()
        print("ready", flush=True)
        async for message in client.messages:
            agent = str(message.topic).split("/")[-2]
            task = asyncio.create_task(
                client.publish(f"{PREFIX}/{agent}/resp", message.payload, qos=1)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)


async def requester(url: str, concurrency: int, duration_s: float) -> float:
    """Round trips per second over ``duration_s`` with ``concurrency`` agents."""
    waiters: dict[str, asyncio.Future[None]] = {}
    count = 0
    async with _client(url, "bench-raw-requester") as client:
        await client.subscribe(f"{PREFIX}/+/resp", qos=1)

        async def receive() -> None:
            async for message in client.messages:
                agent = str(message.topic).split("/")[-2]
                fut = waiters.pop(agent, None)
                if fut and not fut.done():
                    fut.set_result(None)

        async def agent_loop(agent: str, stop_at: float) -> None:
            nonlocal count
            loop = asyncio.get_running_loop()
            while time.monotonic() < stop_at:
                fut: asyncio.Future[None] = loop.create_future()
                waiters[agent] = fut
                await client.publish(f"{PREFIX}/{agent}/req", b"x" * 200, qos=1)
                await asyncio.wait_for(fut, 10)
                count += 1

        receiver = asyncio.create_task(receive())
        # Warm up, then measure.
        await asyncio.gather(
            *(agent_loop(f"a{i}", time.monotonic() + 1.0) for i in range(concurrency))
        )
        count = 0
        started = time.monotonic()
        await asyncio.gather(
            *(agent_loop(f"a{i}", started + duration_s) for i in range(concurrency))
        )
        elapsed = time.monotonic() - started
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mqtt-url", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(responder(args.mqtt_url))


if __name__ == "__main__":
    main()
