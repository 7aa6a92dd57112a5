"""Read-only SQL for users (`autointerp query`), enforced by the database, not by parsing.

SQLite: the connection gets `PRAGMA query_only` and an authorizer that lets SQLite compile
nothing but reads, and the driver runs exactly one statement. PostgreSQL: the statement runs
inside a transaction set READ ONLY (and already past its first query, so it cannot be
switched back), sent as a prepared statement, which PostgreSQL allows to hold only one
command; the transaction is always rolled back. Either way the connection is discarded after.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg

from sae.errors import UserError
from service.store.engine import Store

# What a read may need SQLite to authorize; everything else (writes, ATTACH, PRAGMA
# assignments, transactions) is denied while the statement is compiled.
_SQLITE_READ_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_SQLITE_READ_PRAGMAS = {
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
}


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _sqlite_authorizer(
    action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None
) -> int:
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    # A pragma with no value only reads the setting; a few table-introspection ones name a table.
    if action == sqlite3.SQLITE_PRAGMA and (arg2 is None or (arg1 or "") in _SQLITE_READ_PRAGMAS):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _refused(reason: str) -> UserError:
    return UserError(f"query refused: `autointerp query` only reads ({reason}); use SELECT")


def _invalid(reason: str) -> UserError:
    return UserError(f"query failed: {reason}; check the SQL")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _query_sqlite(connection: sqlite3.Connection, sql: str) -> QueryResult:
    connection.execute("PRAGMA query_only = ON")
    connection.set_authorizer(_sqlite_authorizer)
    try:
        cursor = connection.execute(sql)
        rows = cursor.fetchall()
    except (sqlite3.Error, sqlite3.Warning) as error:
        message = _first_line(error)
        if "not authorized" in message or "readonly" in message:
            raise _refused(message) from error
        raise _invalid(message) from error
    finally:
        connection.set_authorizer(None)
    columns = [column[0] for column in cursor.description or []]
    return QueryResult(columns, [tuple(row) for row in rows])


def _query_postgres(connection: psycopg.Connection[Any], sql: str) -> QueryResult:
    # Start from a fresh transaction: SET TRANSACTION must come before any other query.
    connection.rollback()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
            # After a query the transaction's mode is fixed: SET TRANSACTION READ WRITE fails.
            cursor.execute("SELECT 1")
            try:
                cursor.execute(sql.encode(), prepare=True)
            except psycopg.errors.ReadOnlySqlTransaction as error:
                raise _refused(_first_line(error)) from error
            except psycopg.Error as error:
                raise _invalid(_first_line(error)) from error
            if cursor.description is None:
                raise _refused("the statement returns no rows")
            columns = [column.name for column in cursor.description]
            rows = [tuple(row) for row in cursor.fetchall()]
    finally:
        connection.rollback()
    return QueryResult(columns, rows)


def run_query(store: Store, sql: str) -> QueryResult:
    """Run one read-only statement and return its columns and rows."""
    if not sql.strip():
        raise UserError("query is empty; pass one SELECT statement")
    connection = store.engine.connect()
    try:
        driver_connection = connection.connection.driver_connection
        if store.backend == "sqlite":
            assert isinstance(driver_connection, sqlite3.Connection)
            return _query_sqlite(driver_connection, sql)
        assert isinstance(driver_connection, psycopg.Connection)
        return _query_postgres(driver_connection, sql)
    finally:
        # Never hand this connection back to the pool with the read-only settings on it.
        connection.invalidate()
        connection.close()


def plain_value(value: Any) -> Any:
    """A value as JSON and CSV can carry it: blobs as hex, times as ISO 8601."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def format_result(result: QueryResult, fmt: str) -> str:
    """The result as CSV (header row first) or JSON (a list of objects)."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([plain_value(value) for value in row] for row in result.rows)
        return buffer.getvalue()
    if fmt == "json":
        records = [
            {column: plain_value(value) for column, value in zip(result.columns, row, strict=True)}
            for row in result.rows
        ]
        return json.dumps(records, indent=2, default=str)
    raise UserError(f"unknown format {fmt!r}; use table, csv or json")
