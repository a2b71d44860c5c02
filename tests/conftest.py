"""Shared fixtures: a broker of each kind and a database of each kind.

``broker`` and ``db_url`` are parametrised, so a test that takes both runs on
amqtt and Mosquitto, SQLite and PostgreSQL. Each test gets its own broker on a
free port and its own database, dropped afterwards.
"""

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# The controller will not start without an enrolment choice (a token, or open
# enrolment). The suite runs in lab mode unless a test chooses otherwise, as
# tests/test_security_broker.py does; child processes inherit this.
os.environ.setdefault("KBBUS_OPEN_ENROLMENT", "true")

from tests.support.infra import BrokerHandle, database, running_broker

BROKERS = ["amqtt", "mosquitto"]

#: Past pytest-timeout's limit by this much, a test is taken to be hung for good.
WATCHDOG_GRACE_S = 60


def _give_up(config: pytest.Config, nodeid: str, after_s: float) -> None:
    # Runs on the watchdog's thread: the main thread is stuck for good.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    print(
        f"\n{nodeid} still running {after_s:.0f}s in: hung, ending the run",
        file=sys.stderr,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


@pytest.fixture(autouse=True)
def _watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ends the whole run, with every thread's stack, if a test outlives its
    timeout by a minute. pytest-timeout's signal lands wherever the event loop
    happens to be; when a task then refuses to end, asyncio's shutdown waits
    for it for ever, and so would CI."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else None
    if limit is None:
        limit = float(request.config.getini("timeout") or 0)
    if limit <= 0:
        yield
        return
    after_s = limit + WATCHDOG_GRACE_S
    timer = threading.Timer(
        after_s, _give_up, (request.config, request.node.nodeid, after_s)
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


DATABASES = ["sqlite", "postgres"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHandle]:
    workdir = tmp_path / f"broker-{request.param}"
    workdir.mkdir()
    with running_broker(request.param, workdir) as handle:
        yield handle


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with running_broker("amqtt", tmp_path) as handle:
        yield handle


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    with running_broker("mosquitto", workdir) as handle:
        yield handle


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/kbbus.db"
