"""`autointerp query` as a sandbox, run as a user runs it against real SQLite and PostgreSQL
stores: what a statement must not reach (files, programs, other sessions, settings, other
databases) is refused in one line with nothing left behind; runaway statements stop at the
time limit; big results stop at the row cap and say so; `--schema` explains the columns."""

import csv
import io
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url
from test_store_cli import cli, counts, one_line_error, seed_run

from sae.errors import UserError
from service.store.engine import READER_ROLE, upgrade
from service.store.models import Base
from service.store.query import COLUMN_MEANINGS, check_reader

RUNAWAY = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
ENDLESS_ROWS = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n"


def libpq(url: str) -> str:
    """The SQLAlchemy URL as psycopg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_postgres_escapes_are_refused_and_leave_nothing(postgres_url: str, tmp_path: Path):
    upgrade(postgres_url)
    seed_run(postgres_url)
    before = counts(postgres_url)
    owner = make_url(postgres_url).username
    escapes = [
        (f"COPY run TO PROGRAM 'touch {tmp_path}/program'", "returns no rows"),
        (f"COPY run TO '{tmp_path}/copied'", "returns no rows"),
        (f"SELECT lo_export(1, '{tmp_path}/lo')", "permission denied for function lo_export"),
        ("SELECT pg_read_file('/etc/passwd')", "permission denied for function pg_read_file"),
        (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            "superuser process",
        ),
        (f"SELECT set_config('role', '{owner}', false)", "permission denied to set role"),
        (
            f"SELECT set_config('session_authorization', '{owner}', false)",
            "permission denied to set session authorization",
        ),
        ("SELECT set_config('log_statement', 'all', false)", "log_statement"),
        ("SELECT count(*) FROM pg_authid", "permission denied for table pg_authid"),
        (f"SET ROLE {owner}", "returns no rows"),
    ]
    # A superuser session the statements try to end; it must still answer afterwards.
    with psycopg.connect(libpq(postgres_url), autocommit=True) as watcher:
        for sql, fragment in escapes:
            result = cli(postgres_url, "query", sql)
            one_line_error(result, "query refused")
            assert fragment in result.stderr, (sql, result.stderr)
        started = time.monotonic()
        one_line_error(
            cli(postgres_url, "query", "SELECT pg_sleep(60)", "--timeout", "1"),
            "query stopped after 1 s",
        )
        assert time.monotonic() - started < 30
        assert watcher.execute("SELECT 1").fetchone() == (1,)
        # The timeout ended the statement on the server too, not just the client's wait.
        assert watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
            "AND pid <> pg_backend_pid()"
        ).fetchone() == (0,)
    assert list(tmp_path.iterdir()) == []
    assert counts(postgres_url) == before


def test_postgres_query_logs_in_as_the_reader(postgres_url: str):
    upgrade(postgres_url)
    result = cli(
        postgres_url, "query", "SELECT current_user, session_user, rolsuper FROM pg_roles "
        "WHERE rolname = current_user", "--format", "csv",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == f"{READER_ROLE},{READER_ROLE},False"
    # The check every query makes refuses a session that may do more than read.
    with (
        psycopg.connect(libpq(postgres_url)) as superuser,
        pytest.raises(UserError, match="may do more than read"),
    ):
        check_reader(superuser)


def test_postgres_store_not_granted_to_the_reader(postgres_url: str):
    upgrade(postgres_url)
    with psycopg.connect(libpq(postgres_url), autocommit=True) as owner:
        owner.execute(f"REVOKE SELECT ON alembic_version FROM {READER_ROLE}")
    one_line_error(cli(postgres_url, "query", "SELECT 1"), "run `autointerp db upgrade`")
    assert cli(postgres_url, "db", "upgrade").returncode == 0
    result = cli(postgres_url, "query", "SELECT version_num FROM alembic_version")
    assert result.returncode == 0, result.stderr


def test_sqlite_escapes_are_refused_and_leave_nothing(tmp_path: Path):
    store = tmp_path / "store.db"
    url = f"sqlite:///{store}"
    upgrade(url)
    seed_run(url)
    before = counts(url)
    for sql in [
        f"ATTACH '{tmp_path}/other.db' AS other",
        f"VACUUM INTO '{tmp_path}/copy.db'",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA wal_checkpoint",
        "PRAGMA optimize",
        "SELECT * FROM pragma_user_version",
    ]:
        one_line_error(cli(url, "query", sql), "query refused")
    started = time.monotonic()
    one_line_error(cli(url, "query", RUNAWAY, "--timeout", "1"), "query stopped after 1 s")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "copy.db").exists()
    assert counts(url) == before
    with sqlite3.connect(store) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (0,)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_introspection_pragmas_still_read(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    result = cli(url, "query", "PRAGMA table_info(latent)", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert "index" in [row["name"] for row in csv.DictReader(io.StringIO(result.stdout))]


def test_row_cap_stops_an_endless_result_and_says_so(store_url: str):
    upgrade(store_url)
    started = time.monotonic()
    result = cli(store_url, "query", ENDLESS_ROWS, "--max-rows", "5", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["i", "1", "2", "3", "4", "5"]
    assert result.stderr.strip() == "showing the first 5 rows; raise --max-rows for more"
    assert time.monotonic() - started < 30
    below_cap = cli(store_url, "query", "SELECT 1 AS one", "--max-rows", "1", "--format", "csv")
    assert below_cap.stdout == "one\n1\n" and below_cap.stderr == ""


def test_empty_result_keeps_its_header(store_url: str):
    upgrade(store_url)
    result = cli(store_url, "query", "SELECT name, seeds FROM run", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "name,seeds\n"


def test_schema_explains_every_column(tmp_path: Path):
    # No store needed: the schema comes from the models.
    result = cli(f"sqlite:///{tmp_path / 'none.db'}", "query", "--schema", "--format", "csv")
    assert result.returncode == 0, result.stderr
    meanings = {
        (row["table"], row["column"]): row["meaning"]
        for row in csv.DictReader(io.StringIO(result.stdout))
    }
    assert meanings["latent", "index"].startswith("the latent's index within its SAE")
    assert meanings["explanation", "text"] == "the explanation"
    assert not (tmp_path / "none.db").exists()
    assert {name: set(table.columns.keys()) for name, table in Base.metadata.tables.items()} == {
        name: set(columns) for name, columns in COLUMN_MEANINGS.items()
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["SELECT 1", "--timeout", "0"], "--timeout must be more than 0"),
        (["SELECT 1", "--max-rows", "0"], "--max-rows must be at least 1"),
        (["SELECT 1", "--schema"], "or --schema (not both)"),
        ([], "or --schema (not both)"),
    ],
)
def test_bad_limits_and_arguments(tmp_path: Path, args: list[str], fragment: str):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    one_line_error(cli(url, "query", *args), fragment)
