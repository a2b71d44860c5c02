"""A private PostgreSQL cluster that a test may stop, kill and restart.

The machine's shared server serves every other test, so it is never touched:
this one lives in a temporary directory, listens on a free port (TCP only, no
Unix socket), trusts local connections and runs as the ``postgres`` user when
the tests run as root (``initdb`` refuses root).
"""

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.infra import free_port, missing, port_open
from tests.support.wait import wait_until

PG_BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]


def pg_bin_dir() -> Path | None:
    for candidate in PG_BIN_DIRS:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    def __init__(self, bin_dir: Path, workdir: Path) -> None:
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.logfile = workdir / "postgres.log"
        self.port = free_port()
        self._user: str | None = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``kbbus`` database in this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/kbbus"

    def _run(self, *argv: str, check: bool = True) -> None:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
            )

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            # mkdtemp makes the parent 0700 for root: postgres must get through.
            os.chown(self.workdir.parent, entry.pw_uid, entry.pw_gid)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            "-c unix_socket_directories='' -c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile),
            "-o", options, "-w", "-t", "30", "start",
        )  # fmt: skip
        wait_until(lambda: port_open(self.port), timeout_s=30, what="postgres up")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` drops the clients and shuts down; ``immediate`` is a crash."""
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop",
            check=False,
        )  # fmt: skip

    def create_database(self, name: str = "kbbus") -> None:
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started cluster with an empty ``kbbus`` database; removed afterwards."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        raise AssertionError("unreachable")
    workdir = Path(tempfile.mkdtemp(prefix="kbbus-pg-"))
    cluster = PrivatePostgres(bin_dir, workdir / "pg")
    try:
        cluster.init()
        cluster.start()
        cluster.create_database()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)
