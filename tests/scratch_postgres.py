"""Throwaway PostgreSQL databases for tests and benchmarks: created on the server, dropped
after, so that no run touches a real store.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

DEFAULT_SERVER = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


def _admin_engine(server_url: str) -> Engine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(
        server_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )


def postgres_unreachable(server_url: str = DEFAULT_SERVER) -> str | None:
    """None when the server answers, else the reason it does not (for a test's skip)."""
    engine = _admin_engine(server_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return None
    except OperationalError as error:
        return str(error.orig or error).strip().splitlines()[0]
    finally:
        engine.dispose()


@contextmanager
def scratch_postgres(
    server_url: str = DEFAULT_SERVER, prefix: str = "autointerp_test"
) -> Iterator[URL]:
    """A new empty database on the server at `server_url`, dropped when the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(server_url)
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server_url).set(database=name)
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
