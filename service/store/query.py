"""Read-only SQL for users (`autointerp query`), enforced by the database, not by parsing.

SQLite: the connection gets `PRAGMA query_only` and an authorizer that lets SQLite compile
nothing but reads (no ATTACH, hence no VACUUM INTO, no pragma but listed reads), the driver
runs exactly one statement, and a progress handler interrupts it at the time limit.

PostgreSQL: the statement runs on its own connection, logged in as the role `db upgrade`
creates for it (`READER_ROLE`), which may only SELECT the store's tables. Being logged in as
that role, not switched to it, is what keeps the statement in: `SET ROLE` or
`SET SESSION AUTHORIZATION` from a superuser could be undone within the statement itself by
`set_config('role', ...)`. On top, the transaction is read only, the statement is sent as a
prepared statement (which PostgreSQL allows to hold only one command), `statement_timeout`
is set when the connection opens, and rows are streamed so a huge result is never held.

Either way at most `max_rows` rows are read, and the connection is discarded after.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sqlite3
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg

from sae.errors import UserError
from service.store.engine import POSTGRES_CONNECT_TIMEOUT_S, READER_ROLE, Store, redact
from service.store.models import Base

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ROWS = 10_000
# SQLite calls the progress handler every this many virtual-machine steps (well under 1 ms).
_SQLITE_PROGRESS_STEPS = 10_000

# What a read may need SQLite to authorize; everything else (writes, ATTACH and so VACUUM
# INTO, transactions) is denied while the statement is compiled.
_SQLITE_READ_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
# Pragmas that only read, with or without an argument (a table or index name). Any other
# pragma is refused: some write without a value (`wal_checkpoint`, `optimize`).
_SQLITE_READ_PRAGMAS = {
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
}
# Role attributes and predefined roles that let a PostgreSQL session act beyond reading
# (files, programs, other sessions, other roles); the reader must have none of them.
_POSTGRES_POWERS = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
    "pg_write_all_data",
)
_POSTGRES_CHECK_READER = f"""
SELECT has_table_privilege('alembic_version', 'SELECT'),
    (SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls
     FROM pg_roles WHERE rolname = current_user)
    OR EXISTS (SELECT FROM pg_roles WHERE rolname IN ({", ".join(map(repr, _POSTGRES_POWERS))})
               AND pg_has_role(oid, 'MEMBER'))
