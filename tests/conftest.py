"""Shared fixtures: a broker of each kind and a database of each kind.

``broker`` and ``db_url`` are parametrised, so a test that takes both runs on
amqtt and Mosquitto, SQLite and PostgreSQL. Each test gets its own broker on a
free port and its own database, dropped afterwards.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The controller will not start without an enrolment choice (a token, or open
# enrolment). The suite runs in lab mode unless a test chooses otherwise, as
# tests/test_security_broker.py does; child processes inherit this.
os.environ.setdefault("KBBUS_OPEN_ENROLMENT", "true")

from tests.support.infra import BrokerHandle, database, running_broker

BROKERS = ["amqtt", "mosquitto"]
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
