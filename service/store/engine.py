"""Opening the store: URL -> engine, the schema revision check, and `db upgrade`.

SQLite is set up for many processes sharing one file: WAL (readers never block the writer),
a busy timeout (writers wait for each other instead of failing), foreign keys on, and
transactions that SQLAlchemy begins itself so that write sessions really issue
`BEGIN IMMEDIATE` (pysqlite's own transaction handling would defer the write lock to the
first INSERT, and a deferred reader that later writes fails at once with "database is locked"
when another writer got in between). PostgreSQL goes through psycopg 3.

A store whose schema is behind this code's migrations is refused with the command that
upgrades it; one ahead of it is refused too, since this code would misread it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from sae.errors import UserError
from service.store.models import Base, utcnow

# Package data: service/migrations/ in the source tree and in an installed wheel alike.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
POSTGRES_CONNECT_TIMEOUT_S = 5
# Execution option read by the SQLite `begin` hook: which BEGIN to issue.
BEGIN_OPTION = "autointerp_sqlite_begin"
# The PostgreSQL role `autointerp query` logs in as (see service/store/query.py): it may
# SELECT the store's tables and nothing more. Roles belong to the server, so the stores on
# one server share it, and each store's `db upgrade` grants it that store's tables.
READER_ROLE = "autointerp_reader"
# Created with no password (it logs in where pg_hba.conf trusts it, or once an administrator
# gives it one) and none of the attributes (SUPERUSER, CREATEROLE...) that would let it out.
# Concurrent upgrades may both find it missing; the one that loses the race keeps the other's.
_CREATE_READER = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
        CREATE ROLE {READER_ROLE} LOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$
"""


def normalize_url(url: str | URL) -> URL:
    """Parse a store URL; plain `postgresql://` means psycopg 3, the driver installed."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise UserError(
            f"cannot parse store URL {str(url)!r}; set AUTOINTERP_DB to e.g. "
            "sqlite:///autointerp.db or postgresql+psycopg://user@host/db"
        ) from error
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UserError(
            f"store URL {redact(parsed)} is neither SQLite nor PostgreSQL; set AUTOINTERP_DB to "
            "sqlite:///PATH or postgresql+psycopg://user@host/db"
        )
    return parsed


def redact(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str | URL) -> Engine:
    """An engine for the store at `url`, configured per backend as the module says."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    try:
        return create_engine(
            parsed,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
            pool_pre_ping=True,
        )
    except NoSuchModuleError as error:
        raise UserError(
            f"no driver for {parsed.drivername}; use postgresql+psycopg://user@host/db"
        ) from error


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # Hand transaction control to SQLAlchemy's `begin` hook (see module docstring).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    # In WAL mode NORMAL still never corrupts; it only may lose the last commits on power loss.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


@dataclass
class Store:
    """An open store: its engine and the sessions that work on it."""

    engine: Engine

    def __post_init__(self) -> None:
        # Same pool, with the option that makes SQLite's begin hook take the write lock.
        self._writer = sessionmaker(
            bind=self.engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"}),
            expire_on_commit=False,
        )
        self._reader = sessionmaker(bind=self.engine, expire_on_commit=False)

    @property
    def url(self) -> URL:
        return self.engine.url

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    def session(self) -> Session:
        """A session for writing. On SQLite it takes the write lock when it begins, so keep
        it short: do slow work (LLM calls) outside and open the session to save results."""
        return self._writer()

    def read_session(self) -> Session:
        """A session for reading only; on SQLite it never blocks or waits for writers."""
        return self._reader()

    def dispose(self) -> None:
        self.engine.dispose()