"""

# What each column of the store means, for `autointerp query --schema`; a test checks that
# it names every column of the models and nothing else.
COLUMN_MEANINGS: dict[str, dict[str, str]] = {
    "run": {
        "id": "the run's id",
        "name": "the run's unique name (`--run NAME`)",
        "subject_model": "the model whose activations the SAEs encode",
        "hookpoint": "where in the subject model the activations are read",
        "dataset": "the text the SAEs were trained on",
        "architecture": "SAE architecture, e.g. topk",
        "n_latents": "latents per SAE",
        "k": "active latents per token for top-k SAEs, else NULL",
        "seeds": "the training seeds, a JSON list",
        "path": "the training output folder, if known",
        "config": "the training config, JSON",
        "created_at": "when the run was registered (UTC)",
    },
    "sae": {
        "id": "the SAE's id",
        "run_id": "its run (run.id)",
        "seed": "the training seed",
        "hookpoint": "where in the subject model it reads",
        "path": "its checkpoint folder, if known",
        "n_latents": "number of latents",
        "d_in": "width of the activations it encodes",
        "architecture": "SAE architecture, e.g. topk",
        "k": "active latents per token for top-k SAEs, else NULL",
        "fvu": "fraction of variance unexplained at the end of training",
        "l0": "mean number of active latents per token",
        "dead_fraction": "fraction of latents that never fired",
    },
    "latent": {
        "id": "the latent's id (what other tables' latent_id refer to)",
        "sae_id": "its SAE (sae.id)",
        "index": 'the latent\'s index within its SAE (quote it: latent."index")',
        "firing_count": "tokens it fired on in the latent cache",
        "firing_frequency": "fraction of cached tokens it fired on",
        "max_activation": "its largest activation in the cache",
    },
    "match_pair": {
        "id": "the pair's id",
        "sae_a_id": "SAE A (sae.id), whose latents are matched",
        "sae_b_id": "SAE B (sae.id), matched into",
        "solver": "assignment solver used",
        "threshold": "cosine above which a match counts as shared",
        "n_latents": "latents of A matched",
        "shared_fraction": "fraction of A's latents shared (both cosines above threshold)",
        "shared_fraction_decoder_only": "fraction shared by decoder cosine alone",
        "encoder_decoder_agreement": "fraction whose decoder and encoder partners agree",
        "mean_cos_decoder": "mean decoder cosine to the partner; NULL if none had one",
        "mean_cos_encoder": "mean encoder cosine to the partner; NULL if none had one",
        "seconds": "time the matching took",
    },
    "match": {
        "id": "the match's id",
        "pair_id": "its pair (match_pair.id)",
        "latent_index_a": 'the latent\'s index in SAE A (latent."index")',
        "partner_decoder": "index in SAE B of its partner by decoder directions",
        "cos_decoder": "decoder cosine to that partner; NULL if unmatched",
        "partner_encoder": "index in SAE B of its partner by encoder directions",
        "cos_encoder": "encoder cosine to that partner; NULL if unmatched",
        "shared": "true if both cosines pass the threshold with the same partner",
        "agree": "true if decoder and encoder matching chose the same partner",
    },
    "cache_version": {
        "id": "the version's id (what example.cache_version_id refers to)",
        "run_id": "its run (run.id)",
        "version": "1, 2, ... per run; readers use the newest complete one",
        "config": "the resolved cache config, JSON; NULL if not recorded (before 0004)",
        "config_hash": "hash of that config (same config, same version); NULL if unknown",
        "created_at": "when its windows began to be written (UTC)",
        "completed_at": "when its last window was written (UTC); NULL while incomplete",
    },
    "example": {
        "id": "the example's id",
        "latent_id": "its latent (latent.id)",
        "cache_version_id": "the cache version that wrote it (cache_version.id)",
        "kind": "top, quantile or random",
        "quantile_bin": "activation quantile bin for quantile examples, else NULL",
        "rank": "its rank within its kind (0 = strongest)",
        "token_ids": "the window's token ids, packed bytes",
        "activations": "the latent's activation on each token, packed bytes",
        "max_activation": "the largest activation in the window",
        "text": "the window decoded to text",
    },
    "campaign": {
        "id": "the campaign's id (`autointerp campaigns`, --campaign)",
        "key": "hash of its config and LLM identity (same both, same campaign)",
        "config": "the resolved score config, JSON",
        "llm_backend": "openai or transformers; NULL when no LLM takes part",
        "llm_model": "the model the LLM server serves; NULL when no LLM takes part",
        "llm": "the LLM as recorded (backend, model, server URLs), JSON",
        "created_at": "when it was first queued (UTC)",
    },
    "job": {
        "id": "the job's id",
        "latent_id": "the latent it works on (latent.id)",
        "stage": "the stage: explain or a scorer's name",
        "campaign_id": "its campaign (campaign.id): the config and LLM it runs under",
        "state": "queued, leased, done or failed",
        "attempts": "times a worker has taken it",
        "max_attempts": "attempts allowed before it fails",
        "lease_owner": "the worker holding it, while leased",
        "lease_expires_at": "when the lease lapses (UTC)",
        "last_error": "the last attempt's error",
        "created_at": "when it was queued (UTC)",
        "updated_at": "when it last changed (UTC)",
        "finished_at": "when it finished (UTC)",
    },
    "explanation": {
        "id": "the explanation's id",
        "latent_id": "the latent it explains (latent.id)",
        "job_id": "the job that wrote it (job.id)",
        "explainer": "the explainer that wrote it",
        "campaign_id": "its campaign (campaign.id); NULL: superseded before campaigns",
        "model": "the LLM that wrote it",
        "text": "the explanation",
        "raw": "the LLM's full answer",
        "created_at": "when it was written (UTC)",
    },
    "score": {
        "id": "the score's id",
        "latent_id": "the latent scored (latent.id)",
        "explanation_id": "the explanation tested (explanation.id)",
        "job_id": "the job that wrote it (job.id)",
        "campaign_id": "its campaign (campaign.id)",
        "scorer": "the scorer, e.g. detection or fuzzing; SCORER:hard on hard negatives",
        "control": "whose explanation: own, shuffled or cross_seed",
        "balanced_accuracy": "balanced accuracy of the LLM's predictions (intruder: the "
        "fraction of questions whose intruder it named)",
        "f1": "F1 of the LLM's predictions",
        "auc": "ROC AUC of the LLM's probabilities",
        "correlation": "simulation: Pearson correlation of predicted and true activations",
        "n_examples": "examples shown",
        "n_parsed": "answers that could be read",
        "n_failed": "answers that could not",
        "created_at": "when it was scored (UTC)",
    },
    "prediction": {
        "id": "the prediction's id",
        "score_id": "its score (score.id)",
        "example_id": "the example judged (example.id)",
        "label": "true if the latent really fired on the example",
        "predicted": "what the LLM said; NULL if unreadable",
        "probability": "the LLM's probability of firing",
        "raw": "the LLM's answer",
    },
    "llm_call": {
        "id": "the call's id",
        "job_id": "the job it served (job.id)",
        "campaign_id": "its campaign (campaign.id)",
        "stage": "explain or the scorer's name",
        "model": "the LLM called",
        "base_url": "the server called",
        "prompt_tokens": "tokens sent",
        "completion_tokens": "tokens received",
        "latency_s": "seconds the call took",
        "error": "the error, if it failed",
        "created_at": "when it was made (UTC)",
    },
    "calibration": {
        "id": "the calibration's id",
        "llm_model": "the LLM judged",
        "subject_model": "the model the planted latents live in",
        "config": "the calibration config, JSON",
        "created_at": "when it ran (UTC)",
    },
    "calibration_score": {
        "id": "the row's id",
        "calibration_id": "its calibration (calibration.id)",
        "rule": "the planted latent's rule",
        "scorer": "the scorer",
        "kind": "which explanation: right, wrong or an explainer's",
        "explanation": "the explanation scored",
        "metric": "the metric's name",
        "value": "the metric's value",
        "n_examples": "examples shown",
        "n_failed": "answers that could not be read",
    },
}


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    # True when the statement had more rows than were read.
    truncated: bool = False


def _sqlite_authorizer(
    action: int, arg1: str | None, _arg2: str | None, _db: str | None, _trigger: str | None
) -> int:
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _SQLITE_READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _refused(reason: str) -> UserError:
    return UserError(f"query refused: `autointerp query` only reads ({reason}); use SELECT")


def _invalid(reason: str) -> UserError:
    return UserError(f"query failed: {reason}; check the SQL")


def _timed_out(timeout_s: float) -> UserError:
    return UserError(
        f"query stopped after {timeout_s:g} s; narrow it, or allow longer with --timeout"
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _capped(rows: Any, columns: list[str], max_rows: int) -> QueryResult:
    """The first `max_rows` rows of an iterator, reading one more only to know if there are."""
    taken = [tuple(row) for row in itertools.islice(rows, max_rows + 1)]
    return QueryResult(columns, taken[:max_rows], truncated=len(taken) > max_rows)


def _query_sqlite(
    connection: sqlite3.Connection, sql: str, timeout_s: float, max_rows: int
) -> QueryResult:
    connection.execute("PRAGMA query_only = ON")
    connection.set_authorizer(_sqlite_authorizer)
    deadline = time.monotonic() + timeout_s
    # A true return interrupts the statement, even one that never yields a row.
    connection.set_progress_handler(lambda: time.monotonic() > deadline, _SQLITE_PROGRESS_STEPS)
    try:
        cursor = connection.execute(sql)
        columns = [column[0] for column in cursor.description or []]
        return _capped(cursor, columns, max_rows)
    except (sqlite3.Error, sqlite3.Warning) as error:
        message = _first_line(error)
        if message == "interrupted":
            raise _timed_out(timeout_s) from error
        if any(word in message for word in ("not authorized", "authorization denied", "readonly")):
            raise _refused(message) from error
        raise _invalid(message) from error


def _connect_reader(store: Store, timeout_s: float) -> psycopg.Connection[Any]:
    """A new connection to the store, logged in as the read-only role."""
    url = store.url.set(username=READER_ROLE, password=None)
    _, kwargs = store.engine.dialect.create_connect_args(url)
    # Last, so that they win over any `options` the store URL carries.
    settings = f"-c default_transaction_read_only=on -c statement_timeout={timeout_s * 1000:.0f}"
    kwargs["options"] = " ".join(filter(None, [kwargs.get("options"), settings]))
    try:
        return psycopg.connect(connect_timeout=POSTGRES_CONNECT_TIMEOUT_S, **kwargs)
    except psycopg.OperationalError as error:
        reason = _first_line(error)
        if f'role "{READER_ROLE}" does not exist' in reason:
            raise UserError(
                f"the store at {redact(store.url)} has no read-only role {READER_ROLE} for "
                "queries; run `autointerp db upgrade`"
            ) from error
        raise UserError(
            f"cannot log in to {redact(url)} as the read-only role {READER_ROLE} ({reason}); "
            "let it log in from here (pg_hba.conf, or a password in ~/.pgpass)"
        ) from error


def check_reader(connection: psycopg.Connection[Any]) -> None:
    """Refuse a session that cannot read the store, or that may do more than read."""
    with connection.cursor() as cursor:
        row = cursor.execute(_POSTGRES_CHECK_READER).fetchone()
    assert row is not None
    can_read, more = row
    role = connection.info.user
    if more:
        raise UserError(
            f"the role {role} that queries log in as may do more than read (superuser, "
            f"CREATEROLE/CREATEDB/REPLICATION/BYPASSRLS, or a member of "
            f"{'/'.join(_POSTGRES_POWERS)}); take those away from it, then retry"
        )
    if not can_read:
        raise UserError(f"the role {role} may not read this store yet; run `autointerp db upgrade`")


def _generator(rows: Iterator[Any]) -> Generator[Any, None, None]:
    # `Cursor.stream` is a generator (closing it cancels the query) though typed an iterator.
    assert isinstance(rows, Generator)
    return rows


def _describe(connection: psycopg.Connection[Any], sql: bytes) -> list[str]:
    """The statement's columns, known from parsing it alone: a statement that returns no
    rows is refused before it runs, and an empty result still has its header."""
    pgconn = connection.pgconn
    for result in (pgconn.prepare(b"", sql), pgconn.describe_prepared(b"")):
        if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
            raise psycopg.errors.error_from_result(result, encoding=connection.info.encoding)
    return [(result.fname(index) or b"").decode() for index in range(result.nfields)]


def _query_postgres(
    connection: psycopg.Connection[Any], sql: str, timeout_s: float, max_rows: int
) -> QueryResult:
    check_reader(connection)
    try:
        columns = _describe(connection, sql.encode())
        if not columns:
            raise _refused("the statement returns no rows")
        # Stopping early (closing the stream) cancels the rest of the statement on the server.
        with (
            connection.cursor() as cursor,
            closing(_generator(cursor.stream(sql.encode()))) as rows,
        ):
            return _capped(rows, columns, max_rows)
    except psycopg.errors.QueryCanceled as error:
        raise _timed_out(timeout_s) from error
    except (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege) as error:
        raise _refused(_first_line(error)) from error
    except psycopg.Error as error:
        raise _invalid(_first_line(error)) from error


def run_query(
    store: Store, sql: str, *, timeout_s: float | None = None, max_rows: int | None = None
) -> QueryResult:
    """Run one read-only statement: its columns and at most `max_rows` rows, stopped after
    `timeout_s` seconds (None: `DEFAULT_MAX_ROWS`, `DEFAULT_TIMEOUT_S`)."""
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    if not sql.strip():
        raise UserError("query is empty; pass one SELECT statement")
    if not timeout_s > 0:
        raise UserError(f"--timeout must be more than 0 seconds, not {timeout_s:g}")
    if max_rows < 1:
        raise UserError(f"--max-rows must be at least 1, not {max_rows}")
    if store.backend == "postgresql":
        # Closed, never committed: whatever the statement did is rolled back.
        with closing(_connect_reader(store, timeout_s)) as connection:
            return _query_postgres(connection, sql, timeout_s, max_rows)
    pooled = store.engine.connect()
    try:
        driver_connection = pooled.connection.driver_connection
        assert isinstance(driver_connection, sqlite3.Connection)
        return _query_sqlite(driver_connection, sql, timeout_s, max_rows)
    finally:
        # Never hand this connection back to the pool with the read-only settings on it.
        pooled.invalidate()
        pooled.close()


def schema_result() -> QueryResult:
    """The store's tables and columns, each with its type and meaning."""
    rows = [
        (table.name, column.name, str(column.type), COLUMN_MEANINGS[table.name][column.name])
        for table in Base.metadata.sorted_tables
        for column in table.columns
    ]
    return QueryResult(["table", "column", "type", "meaning"], rows)


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
