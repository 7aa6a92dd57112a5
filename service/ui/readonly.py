"""A store opened so that the browser cannot write to it, enforced by the database.

SQLite: the file is opened with the `mode=ro` URI and `PRAGMA query_only`. PostgreSQL: every
transaction of the session is read only (`default_transaction_read_only`). Either way the
schema must be at this code's head revision, as for every other command.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import create_engine

from sae.errors import UserError
from service.store.engine import (
    POSTGRES_CONNECT_TIMEOUT_S,
    SQLITE_BUSY_TIMEOUT_MS,
    Store,
    checked,
    normalize_url,
)


def open_readonly(url: str) -> Store:
    """The store at `url`, read only; a UserError when it is missing or not migrated."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise UserError("the browser needs a SQLite file; set AUTOINTERP_DB=sqlite:///PATH")
        path = Path(parsed.database).resolve()
        if not path.exists():
            raise UserError(f"no store at {path}; create it with `autointerp db upgrade`")

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(
                f"{path.as_uri()}?mode=ro",
                uri=True,
                timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
            )
            connection.execute("PRAGMA query_only = ON")
            return connection

        engine = create_engine("sqlite://", creator=connect)
    else:
        engine = create_engine(
            parsed,
            connect_args={
                "connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
                "options": "-c default_transaction_read_only=on",
            },
            pool_pre_ping=True,
        )
    return checked(Store(engine))