def store_now(session: Session) -> datetime:
    """Naive UTC time by the store's clock. PostgreSQL workers on many machines then agree on
    when a lease expires; a SQLite file is only ever shared under one machine's clock."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar()
        assert isinstance(value, datetime)
        return value
    return utcnow()


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configured from Python (no alembic.ini): scripts in migrations/, and the
    connection handed to migrations/env.py through `attributes`."""
    if not (MIGRATIONS_DIR / "env.py").exists():
        raise UserError(
            f"migrations folder not found at {MIGRATIONS_DIR}; reinstall autointerp, whose "
            "wheel ships it"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


@contextmanager
def _connect(engine: Engine, url: URL) -> Iterator[Connection]:
    """A connection, with an unreachable server turned into one actionable line."""
    try:
        connection = engine.connect()
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise UserError(
            f"cannot reach the store at {redact(url)} ({reason}); check AUTOINTERP_DB and that "
            "the database server is running"
        ) from error
    with connection:
        yield connection


def current_revision(store: Store) -> str | None:
    with _connect(store.engine, store.url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_revision(store: Store) -> None:
    """Refuse a store whose schema is not exactly at this code's head revision."""
    current = current_revision(store)
    head = head_revision()
    if current == head:
        return
    where = redact(store.url)
    if current is None:
        raise UserError(
            f"the store at {where} has no autointerp schema; run `autointerp db upgrade`"
        )
    scripts = ScriptDirectory.from_config(alembic_config())
    known = {revision.revision for revision in scripts.walk_revisions()}
    if current in known:
        raise UserError(
            f"the store at {where} is at schema revision {current}, older than this "
            f"autointerp's {head}; run `autointerp db upgrade`"
        )
    raise UserError(
        f"the store at {where} has schema revision {current}, newer than this autointerp "
        f"knows (head {head}); upgrade autointerp to use it"
    )


def open_store(url: str | URL, *, check: bool = True) -> Store:
    """Open the store at `url`; with `check`, it must exist and be at the head revision."""
    parsed = normalize_url(url)
    path = _sqlite_path(parsed) if parsed.get_backend_name() == "sqlite" else None
    if check and path is not None and not path.exists():
        raise UserError(f"no store at {path}; create it with `autointerp db upgrade`")
    if path is not None and not path.parent.exists():
        raise UserError(f"folder {path.parent} does not exist; create it or fix AUTOINTERP_DB")
    store = Store(make_engine(parsed))
    return checked(store) if check else store


def checked(store: Store) -> Store:
    """`store`, once its schema is at the head revision; disposed of when it is not."""
    try:
        check_revision(store)
    except BaseException:
        store.dispose()
        raise
    return store


def _grant_reader(connection: Connection, url: URL) -> None:
    """Create the query role if missing and let it read this store's tables."""
    try:
        connection.exec_driver_sql(_CREATE_READER)
    except ProgrammingError as error:
        raise UserError(
            f"cannot create the read-only role {READER_ROLE} for `autointerp query` on "
            f"{redact(url)} (no CREATEROLE right); have an administrator run `CREATE ROLE "
            f"{READER_ROLE} LOGIN`, then rerun `autointerp db upgrade`"
        ) from error
    quote = connection.dialect.identifier_preparer.quote
    schema = connection.exec_driver_sql("SELECT current_schema()").scalar()
    assert isinstance(schema, str)
    # Only the store's own tables, not whatever else shares its schema.
    ours = set(Base.metadata.tables) | {"alembic_version"}
    tables = sorted(ours & set(inspect(connection).get_table_names()))
    connection.exec_driver_sql(f"GRANT USAGE ON SCHEMA {quote(schema)} TO {READER_ROLE}")
    connection.exec_driver_sql(f"GRANT SELECT ON {', '.join(map(quote, tables))} TO {READER_ROLE}")


def upgrade(url: str | URL, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the store at `url` (creating a SQLite file if needed) to `revision`.

    Returns (revision before, revision after). A store already ahead of this code is refused.
    """
    store = open_store(url, check=False)
    try:
        before = current_revision(store)
        scripts = ScriptDirectory.from_config(alembic_config())
        known = {script.revision for script in scripts.walk_revisions()}
        if before is not None and before not in known:
            raise UserError(
                f"the store at {redact(store.url)} has schema revision {before}, newer than "
                "this autointerp knows; upgrade autointerp instead"
            )
        bind = store.engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
        with _connect(bind, store.url) as connection:
            sqlite = store.backend == "sqlite"
            if sqlite:
                # SQLite's batch mode rebuilds tables; with foreign keys enforced, dropping the
                # old copy would cascade. The pragma only acts outside a transaction.
                driver_connection = connection.connection.driver_connection
                assert isinstance(driver_connection, sqlite3.Connection)
                driver_connection.execute("PRAGMA foreign_keys = OFF")
            with connection.begin():
                command.upgrade(alembic_config(connection), revision)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("a migration left rows that break a foreign key")
                if not sqlite:
                    _grant_reader(connection, store.url)
        return before, current_revision(store) or ""
    finally:
        store.dispose()
