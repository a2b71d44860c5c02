"""Brokers and databases for integration tests, each on a free port or name."""

import asyncio
import gc
import os
import shutil
import subprocess
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kbbus.stack import free_port as free_port
from kbbus.stack import mosquitto_config
from kbbus.stack import port_open as port_open
from tests.support.wait import wait_until

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "KBBUS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def missing(reason: str) -> None:
    """Skip for a missing service, except in CI where that is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service fails the run)")
    pytest.skip(reason)


@dataclass
class BrokerHandle:
    kind: str
    port: int
    host: str = "127.0.0.1"
    workdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    extra_conf: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self.kind != "mosquitto":
            self._start_amqtt()  # returns once amqtt listens
            return
        self._start_mosquitto()
        wait_until(
            lambda: port_open(self.port), timeout_s=10, what=f"{self.kind} listening"
        )

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._thread is not None and self._loop is not None and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=10)
            self._thread = None

    def kill(self) -> None:
        """SIGKILL the broker process (Mosquitto only)."""
        assert self._proc is not None, "only a Mosquitto process can be killed"
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- Mosquitto ----------------------------------------------------------
    def config_text(self) -> str:
        assert self.workdir is not None
        return mosquitto_config(self.port, self.workdir, self.extra_conf)

    def _start_mosquitto(self) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            missing("mosquitto is not installed (apt-get install mosquitto)")
            return
        assert self.workdir is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )

    # --- amqtt in a thread of its own -----------------------------------
    def _start_amqtt(self) -> None:
        from kbbus.broker import EmbeddedBroker

        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                broker = EmbeddedBroker(self.host, self.port)
                try:
                    await broker.start()
                except BaseException as exc:
                    errors.append(exc)
                    ready.set()
                    return
                ready.set()
                await self._stop.wait()
                await broker.stop()

            asyncio.run(main())
            # amqtt 0.12 leaves the transports of some dropped connections
            # (killed clients, unacknowledged QoS 1) unclosed; collect them now,
            # quietly, rather than as unraisable warnings in a later test.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()

        self._thread = threading.Thread(target=run, name="amqtt", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]


@contextmanager
def running_broker(kind: str, workdir: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle(kind=kind, port=free_port(), workdir=workdir)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


# --- databases ----------------------------------------------------------------


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except Exception:
        return False


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create a database of our own and drop it afterwards; yield its URL."""
    import psycopg

    if not _pg_available():
        missing(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    name = f"kbbus_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "")
    try:
        yield f"postgresql+psycopg://{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "postgres":
        with fresh_postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{workdir}/kbbus.db"
