"""Start the parts of a kbbus system as processes: brokers, databases, services.

Used by ``kbbus bench`` and by the integration tests, so both measure and test
the same thing: real processes on free ports, each with its own database.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

PG_ADMIN_URL = os.environ.get(
    "KBBUS_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class StackError(Exception):
    """A part of the stack could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(port):
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not listen on port {port} in {timeout_s}s")
        time.sleep(0.02)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def mosquitto_config(port: int, workdir: Path, extra: list[str] | None = None) -> str:
    """A Mosquitto config for tests and benchmarks: loopback, fast, persistent."""
    lines = [
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        # Without it QoS 1 crawls at ~100 messages/s (Nagle vs delayed ACKs).
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {workdir}/",
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
        "max_keepalive 3600",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        # Started as root, Mosquitto drops to the ``mosquitto`` user, which
        # cannot write the persistence file in a root-owned directory.
        *(["user root"] if os.geteuid() == 0 and not _sets_user(extra) else []),
        *(extra or []),
    ]
    return "\n".join(lines) + "\n"


def _sets_user(extra: list[str] | None) -> bool:
    """Mosquitto refuses a config that names ``user`` twice."""
    return any(line.split()[:1] == ["user"] for line in extra or [])


@dataclass
class Process:
    """A child process with a log file, stopped with SIGTERM then SIGKILL."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class BrokerProcess:
    """An MQTT broker in a process of its own: ``mosquitto`` or ``amqtt``."""

    kind: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra_conf: list[str] = field(default_factory=list)
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "BrokerProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            binary = mosquitto_binary()
            if binary is None:
                raise StackError("mosquitto is not installed")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(mosquitto_config(self.port, self.workdir, self.extra_conf))
            argv = [binary, "-c", str(conf)]
        elif self.kind == "amqtt":
            argv = [sys.executable, "-m", "kbbus.broker", "--port", str(self.port)]
        else:
            raise StackError(f"unknown broker kind {self.kind!r}")
        log = self.workdir / f"{self.kind}.log"
        self.process = Process(self.kind, argv, log).start()
        wait_port(self.port, 15, self.kind)
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def kill(self) -> None:
        if self.process:
            self.process.kill()


def postgres_available(admin_url: str = PG_ADMIN_URL) -> bool:
    try:
        with psycopg.connect(admin_url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def create_postgres_database(prefix: str, admin_url: str = PG_ADMIN_URL) -> str:
    """A new empty database; returns its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "")
    return f"postgresql+psycopg://{base}/{name}"


def drop_postgres_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
