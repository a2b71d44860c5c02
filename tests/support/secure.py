"""Brokers with security on, for the security tests: accounts, topic rules, TLS.

``secured_broker`` starts either broker with the same accounts: the embedded
amqtt broker with ``kbbus.broker_auth`` (agents checked against the agent
secret), or Mosquitto with its dynamic-security plugin (agents added at run
time through ``$CONTROL``, as the controller's ``--mosquitto-dynsec`` does).
``make_test_ca`` makes a throw-away CA and a server certificate for 127.0.0.1.
"""

import asyncio
import datetime
import gc
import ipaddress
import os
import secrets
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.dynsec import agent_commands, initial_config
from kbbus.broker import EmbeddedBroker, TlsFiles
from kbbus.broker_auth import AccessConfig
from schemas.access import (
    BRIDGE_USERNAME,
    CONTROLLER_USERNAME,
    OPERATOR_USERNAME,
    mqtt_password,
)
from schemas.bus import BusClient
from tests.support.infra import free_port, missing, port_open
from tests.support.wait import wait_until

ROOT = "kbbus/v1"
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


@dataclass(frozen=True)
class TestCA:
    ca_file: Path
    certfile: Path
    keyfile: Path


def make_test_ca(directory: Path, host: str = "127.0.0.1") -> TestCA:
    """A CA and a server certificate for ``host`` signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("kbbus test CA"))
        .issuer_name(name("kbbus test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = TestCA(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    ca.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca.keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca


@dataclass
class SecuredBroker:
    kind: str
    port: int
    agent_secret: str
    enrolment_token: str
    passwords: dict[str, str]
    ca: TestCA | None = None
    host: str = "127.0.0.1"
    _stop: list[object] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return "mqtts" if self.ca else "mqtt"

    @property
    def anonymous_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, username: str, password: str) -> str:
        user, pw = quote(username, safe=""), quote(password, safe="")
        return f"{self.scheme}://{user}:{pw}@{self.host}:{self.port}"

    def service_url(self, username: str) -> str:
        return self.url(username, self.passwords[username])

    def agent_url(self, agent_id: str) -> str:
        return self.url(agent_id, mqtt_password(self.agent_secret, agent_id))

    def client(self, url: str, identifier: str) -> BusClient:
        ca_file = str(self.ca.ca_file) if self.ca else None
        return BusClient(url, identifier, ca_file=ca_file)

    async def provision(self, *agent_ids: str) -> None:
        """Make agent accounts usable: a no-op on amqtt (stateless), on
        Mosquitto the dynamic-security commands the controller would send."""
        if self.kind != "mosquitto":
            return
        url = self.service_url(CONTROLLER_USERNAME)
        async with self.client(url, f"provision-{secrets.token_hex(4)}") as c:
            for agent_id in agent_ids:
                cmd = agent_commands(
                    ROOT, agent_id, mqtt_password(self.agent_secret, agent_id)
                )
                # Mosquitto runs the commands before it acknowledges them.
                await c.publish(cmd.topic, cmd.payload, qos=1)


def _access(broker: SecuredBroker) -> AccessConfig:
    return AccessConfig(
        agent_secret=broker.agent_secret,
        enrolment_token=broker.enrolment_token,
        services=dict(broker.passwords),
        topic_root=ROOT,
    )


def _run_amqtt(broker: SecuredBroker) -> None:
    ready = threading.Event()
    errors: list[BaseException] = []
    holder: dict[str, object] = {}
    tls = TlsFiles(broker.ca.certfile, broker.ca.keyfile) if broker.ca else None

    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            holder["loop"], holder["stop"] = asyncio.get_running_loop(), stop
            embedded = EmbeddedBroker(
                broker.host, broker.port, access=_access(broker), tls=tls
            )
            try:
                await embedded.start()
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            await stop.wait()
            await embedded.stop()

        asyncio.run(main())
        # Transports amqtt 0.12 leaves unclosed; see tests/support/infra.py.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

    thread = threading.Thread(target=run, name="amqtt-secure", daemon=True)
    thread.start()
    ready.wait(10)
    if errors:
        raise errors[0]

    def stop() -> None:
        loop, event = holder["loop"], holder["stop"]
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert isinstance(event, asyncio.Event)
        loop.call_soon_threadsafe(event.set)
        thread.join(timeout=10)

    broker._stop.append(stop)


def mosquitto_config(broker: SecuredBroker, workdir: Path) -> str:
    lines = [
        "per_listener_settings false",
        f"listener {broker.port} {broker.host}",
        *(
            [
                f"cafile {broker.ca.ca_file}",
                f"certfile {broker.ca.certfile}",
                f"keyfile {broker.ca.keyfile}",
            ]
            if broker.ca
            else []
        ),
        "allow_anonymous false",
        f"plugin {DYNSEC_PLUGIN}",
        f"plugin_opt_config_file {workdir}/dynamic-security.json",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        *(["user root"] if os.geteuid() == 0 else []),
    ]
    return "\n".join(lines) + "\n"


def _run_mosquitto(broker: SecuredBroker, workdir: Path) -> None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists() or not DYNSEC_PLUGIN.exists():
        missing("mosquitto with its dynamic-security plugin is not installed")
    import json

    config = initial_config(ROOT, broker.passwords, broker.enrolment_token)
    (workdir / "dynamic-security.json").write_text(json.dumps(config))
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_config(broker, workdir))
    log = (workdir / "mosquitto.log").open("ab")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    wait_until(
        lambda: proc.poll() is not None or port_open(broker.port),
        timeout_s=10,
        what="mosquitto listening",
    )
    assert proc.poll() is None, (workdir / "mosquitto.log").read_text()

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    broker._stop.append(stop)


@contextmanager
def secured_broker(
    kind: str, workdir: Path, *, ca: TestCA | None = None
) -> Iterator[SecuredBroker]:
    broker = SecuredBroker(
        kind=kind,
        port=free_port(),
        agent_secret=secrets.token_urlsafe(32),
        enrolment_token=secrets.token_urlsafe(16),
        passwords={
            name: f"pw/{name}@{secrets.token_hex(4)}"
            for name in (CONTROLLER_USERNAME, BRIDGE_USERNAME, OPERATOR_USERNAME)
        },
        ca=ca,
    )
    if kind == "mosquitto":
        _run_mosquitto(broker, workdir)
    else:
        _run_amqtt(broker)
    try:
        yield broker
    finally:
        for stop in broker._stop:
            assert callable(stop)
            stop()
