"""An agent's first registration, over the broker's enrolment account.

A broker with accounts (README, "Security") lets a new agent in only as
``kbbus-enrol`` with the operator's enrolment token as password and a client id
``kbbus-enrol-<random>``, allowed to publish ``rpc/register`` and to read its own
reply topic. The reply carries the agent's own MQTT password, which is stored
in its state file before anything else: from then on the agent connects as
itself (username = client id = agent id) and the token is no longer needed.
"""

import asyncio
import logging
import uuid
from contextlib import suppress

import aiomqtt

from agent_sim.settings import Settings
from agent_sim.store import AgentState
from agent_sim.trust import TrustStore
from agent_sim.wire import register_request
from schemas import MessageError, decode
from schemas.access import ENROL_CLIENT_PREFIX, ENROL_USERNAME, enrol_reply_topic
from schemas.bus import BusClient
from schemas.messages import RegisterReply
from schemas.topics import RpcMethod, Topics

log = logging.getLogger("kbbus.agent")


class EnrolmentFailed(aiomqtt.MqttError):
    """No credentials this time (refused, no answer, broker away); retry later."""


def must_enrol(settings: Settings, state: AgentState) -> bool:
    return state.mqtt_password is None and settings.enrolment_token is not None


async def enrol(
    settings: Settings,
    topics: Topics,
    state: AgentState,
    *,
    hostname: str,
    ip_address: str,
    os_name: str,
    trust: TrustStore | None = None,
) -> None:
    """Register ``state``'s agent with the token and store its MQTT password."""
    token = settings.enrolment_token
    assert token is not None
    client_id = f"{ENROL_CLIENT_PREFIX}{uuid.uuid4().hex}"
    reply_to = enrol_reply_topic(topics.root, client_id)
    request_id, payload = register_request(
        topics,
        state.agent_id,
        hostname,
        ip_address,
        os_name,
        reply_to=reply_to,
        enrolment_token=token.get_secret_value(),
    )
    try:
        async with BusClient(
            settings.mqtt_url,
            client_id,
            username=ENROL_USERNAME,
            password=token.get_secret_value(),
            timeout=settings.connect_timeout_s,
        ) as client:
            await client.subscribe(reply_to, qos=1)
            await client.publish(topics.rpc(RpcMethod.REGISTER), payload, qos=1)
            async with asyncio.timeout(settings.register_timeout_s):
                reply = await _reply(client, reply_to, request_id)
    except TimeoutError:
        raise EnrolmentFailed("no answer to the enrolment") from None
    except aiomqtt.MqttError as exc:
        raise EnrolmentFailed(f"enrolment connection failed: {exc}") from None
    if reply.error is not None or reply.agent is None:
        code = reply.error.code.value if reply.error else "no agent"
        raise EnrolmentFailed(f"enrolment refused ({code})")
    password = (reply.agent.credentials or {}).get("mqtt_password")
    if password is None:
        raise EnrolmentFailed("the enrolment reply carried no credentials")
    state.mqtt_password = password
    await state.persist()
    if trust is not None:
        # The enrolment reply is the first registration reply: its keys let the
        # agent check a task waiting for it before it registers as itself.
        trust.registered(list(reply.signing_keys))
    log.info("enrolled, connecting as itself: agent_id=%s", state.agent_id)


async def _reply(client: aiomqtt.Client, topic: str, request_id: str) -> RegisterReply:
    async for message in client.messages:
        if message.topic.value != topic or not isinstance(message.payload, bytes):
            continue
        with suppress(MessageError):
            reply = decode(RegisterReply, message.payload)
            if reply.request_id == request_id:
                return reply
    raise EnrolmentFailed("the enrolment connection closed")
