"""``kbbus up``: the embedded broker in this process, the rest as children.

The controller, the bridge and the simulated agents run as child processes
(``python -m controller`` and so on), so each gets a core of its own and a crash
of one is seen by the others exactly as in a real deployment.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from kbbus.broker import EmbeddedBroker, TlsFiles
from kbbus.broker_auth import AccessConfig
from schemas.access import (
    BRIDGE_USERNAME,
    CONTROLLER_USERNAME,
    OPERATOR_USERNAME,
    SERVICE_ROLES,
)

log = logging.getLogger("kbbus.up")

STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 60.0


class UpError(Exception):
    """``kbbus up`` cannot start; the message is one line for the operator."""


@dataclass
class UpOptions:
    mqtt_port: int = 1883
    http_port: int = 8080
    host: str = "127.0.0.1"
    db_url: str | None = None
    agents: int = 0
    data_dir: Path = Path(".kbbus")
    controller_args: list[str] = field(default_factory=list)
    bridge_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    #: A lab: anyone may connect and register (no accounts, no topic rules).
    open_enrolment: bool = False
    #: The operator's enrolment token; generated (and kept) when None.
    enrolment_token: str | None = None
    #: A TLS listener for the embedded broker (certificate and key, PEM).
    tls: TlsFiles | None = None


SECRETS_FILE = "secrets.json"
#: What ``kbbus up`` generates once and keeps in ``<data dir>/secrets.json``.
SECRET_NAMES = (
    "enrolment_token",
    "agent_secret",
    "operator_token",
    CONTROLLER_USERNAME,
    BRIDGE_USERNAME,
    OPERATOR_USERNAME,
)


def load_secrets(data_dir: Path) -> dict[str, str]:
    """The secrets kept in the data dir, with any missing ones generated.

    The file is readable by its owner only: it holds every password of the
    system. A restart reuses it, so agents keep their credentials.
    """
    path = data_dir / SECRETS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UpError(f"cannot read {path}: {exc}; fix or delete it") from None
    missing = [name for name in SECRET_NAMES if not stored.get(name)]
    if missing:
        stored.update({name: secrets.token_urlsafe(32) for name in missing})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stored, out, indent=2)
    os.chmod(path, 0o600)
    return stored


def account_url(scheme: str, host: str, port: int, user: str, password: str) -> str:
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}"


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UpError(
                f"port {port} on {host} is in use; choose another with {flag}"
            ) from None


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process


async def spawn(
    name: str, module: str, args: list[str], env: dict[str, str] | None = None
) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, env={**os.environ, **(env or {})}
    )
    log.info("started %s pid=%s", name, proc.pid)
    return Child(name, proc)


async def wait_ready(
    http_url: str, children: list[Child], headers: dict[str, str] | None = None
) -> None:
    """Until the bridge answers and the controller answers through it."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(
        base_url=http_url, timeout=2.0, headers=headers
    ) as client:
        while time.monotonic() < deadline:
            for child in children:
                if child.proc.returncode is not None:
                    raise UpError(
                        f"{child.name} exited with code {child.proc.returncode} "
                        "during start-up; see its log above"
                    )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/api/v1/kbs")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise UpError(f"the system did not become ready within {READY_TIMEOUT_S:.0f}s")


def banner(
    opts: UpOptions,
    db_url: str,
    mqtt_url: str,
    http_url: str,
    stored: dict[str, str] | None = None,
) -> str:
    root = "kbbus/v1"
    auth = enrol = ""
    sub = f"mosquitto_sub -p {opts.mqtt_port}"
    if opts.tls is not None:
        sub += " --cafile <your CA file>"
    if stored is None:
        security = "  security      OFF (--open-enrolment): anyone may connect\n"
    else:
        sub += f" -u {OPERATOR_USERNAME} -P {stored[OPERATOR_USERNAME]}"
        security = (
            f"  enrolment     token {stored['enrolment_token']}\n"
            f"                (KBBUS_ENROLMENT_TOKEN for agents; all secrets in "
            f"{opts.data_dir / SECRETS_FILE})\n"
            f"  operator      token {stored['operator_token']}\n"
            f"                (KBBUS_OPERATOR_TOKEN; kbbus status/trigger/watch "
            f"read it from there too)\n"
        )
        auth = f" -H 'Authorization: Bearer {stored['operator_token']}'"
        enrol = f" -H 'Authorization: Bearer {stored['enrolment_token']}'"
    return f"""
kbbus is up.
  MQTT broker   {mqtt_url}  (embedded amqtt)
  HTTP bridge   {http_url}  (OpenAPI: {http_url}/docs)
  database      {db_url}
  agents        {opts.agents} simulated
{security}
Try next:
  kbbus status
  kbbus trigger <agent_id> dns-flush-kb
  kbbus watch
  {sub} -t '{root}/agents/+/status' -v
  {sub} -t '{root}/events/#' -v
  curl -s{auth} {http_url}/api/v1/agents
  curl -s -X POST {http_url}/api/v1/agent/register{enrol} \\
       -H 'Content-Type: application/json' \\
       -d '{{"hostname": "my-dev-machine", "ip_address": "192.168.1.100",
            "os": "Ubuntu 22.04"}}'
Press Ctrl-C to stop.
"""


