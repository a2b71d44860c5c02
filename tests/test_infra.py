"""The harness itself: each broker kind passes a retained message; databases open."""

import asyncio

import aiomqtt
import sqlalchemy as sa

from tests.support.infra import BrokerHandle


async def test_broker_keeps_retained_message(broker: BrokerHandle) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="pub") as pub:
        await pub.publish("t/retained", b"hello", qos=1, retain=True)
    async with aiomqtt.Client(broker.host, broker.port, identifier="sub") as sub:
        await sub.subscribe("t/#", qos=1)
        async with asyncio.timeout(5):
            async for message in sub.messages:
                assert message.payload == b"hello"
                assert message.retain
                break


def test_database_opens(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1
    engine.dispose()
