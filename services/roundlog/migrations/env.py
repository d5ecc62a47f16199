"""Alembic environment for the projection tables.

roundlog configures Alembic in code (``roundlog.projections.schema``) and hands over an open
connection and the target schema. Tables are created unqualified, so they land in the first
schema of the ``search_path``, which is set to the target schema when one is given; the
``alembic_version`` table goes there too. A replay builds a whole fresh schema this way.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from roundlog.projections.tables import metadata


def run_migrations(connection: sa.Connection, schema: str | None) -> None:
    if schema is not None:
        quoted = connection.dialect.identifier_preparer.quote(schema)
        connection.exec_driver_sql(f"SET search_path TO {quoted}")
        connection.commit()
        # Reflection (autogenerate, compare_metadata) then looks in the target schema too.
        connection.dialect.default_schema_name = schema
    context.configure(connection=connection, target_metadata=metadata, version_table_schema=schema)
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    config = context.config
    schema: str | None = config.attributes.get("schema")
    connection: sa.Connection | None = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection, schema)
        return
    # Plain ``alembic -x url=...`` use, e.g. to write a new revision with --autogenerate.
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass -x url=postgresql+psycopg://... or use `roundlog db upgrade`")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        run_migrations(conn, schema)


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported: run them against a database")
main()
