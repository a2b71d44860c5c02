"""Authentication and topic rules for the embedded amqtt broker.

``AccessPlugin`` is one amqtt plugin that is both an authentication and a
topic-checking plugin; the rules themselves are ``schemas.access``. Agents'
passwords are checked statelessly against the agent secret, so the broker
keeps no list of agents and needs no reload when one registers.

amqtt 0.12 has three gaps this module closes, because each one would let a
client that fails authentication or holds only its own account act on
others:

- it looks a CONNECT's client id up (and drops a clean session's stored state,
  or overwrites a persistent one's credentials and Will) *before* it asks the
  authentication plugins, and takes over a connected client with that id even
  when the newcomer is then refused: ``authenticate_connect`` refuses first;
- it publishes a client's Will without asking the topic plugins: a Will on a
  topic the account may not publish to is refused at CONNECT;
- at connect it sends the new client the retained messages matching every
  *other* client's subscriptions (the leak ``controller.app`` also notes),
  without a topic check: ``SecureBroker`` checks each one.
"""

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from schemas.access import (
    ENROL_CLIENT_PREFIX,
    ENROL_USERNAME,
    SERVICE_ROLES,
    Role,
    allowed_publish,
    allowed_receive,
    allowed_subscription,
    mqtt_password,
    same_secret,
    valid_agent_id,
)
from schemas.topics import DEFAULT_ROOT

log = logging.getLogger("kbbus.broker")

PLUGIN_PATH = "kbbus.broker_auth.AccessPlugin"
_ROLE_ATTR = "kbbus_role"


def role_of(session: Session | None) -> Role | None:
    return getattr(session, _ROLE_ATTR, None) if session is not None else None


@dataclass
class AccessConfig:
    """What the broker checks clients against (all secrets as plain text)."""

    agent_secret: str | None = None
    enrolment_token: str | None = None
    #: username -> password for the controller, bridge and operator accounts.
    services: dict[str, str] = field(default_factory=dict)
    topic_root: str = DEFAULT_ROOT


def identify(
    config: AccessConfig, username: str | None, password: str | None, client_id: str
) -> Role | None:
    """The role these credentials log in as, or None to refuse them."""
    if username is None or password is None:
        return None
    if username in config.services:
        ok = same_secret(password, config.services[username])
        return SERVICE_ROLES.get(username) if ok else None
    if username == ENROL_USERNAME:
        token = config.enrolment_token
        if token and client_id.startswith(ENROL_CLIENT_PREFIX):
            return Role.ENROL if same_secret(password, token) else None
        return None
    if config.agent_secret and client_id == username and valid_agent_id(username):
        expected = mqtt_password(config.agent_secret, username)
        return Role.AGENT if same_secret(password, expected) else None
    return None


class AccessPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """Logs clients in by ``schemas.access`` and holds each to its role's topics."""

    Config = AccessConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        assert isinstance(self.config, AccessConfig)
        self.access: AccessConfig = self.config

    def check(self, session: Session) -> Role | None:
        """Identify ``session`` and remember its role on it; None if refused."""
        role = identify(
            self.access, session.username, session.password, session.client_id or ""
        )
        if role is not None and session.will_flag:
            will_topic = session.will_topic or ""
            if not allowed_publish(
                role, self.access.topic_root, session.client_id or "", will_topic
            ):
                log.warning(
                    "connection refused: a Will on a topic this account may not "
                    "publish to: client_id=%s topic=%s",
                    session.client_id,
                    will_topic,
                )
                role = None
        setattr(session, _ROLE_ATTR, role)
        if role is None:
            log.warning(
                "connection refused: bad credentials: client_id=%s username=%s",
                session.client_id,
                session.username,
            )
        return role

    async def authenticate(self, *, session: Session) -> bool | None:
        return self.check(session) is not None

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        return self.allowed(session, topic, action)

    def allowed(
        self, session: Session | None, topic: str | None, action: Action | None
    ) -> bool:
        role = role_of(session)
        if role is None or topic is None or session is None:
            return False
        root, me = self.access.topic_root, session.client_id or ""
        if action is Action.PUBLISH:
            ok = allowed_publish(role, root, me, topic)
        elif action is Action.SUBSCRIBE:
            ok = allowed_subscription(role, root, me, topic)
        else:
            ok = allowed_receive(role, root, me, topic)
        if not ok and action is not Action.RECEIVE:
            log.info(
                "refused %s: client_id=%s role=%s topic=%s",
                action,
                me,
                role.value,
                topic,
            )
        return ok


