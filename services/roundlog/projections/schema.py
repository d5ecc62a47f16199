"""Alembic driven from code: the migrations ship inside the package, so this works from a wheel.

``schema`` names a PostgreSQL schema to migrate instead of the connection's default
(``public``): replay builds a complete second copy of the projections that way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config


@contextlib.contextmanager
def _engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine for one short job, closed with its connection afterwards."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def _alembic(database_url: str, schema: str | None) -> Iterator[Config]:
    """An Alembic config bound to one connection and our packaged scripts (a real folder, even if zipped)."""
    with (
        _engine(database_url) as engine,
        resources.as_file(resources.files("roundlog") / "migrations") as scripts,
        engine.connect() as connection,
    ):
        config = Config()
        config.set_main_option("script_location", str(scripts))
        config.attributes["connection"] = connection
        config.attributes["schema"] = schema
        yield config


def upgrade(database_url: str, schema: str | None = None, revision: str = "head") -> None:
    """Migrate the projection tables up to ``revision``, creating ``schema`` if it does not exist."""
    if schema is not None:
        _ddl(database_url, "CREATE SCHEMA IF NOT EXISTS {}", schema)
    with _alembic(database_url, schema) as config:
        command.upgrade(config, revision)


def downgrade(database_url: str, revision: str, schema: str | None = None) -> None:
    """Migrate down to ``revision`` (``base`` drops every projection table)."""
    with _alembic(database_url, schema) as config:
        command.downgrade(config, revision)


def current(database_url: str, schema: str | None = None) -> str | None:
    """The revision the schema is at, or None before the first upgrade."""
    with _engine(database_url) as engine, engine.connect() as connection:
        table = sa.table("alembic_version", sa.column("version_num"), schema=schema)
        if not sa.inspect(connection).has_table("alembic_version", schema=schema):
            return None
        version: str | None = connection.execute(sa.select(table.c.version_num)).scalar()
        return version


def recreate_schema(database_url: str, schema: str, logged: bool = True) -> None:
    """Drop ``schema`` with everything in it, then build it afresh at the newest revision.

    ``logged=False`` makes its tables UNLOGGED: written without WAL (about 1.9 KB per replayed
    event that replicas and archives would carry), at the price of being emptied by a crash
    of the server and left out of its replicas and physical backups. For a copy that can be
    rebuilt from the log at any time (replay), that is the right trade.
    """
    _ddl(database_url, "DROP SCHEMA IF EXISTS {} CASCADE", schema)
    upgrade(database_url, schema)
    if not logged:
        with _engine(database_url) as engine, engine.begin() as connection:
            quote = connection.dialect.identifier_preparer.quote
            for table in sa.inspect(connection).get_table_names(schema=schema):
                connection.exec_driver_sql(f"ALTER TABLE {quote(schema)}.{quote(table)} SET UNLOGGED")


def _ddl(database_url: str, statement: str, schema: str) -> None:
    with _engine(database_url) as engine, engine.begin() as connection:
        connection.exec_driver_sql(statement.format(connection.dialect.identifier_preparer.quote(schema)))
