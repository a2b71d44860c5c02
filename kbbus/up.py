"""``kbbus up``: the embedded broker in this process, the rest as children.

The controller, the bridge and the simulated agents run as child processes
(``python -m controller`` and so on), so each gets a core of its own and a crash
of one is seen by the others exactly as in a real deployment.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kbbus.broker import EmbeddedBroker

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


async def spawn(name: str, module: str, args: list[str]) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, env=dict(os.environ)
    )
    log.info("started %s pid=%s", name, proc.pid)
    return Child(name, proc)


async def wait_ready(http_url: str, children: list[Child]) -> None:
    """Until the bridge answers and the controller answers through it."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=http_url, timeout=2.0) as client:
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


def banner(opts: UpOptions, db_url: str, mqtt_url: str, http_url: str) -> str:
    root = "kbbus/v1"
    return f"""
kbbus is up.
  MQTT broker   {mqtt_url}  (embedded amqtt)
  HTTP bridge   {http_url}  (OpenAPI: {http_url}/docs)
  database      {db_url}
  agents        {opts.agents} simulated

Try next:
  kbbus status
  kbbus trigger <agent_id> dns-flush-kb
  kbbus watch
  mosquitto_sub -p {opts.mqtt_port} -t '{root}/agents/+/status' -v
  mosquitto_sub -p {opts.mqtt_port} -t '{root}/events/#' -v
  curl -s {http_url}/api/v1/agents
  curl -s -X POST {http_url}/api/v1/agent/register \\
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
    mqtt_url = f"mqtt://{opts.host}:{opts.mqtt_port}"
    http_url = f"http://{opts.host}:{opts.http_port}"

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    broker = EmbeddedBroker(opts.host, opts.mqtt_port)
    await broker.start()
    children: list[Child] = []
    try:
        common = ["--mqtt-url", mqtt_url]
        children.append(
            await spawn(
                "controller",
                "controller",
                [*common, "--db-url", db_url, *opts.controller_args],
            )
        )
        children.append(
            await spawn(
                "bridge",
                "bridge_http",
                [
                    *common,
                    "--host",
                    opts.host,
                    "--port",
                    str(opts.http_port),
                    *opts.bridge_args,
                ],
            )
        )
        await wait_ready(http_url, children)
        if opts.agents:
            children.append(
                await spawn(
                    "agents",
                    "agent_sim",
                    [
                        *common,
                        "--count",
                        str(opts.agents),
                        "--state-dir",
                        str(opts.data_dir / "agents"),
                        *opts.agent_args,
                    ],
                )
            )
        print(banner(opts, db_url, mqtt_url, http_url), flush=True)
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
