"""How every kbbus process connects to the bus: one MQTT client class.

``BusClient`` is an ``aiomqtt.Client`` with the conventions all three processes
need, kept here so that none of them gets them wrong:

- TCP_NODELAY on the socket. Without it a small PUBLISH waits for the ACK of
  the previous segment (Nagle against the peer's delayed ACK): a request/reply
  round trip took ~90 ms instead of well under 1 ms here.
- A bounded in-flight window and outgoing queue (paho queues without bound).
- Manual acknowledgement of QoS 1 messages, for processes that must commit a
  message's effect before the broker may forget it.
- Waits that never swallow a cancellation. aiomqtt waits for PUBACK, SUBACK
  and the like with ``asyncio.wait_for``, which on Python 3.11 returns the
  result and drops a ``cancel()`` that arrives in the same loop pass as the
  acknowledgement: an agent stopped at that moment went on heartbeating, and
  shutdown hung for ever waiting for it. ``asyncio.timeout`` has no such race.
- Accounts and TLS from the URL: ``mqtt://user:password@host:port``, and
  ``mqtts://`` for a TLS connection verified against ``ca_file`` (or the file
  named by ``KBBUS_MQTT_CA_FILE``).
"""

import asyncio
import math
import os
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import aiomqtt
import paho.mqtt.client as mqtt

T = TypeVar("T")

DEFAULT_MAX_INFLIGHT = 1000
DEFAULT_MAX_QUEUED_OUTGOING = 100_000


TLS_SCHEMES = ("mqtts", "ssl")
#: The CA file that verifies the broker of an ``mqtts://`` URL, when the
#: caller names none (the system's CAs when this is unset too).
CA_FILE_ENV = "KBBUS_MQTT_CA_FILE"


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``mqtts://``) to ``(host, port)``.

    The port defaults to 1883, or 8883 for ``mqtts://``.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "tcp", "", *TLS_SCHEMES):
        raise ValueError(f"{url!r}: only mqtt:// and mqtts:// URLs are supported")
    default_port = 8883 if parsed.scheme in TLS_SCHEMES else 1883
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: for logs and
    error messages, which must never carry a secret."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parsed.username or ''}:***@{host}"
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    return parsed._replace(netloc=netloc).geturl()


def uses_tls(url: str) -> bool:
    return urlparse(url).scheme in TLS_SCHEMES


def tls_parameters(
    url: str, ca_file: str | None = None
) -> aiomqtt.TLSParameters | None:
    """TLS settings for ``url``: None for ``mqtt://``; for ``mqtts://`` the
    broker's certificate is verified against ``ca_file`` (or $KBBUS_MQTT_CA_FILE,
    or the system's CAs) and its host name checked."""
    if not uses_tls(url):
        return None
    return aiomqtt.TLSParameters(ca_certs=ca_file or os.environ.get(CA_FILE_ENV))


class BusClient(aiomqtt.Client):
    """An aiomqtt client with TCP_NODELAY, bounded queues and optional manual acks."""

    def __init__(
        self,
        url: str,
        identifier: str,
        *,
        manual_ack: bool = False,
        ca_file: str | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_queued_outgoing: int = DEFAULT_MAX_QUEUED_OUTGOING,
        **kwargs: Any,
    ) -> None:
        host, port = parse_mqtt_url(url)
        # mqtt://user:password@host:port, for brokers with accounts (the
        # Mosquitto and EMQX configurations in broker_config/).
        parsed = urlparse(url)
        if parsed.username and "username" not in kwargs:
            kwargs["username"] = unquote(parsed.username)
            kwargs["password"] = unquote(parsed.password or "") or None
        if "tls_params" not in kwargs:
            kwargs["tls_params"] = tls_parameters(url, ca_file)
        super().__init__(
            host,
            port,
            identifier=identifier,
            max_inflight_messages=max_inflight,
            max_queued_outgoing_messages=max_queued_outgoing,
            **kwargs,
        )
        # We run many publishes concurrently on purpose; aiomqtt would warn
        # about each one over its default threshold of 10.
        self.pending_calls_threshold = max_queued_outgoing
        self._manual_ack = manual_ack
        if manual_ack:
            # aiomqtt does not expose paho's manual acknowledgements; the paho
            # client underneath does (paho-mqtt >= 2.0).
            self._client.manual_ack_set(True)

    @property
    def paho(self) -> mqtt.Client:
        """The paho client underneath (for acks and socket-level chaos)."""
        return self._client

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge a QoS 1 message once its effect is committed."""
        if self._manual_ack and message.qos > 0:
            self._client.ack(message.mid, message.qos)

    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
        # aiomqtt's own, with asyncio.timeout instead of asyncio.wait_for (see
        # the module's docstring): a cancellation always reaches the caller.
        if timeout is None:
            timeout = self.timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                return await fut
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        raw = sock if isinstance(sock, socket.socket) else getattr(sock, "_sock", None)
        if isinstance(raw, socket.socket):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._on_socket_open(client, userdata, sock)