async def stop_children(children: list[Child]) -> None:
    for child in reversed(children):
        if child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", child.name, 10)
            child.proc.kill()
            await child.proc.wait()


async def run_up(opts: UpOptions) -> int:
    check_port_free(opts.host, opts.mqtt_port, "--mqtt-port")
    check_port_free(opts.host, opts.http_port, "--http-port")
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    db_url = opts.db_url or f"sqlite:///{opts.data_dir / 'kbbus.db'}"
    scheme = "mqtts" if opts.tls else "mqtt"
    mqtt_url = f"{scheme}://{opts.host}:{opts.mqtt_port}"
    http_url = f"http://{opts.host}:{opts.http_port}"
    stored: dict[str, str] | None = None
    access: AccessConfig | None = None
    if opts.open_enrolment:
        controller_url = bridge_url = agents_url = mqtt_url
        controller_security = ["--open-enrolment"]
        agent_env: dict[str, str] = {}
    else:
        stored = load_secrets(opts.data_dir)
        if opts.enrolment_token:
            stored["enrolment_token"] = opts.enrolment_token
        access = AccessConfig(
            agent_secret=stored["agent_secret"],
            enrolment_token=stored["enrolment_token"],
            services={n: stored[n] for n in SERVICE_ROLES},
        )
        host, port = opts.host, opts.mqtt_port
        controller_url = account_url(
            scheme, host, port, CONTROLLER_USERNAME, stored[CONTROLLER_USERNAME]
        )
        bridge_url = account_url(
            scheme, host, port, BRIDGE_USERNAME, stored[BRIDGE_USERNAME]
        )
        agents_url = mqtt_url
        controller_security = []
        # Children take secrets from the environment, never the command line
        # (which every user of the machine can read in ps).
        agent_env = {
            "KBBUS_ENROLMENT_TOKEN": stored["enrolment_token"],
            "KBBUS_AGENT_SECRET": stored["agent_secret"],
        }
    # The operator token is the bridge's alone; agents never see it.
    bridge_env = dict(agent_env)
    operator_headers: dict[str, str] = {}
    if stored is not None:
        stored["operator_token"] = (
            os.environ.get("KBBUS_OPERATOR_TOKEN") or stored["operator_token"]
        )
        bridge_env["KBBUS_OPERATOR_TOKEN"] = stored["operator_token"]
        operator_headers = {"Authorization": f"Bearer {stored['operator_token']}"}
    controller_env = {
        **agent_env,
        "KBBUS_SIGNING_KEY_DIR": str(opts.data_dir / "keys"),
    }

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    broker = EmbeddedBroker(opts.host, opts.mqtt_port, access=access, tls=opts.tls)
    await broker.start()
    children: list[Child] = []
    try:
        children.append(
            await spawn(
                "controller",
                "controller",
                [
                    "--mqtt-url",
                    controller_url,
                    "--db-url",
                    db_url,
                    *controller_security,
                    *opts.controller_args,
                ],
                controller_env,
            )
        )
        children.append(
            await spawn(
                "bridge",
                "bridge_http",
                [
                    "--mqtt-url",
                    bridge_url,
                    "--host",
                    opts.host,
                    "--port",
                    str(opts.http_port),
                    *opts.bridge_args,
                ],
                bridge_env,
            )
        )
        await wait_ready(http_url, children, operator_headers)
        if opts.agents:
            children.append(
                await spawn(
                    "agents",
                    "agent_sim",
                    [
                        "--mqtt-url",
                        agents_url,
                        "--count",
                        str(opts.agents),
                        "--state-dir",
                        str(opts.data_dir / "agents"),
                        *opts.agent_args,
                    ],
                    agent_env,
                )
            )
        print(banner(opts, db_url, mqtt_url, http_url, stored), flush=True)
        return await supervise(children, stop)
    finally:
        await stop_children(children)
        await broker.stop()


async def supervise(children: list[Child], stop: asyncio.Event) -> int:
    """Until Ctrl-C/SIGTERM (exit 0) or a child dies on its own (exit 1)."""
    waits = {asyncio.ensure_future(c.proc.wait()): c for c in children}
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
    for fut in [stopper, *waits]:
        if fut not in done:
            fut.cancel()
    if stopper in done:
        log.info("stopping")
        return 0
    for fut in done:
        child = waits[fut]
        log.error("%s exited unexpectedly with code %s", child.name, fut.result())
    return 1