def access_plugin(broker_plugins: Any) -> AccessPlugin | None:
    """The loaded ``AccessPlugin`` among a plugin manager's plugins, if any."""
    for plugin in broker_plugins:
        if isinstance(plugin, AccessPlugin):
            return plugin
    return None


class SecureBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with topic checks that cannot race, and on retained
    messages sent at connect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Client ids between the delivery of their session's queued messages
        #: and the start of their message loop (see below).
        self._connecting: set[str] = set()

    # At connect, after a session's queued messages, amqtt 0.12 loops over the
    # subscriptions of *every* client and sends the newcomer the retained
    # messages of each: other agents' tasks and statuses included (MQTT sends
    # retained messages on SUBSCRIBE only). Worse, it awaits inside that loop,
    # so a SUBSCRIBE or a disconnect elsewhere changes the dict under it
    # ("dictionary changed size during iteration"): the newcomer's session
    # then never starts its message loop, and nothing it publishes is routed.
    # 50 agents crashing at once left the next ones connected but unheard.
    # Every kbbus client subscribes on each connection, so the loop is skipped:
    # between these two hooks nothing suspends, so the mark cannot leak.

    async def _publish_session_retained_messages(self, session: Session) -> None:
        await super()._publish_session_retained_messages(session)
        self._connecting.add(session.client_id)

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        self._connecting.discard(client_session.client_id)
        await super()._client_message_loop(client_session, handler)

    async def _topic_filtering(
        self, session: Session, topic: str, action: Action
    ) -> bool:
        # amqtt awaits this inside its loop over the subscriptions dict; its
        # plugin manager suspends there, another client's SUBSCRIBE changes the
        # dict, and the broadcast dies ("dictionary changed size during
        # iteration"), losing the message. Our check never suspends.
        plugins = self.plugins_manager.plugins
        plugin = access_plugin(plugins)
        if plugin is not None:
            return plugin.allowed(session, topic, action)
        if not any(isinstance(p, BaseTopicPlugin) for p in plugins):
            return True  # what amqtt answers with no topic plugin, without a yield
        result: bool = await super()._topic_filtering(session, topic, action)
        return result

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if session.client_id in self._connecting:
            return  # amqtt's loop at connect (above): no yield, nothing sent
        plugin = access_plugin(self.plugins_manager.plugins)
        if plugin is None:
            await super()._publish_retained_messages_for_subscription(
                subscription, session
            )
            return
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not plugin.allowed(session, topic, Action.RECEIVE):
                continue
            qos_out = min(qos, retained.qos or qos)
            # Concurrently, as amqtt does: each QoS 1 send waits for its PUBACK.
            sends.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, qos_out, True)
                )
            )
        if sends:
            await asyncio.wait(sends)


async def authenticate_connect(
    plugins_manager: Any, session: Session, writer: Any
) -> None:
    """Refuse a CONNECT with bad credentials before amqtt touches any session.

    Raises ``MQTTError`` (after answering CONNACK "not authorised" and closing
    the connection); amqtt then drops the connection without looking up, taking
    over or deleting the session of the client id it claimed.
    """
    plugin = access_plugin(plugins_manager.plugins)
    if plugin is None or plugin.check(session) is not None:
        return
    connack = ConnackPacket.build(0, NOT_AUTHORIZED)
    await connack.to_stream(writer)
    await writer.close()
    raise MQTTError(f"client {session.client_id!r} refused: not authorised")
