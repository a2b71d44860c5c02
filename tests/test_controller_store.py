"""The store: migrations match the models, transactions retry, the DB is waited for."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from controller.db import Base
from controller.store import Conflict, Store, is_unavailable, make_engine, upgrade


def _drift(db_url: str, metadata: sa.MetaData) -> list[object]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_migrations_match_the_models(db_url: str) -> None:
    upgrade(db_url)
    assert _drift(db_url, Base.metadata) == []


def test_drift_check_sees_a_missing_column(db_url: str) -> None:
    """The comparison above is not vacuous: a model change it must catch."""
    upgrade(db_url)
    metadata = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    metadata.tables["agents"].append_column(sa.Column("extra", sa.Integer()))
    diffs = _drift(db_url, metadata)
    assert any(d[0] == "add_column" and d[3].name == "extra" for d in diffs)  # type: ignore[index]


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        version = conn.execute(sa.text("select version_num from alembic_version"))
        assert [row[0] for row in version] == ["0001"]
    engine.dispose()


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_transact_retries_a_lost_race(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    store = Store(sqlite_url)
    calls = []

    def work(session: object) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise Conflict("agent-1")
        return len(calls)

    try:
        assert store.transact(work) == 3
    finally:
        store.close()


def test_schema_mistakes_are_not_mistaken_for_an_outage(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with pytest.raises(sa.exc.DBAPIError) as mistake, engine.connect() as conn:
        conn.execute(sa.text("select * from no_such_table"))
    engine.dispose()
    assert not is_unavailable(mistake.value)

    down = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(sa.exc.DBAPIError) as outage, down.connect():
        pass
    down.dispose()
    assert is_unavailable(outage.value)
