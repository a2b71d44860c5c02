"""A minimal MQTT agent as a real process, for presence tests (SIGKILL, SIGSTOP).

``python -m tests.support.mini_agent --url mqtt://host:port --agent-id ID``
registers over MQTT, sets a retained ``offline`` Will with its connection epoch,
publishes a retained ``online`` status with that epoch, prints ``ready
epoch=E`` and then sends a heartbeat every ``--heartbeat-s``. SIGTERM makes it
publish ``offline`` (reason ``shutdown``) and disconnect cleanly.
"""

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import uuid

import aiomqtt

from schemas import decode, encode
from schemas.bus import BusClient
from schemas.messages import (
    AgentState,
    AgentStatus,
    Heartbeat,
    RegisterReply,
    RegisterRequest,
)
from schemas.topics import RpcMethod, Topics


def _status(agent_id: str, state: AgentState, epoch: int, reason: str) -> bytes:
    return encode(
        AgentStatus(agent_id=agent_id, state=state, epoch=epoch, reason=reason)
    )


async def _register(client: aiomqtt.Client, topics: Topics, agent_id: str) -> None:
    reply_to = topics.reply(agent_id)
    await client.subscribe(reply_to, qos=1)
    request = RegisterRequest(
        request_id=uuid.uuid4().hex,
        reply_to=reply_to,
        hostname=f"mini-{agent_id[:8]}",
        agent_id=agent_id,
    )
    await client.publish(topics.rpc(RpcMethod.REGISTER), encode(request), qos=1)
    async with asyncio.timeout(10):
        async for message in client.messages:
            # amqtt also hands a new client others' retained messages.
            if message.topic.value != reply_to:
                continue
            assert isinstance(message.payload, bytes)
            reply = decode(RegisterReply, message.payload)
            if reply.request_id == request.request_id:
                if reply.error is not None:
                    raise SystemExit(f"registration refused: {reply.error}")
                return


async def main(args: argparse.Namespace) -> None:
    topics = Topics(args.root)
    agent_id = args.agent_id
    epoch = args.epoch or time.time_ns() // 1_000_000
    will = aiomqtt.Will(
        topics.status(agent_id),
        _status(agent_id, AgentState.OFFLINE, epoch, "will"),
        qos=1,
        retain=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with BusClient(
        args.url, agent_id, will=will, keepalive=args.keepalive_s
    ) as client:
        await _register(client, topics, agent_id)
        await client.publish(
            topics.status(agent_id),
            _status(agent_id, AgentState.ONLINE, epoch, "connect"),
            qos=1,
            retain=True,
        )
        print(f"ready epoch={epoch}", flush=True)
        seq = 0
        while not stop.is_set():
            beat = Heartbeat(agent_id=agent_id, seq=seq)
            await client.publish(topics.heartbeat(agent_id), encode(beat), qos=0)
            seq += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.heartbeat_s)
        await client.publish(
            topics.status(agent_id),
            _status(agent_id, AgentState.OFFLINE, epoch, "shutdown"),
            qos=1,
            retain=True,
        )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mini_agent")
    parser.add_argument("--url", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--root", default="kbbus/v1")
    parser.add_argument("--keepalive-s", type=int, default=10)
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    parser.add_argument("--epoch", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
