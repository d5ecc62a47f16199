"""PostgreSQL projections of the log: tables, row derivation, batch writes, migrations."""
