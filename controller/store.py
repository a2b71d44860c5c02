"""The controller's database: engine creation, migrations and transactions.

Every change of state happens inside ``Store.run(work)``: ``work`` gets a fresh
``Session`` in a transaction, runs in a database thread (SQLAlchemy is
synchronous here) and is re-run from scratch after a lost race with another
controller (``Conflict``, ``StaleDataError``, ``IntegrityError``). A database
that is down or locked is waited for with backoff, so ``work`` must have no
effect outside its session: callers publish, log and count only with what it
returns, after the commit.
"""

import asyncio
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from controller.db import configure_sqlite

log = logging.getLogger("kbbus.controller")

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"
CONFLICT_RETRIES = 8
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


class Conflict(Exception):
    """A compare-and-set statement matched no row: re-read and try again."""


def make_engine(db_url: str) -> Engine:
    """An engine for ``db_url``; creates the directory of a SQLite file."""
    url = make_url(db_url)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    configure_sqlite(engine)
    return engine


def alembic_config(db_url: str) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates %, which URL-encoded passwords contain.
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


def upgrade(db_url: str, revision: str = "head") -> None:
    """Bring the schema at ``db_url`` up to ``revision`` (Alembic)."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            cfg = alembic_config(db_url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")


def is_unavailable(exc: BaseException) -> bool:
    """Errors that mean "the database is down or busy", not "the work is wrong"."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if type(exc.orig).__module__.startswith("sqlite3"):
        # SQLite reports schema mistakes ("no such table") as OperationalError too.
        return any(word in str(exc.orig).lower() for word in _SQLITE_TRANSIENT)
    return True


class Store:
    """Transactions on one database, run in a small pool of threads."""

    def __init__(self, db_url: str) -> None:
        self.engine = make_engine(db_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer: more threads would only wait on its lock.
        workers = 1 if self.engine.dialect.name == "sqlite" else 4
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kbbus-db")
        self._down_since: float | None = None

    def transact(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, again after a lost race."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                with self.sessions() as session, session.begin():
                    return work(session)
            except (Conflict, StaleDataError, IntegrityError):
                if attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def run(self, work: Callable[[Session], T]) -> T:
        """``transact`` in a database thread; waits out an unavailable database."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN_S
        while True:
            try:
                result = await loop.run_in_executor(self._executor, self.transact, work)
            except DBAPIError as exc:
                if not is_unavailable(exc):
                    raise
                self._note_down(exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if self._down_since is not None:
                log.info(
                    "database available again after %.1fs",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            return result

    def _note_down(self, exc: DBAPIError, delay: float) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "database unavailable, retrying with backoff: %s",
                str(exc.orig).strip() or type(exc.orig).__name__,
            )
        else:
            log.debug("database still unavailable, next try in %.2fs", delay)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()
