"""The embedded amqtt broker under churn: clients connecting while others
subscribe, unsubscribe and vanish are all heard, and get no retained message
they did not subscribe to."""

import asyncio
import contextlib
import uuid

import aiomqtt

from schemas.bus import BusClient
from tests.support.infra import BrokerHandle

CLIENTS = 40
RETAINED = 200


async def _churn(url: str, stop: asyncio.Event) -> int:
    """Subscribe and unsubscribe new filters as fast as the broker answers:
    amqtt's subscription table changes all the time."""
    changes = 0
    async with BusClient(url, f"churn-{uuid.uuid4().hex[:8]}") as client:
        while not stop.is_set():
            topic = f"churn/{changes}/#"
            await client.subscribe(topic, qos=1)
            await client.unsubscribe(topic)
            changes += 1
    return changes


async def _newcomer(url: str, index: int, leaked: list[str]) -> None:
    async with BusClient(url, f"newcomer-{index}-{uuid.uuid4().hex[:6]}") as client:
        await client.publish(f"heard/{index}", b"hello", qos=1)
        # Anything delivered without a subscription is a leak; give the broker
        # a moment to send what it would.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                async for message in client.messages:
                    leaked.append(message.topic.value)


async def test_newcomers_are_heard_during_churn_and_get_no_foreign_retained(
    amqtt_broker: BrokerHandle,
) -> None:
    url = amqtt_broker.url
    heard: set[str] = set()
    leaked: list[str] = []
    async with (
        BusClient(url, "watcher") as watcher,
        BusClient(url, "holder") as holder,
    ):
        await watcher.subscribe("heard/+", qos=1)
        # A retained message under a filter somebody holds: amqtt's connect
        # loop used to send it to every newcomer, suspending in mid-iteration.
        await asyncio.gather(
            *(
                holder.publish(f"retained/{i}", b"old", qos=1, retain=True)
                for i in range(RETAINED)
            )
        )
        await holder.subscribe("retained/#", qos=1)

        async def listen() -> None:
            async for message in watcher.messages:
                heard.add(message.topic.value)
                if len(heard) == CLIENTS:
                    return

        listening = asyncio.create_task(listen())
        stop = asyncio.Event()
        churns = [asyncio.create_task(_churn(url, stop)) for _ in range(3)]
        try:
            await asyncio.gather(*(_newcomer(url, i, leaked) for i in range(CLIENTS)))
            async with asyncio.timeout(10):
                await listening
        except TimeoutError:
            unheard = set(range(CLIENTS)) - {int(t.split("/")[1]) for t in heard}
            raise AssertionError(f"newcomers never heard: {sorted(unheard)}") from None
        finally:
            stop.set()
            listening.cancel()
            changes = await asyncio.gather(*churns, return_exceptions=True)
        assert all(isinstance(c, int) and c > 0 for c in changes), changes
    assert leaked == []


async def test_a_subscription_still_gets_the_retained_message(
    amqtt_broker: BrokerHandle,
) -> None:
    url = amqtt_broker.url
    async with BusClient(url, "publisher") as publisher:
        await publisher.publish("kept/one", b"kept", qos=1, retain=True)
    async with BusClient(url, "subscriber") as subscriber:
        await subscriber.subscribe("kept/+", qos=1)
        async with asyncio.timeout(5):
            message: aiomqtt.Message = await anext(subscriber.messages)
    assert (message.topic.value, message.payload, message.retain) == (
        "kept/one",
        b"kept",
        True,
    )
