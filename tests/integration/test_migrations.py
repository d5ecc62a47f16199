"""The Alembic migrations against a real PostgreSQL: from empty, down to base and up again, into a schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from roundlog.cli import main
from roundlog.projections import tables
from roundlog.projections.schema import current, downgrade, recreate_schema, upgrade

REPO = Path(__file__).resolve().parents[2]
TABLES = {t.name for t in tables.metadata.sorted_tables}
HEAD = "0004"


def relations(database_url: str, schema: str = "public") -> set[str]:
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        found = set(inspector.get_table_names(schema)) | set(inspector.get_view_names(schema))
    engine.dispose()
    return found


def drift(database_url: str) -> list[object]:
    """What autogenerate would change to make the database match ``tables``: nothing, if they agree."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        diffs: list[object] = compare_metadata(MigrationContext.configure(conn), tables.metadata)
    engine.dispose()
    return diffs


def test_upgrade_from_empty_builds_what_the_code_describes(database_url: str) -> None:
    assert current(database_url) is None
    upgrade(database_url)
    assert current(database_url) == HEAD
    assert relations(database_url) == TABLES | set(tables.VIEWS) | {"alembic_version"}
    assert drift(database_url) == []


def test_a_0001_database_with_rows_upgrades_in_place(database_url: str) -> None:
    upgrade(database_url, revision="0001")
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    insert = (
        "INSERT INTO clients (client_id, roles, labels, last_seen) VALUES ('c', '{trainer}', '{}', now())"
    )
    with engine.begin() as conn:
        conn.execute(sa.text(insert))
    upgrade(database_url)
    with engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT client_id, key_id FROM clients")).all()
        authors = conn.execute(sa.text("SELECT count(*) FROM round_authors")).scalar()
    engine.dispose()
    assert [tuple(row) for row in kept] == [("c", None)] and authors == 0
    assert current(database_url) == HEAD and drift(database_url) == []


def test_a_0002_round_upgrades_to_one_shard(database_url: str) -> None:
    """Rounds projected before sharding existed had one shard, as their events say by default."""
    upgrade(database_url, revision="0002")
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    insert = """
        INSERT INTO rounds (round_id, session_id, round_no, task, state, base_model_id, timed_out,
            buffer_size, clients_required, max_clients, min_updates, round_timeout, aggregator,
            aggregator_kwargs, n_assigned, n_received, n_accepted, n_rejected, total_weight, requested_at)
        VALUES ('r', 's', 1, 'training', 'aggregated', 'm', false, -1, 1, -1, 1, 60, 'fedavg', '{}',
            2, 2, 2, 0, 20, now())
    """
    with engine.begin() as conn:
        conn.execute(sa.text(insert))
    upgrade(database_url)
    with engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT round_id, shards FROM rounds")).all()
        partials = conn.execute(sa.text("SELECT count(*) FROM round_shards")).scalar()
    engine.dispose()
    assert [tuple(row) for row in kept] == [("r", 1)] and partials == 0
    assert current(database_url) == HEAD and drift(database_url) == []


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    upgrade(database_url)
    downgrade(database_url, "base")
    assert relations(database_url) == {"alembic_version"}
    assert current(database_url) is None
    upgrade(database_url)
    assert relations(database_url) == TABLES | set(tables.VIEWS) | {"alembic_version"}


def test_a_schema_of_its_own_leaves_public_alone(database_url: str) -> None:
    recreate_schema(database_url, "audit")
    assert current(database_url, "audit") == HEAD
    assert relations(database_url, "audit") == TABLES | set(tables.VIEWS) | {"alembic_version"}
    assert relations(database_url) == set(), "nothing lands in public"
    recreate_schema(database_url, "audit")  # dropped and rebuilt: no error on the second time
    assert current(database_url, "audit") == HEAD


def test_cli_db_upgrade_and_downgrade(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUNDLOG_KAFKA_BOOTSTRAP", raising=False)  # db commands need only the database
    monkeypatch.setenv("ROUNDLOG_DATABASE_URL", database_url)
    assert main(["db", "upgrade"]) == 0
    assert current(database_url) == HEAD
    assert main(["db", "downgrade", "--to", "base"]) == 0
    assert current(database_url) is None
    assert main(["db", "upgrade", "--schema", "elsewhere"]) == 0
    assert current(database_url, "elsewhere") == HEAD and current(database_url) is None


def test_migrations_run_from_an_installed_wheel(database_url: str, tmp_path: Path) -> None:
    """The wheel's files on sys.path, not the checkout: Alembic must find env.py and the versions there."""
    source = tmp_path / "source"  # a clean copy: building in the checkout would leave build/ behind
    shutil.copytree(
        REPO / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--wheel-dir", str(wheels), str(source)], check=True, timeout=120)
    (wheel,) = wheels.glob("roundlog-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import roundlog; "
        "from roundlog.projections.schema import current, upgrade; "
        "assert roundlog.__file__.startswith(sys.argv[1]), roundlog.__file__; "
        "upgrade(sys.argv[2]); print(current(sys.argv[2]))"
    )
    # -I: no user site, no PYTHONPATH, no current directory: only the venv's packages and the wheel
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(site), database_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == HEAD
