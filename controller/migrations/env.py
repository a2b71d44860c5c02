"""Alembic environment: migrates the connection or URL the caller passes in.

``controller.store.upgrade`` hands over an open connection (with the SQLite
pragmas applied); the alembic CLI passes ``-x db_url=...`` instead.
"""

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from controller.db import Base

# Any fixed number: it names the lock all controllers take while migrating.
_MIGRATION_LOCK_ID = 0x6B62627573


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two controllers starting at once must not both create the tables.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        context.run_migrations()


def run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    from controller.store import make_engine

    url = context.get_x_argument(as_dictionary=True).get("db_url") or (
        config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit("Give the database as: alembic -x db_url=URL upgrade head")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) migrations are not supported.")
run()
