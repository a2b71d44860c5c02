"""The embedded MQTT broker: amqtt in-process, with keepalive enforcement.

amqtt 0.12 times out its read of a silent client and then does nothing, so a
frozen client's Last Will never fires. We give the read a deadline of 1.5 x the
client's keepalive (what MQTT 3.1.1 section 3.1.2.10 asks of a server) and close
the connection when it passes, which makes amqtt publish the Will.
"""

import asyncio
import contextlib
import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from amqtt import broker as amqtt_broker
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from kbbus.broker_auth import (
    PLUGIN_PATH,
    AccessConfig,
    SecureBroker,
    authenticate_connect,
)

log = logging.getLogger("kbbus.broker")

CONFIG_FILE = Path(__file__).resolve().parent.parent / "broker_config" / "amqtt.yaml"
KEEPALIVE_FACTOR = 1.5
_closing: set[asyncio.Future[None]] = set()


class KeepaliveEnforcingHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """Drops a client silent for more than 1.5 x its keepalive."""

    @classmethod
    async def init_from_connect(
        cls, reader: Any, writer: Any, plugins_manager: Any, *args: Any, **kwargs: Any
    ) -> Any:
        handler, session = await super().init_from_connect(
            reader, writer, plugins_manager, *args, **kwargs
        )
        # Before amqtt looks the client id up: see kbbus.broker_auth.
        await authenticate_connect(plugins_manager, session, writer)
        if session.keep_alive and session.keep_alive > 0:
            # The reader loop waits this long for the next packet.
            session.keep_alive = session.keep_alive * KEEPALIVE_FACTOR
        return handler, session

    def handle_read_timeout(self) -> None:
        session = self.session
        if self.writer is None or session is None:
            return
        log.info(
            "client silent for over %.1fs, closing it: client_id=%s",
            session.keep_alive,
            session.client_id,
        )
        writer = self.writer
        # Closing the socket ends amqtt's reader with EOF: an abnormal
        # disconnect, for which it publishes the client's Will.
        task = asyncio.ensure_future(writer.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


# amqtt builds its handlers through this module-level name.
amqtt_broker.BrokerProtocolHandler = KeepaliveEnforcingHandler


# broker_config/amqtt.yaml as data, for a kbbus installed without its source
# tree beside it (a wheel); a test keeps the two equal.
DEFAULT_CONFIG: dict[str, Any] = {
    "listeners": {
        "default": {
            "type": "tcp",
            "bind": "127.0.0.1:1883",
            "max_connections": 20000,
        },
    },
    "plugins": {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
    },
}


@dataclass(frozen=True)
class TlsFiles:
    """A TLS listener's certificate chain and private key (PEM files)."""

    certfile: Path
    keyfile: Path


def broker_config(
    host: str,
    port: int,
    *,
    access: AccessConfig | None = None,
    tls: TlsFiles | None = None,
) -> dict[str, Any]:
    """amqtt's configuration: amqtt.yaml with our address, and security if asked.

    With ``access`` the anonymous plugin is replaced by ours (accounts and
    topic rules, ``kbbus.broker_auth``); without it anyone may do anything,
    which is what ``--open-enrolment`` asks for.
    """
    if CONFIG_FILE.is_file():
        config: dict[str, Any] = yaml.safe_load(CONFIG_FILE.read_text())
    else:
        config = copy.deepcopy(DEFAULT_CONFIG)
    listener = config["listeners"]["default"]
    listener["bind"] = f"{host}:{port}"
    if tls is not None:
        listener.update(ssl=True, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    if access is not None:
        config["plugins"] = {PLUGIN_PATH: asdict(access)}
    return config


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` in the running event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        access: AccessConfig | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.access = access
        self.tls = tls
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        config = broker_config(self.host, self.port, access=self.access, tls=self.tls)
        self._broker = SecureBroker(config)
        await self._broker.start()
        log.info(
            "embedded broker listening on %s (%s)",
            self.url,
            "accounts and topic rules" if self.access else "open: anyone may connect",
        )

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def main() -> None:
    """``python -m kbbus.broker --port N``: the embedded broker on its own."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    async def serve() -> None:
        broker = EmbeddedBroker(args.host, args.port)
        await broker.start()
        try:
            await asyncio.Event().wait()
        finally:
            await broker.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
