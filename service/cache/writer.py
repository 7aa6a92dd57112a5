"""Writing a cache version's windows into the store in bounded batches, and what that will
cost on disk.

One SAE's windows are encoded, decoded to text and inserted `BATCH_ROWS` at a time, each
batch committed on its own, so memory does not grow with the number of latents or windows
and a database never holds one transaction of millions of rows. Before anything is
written, `check_free_disk` refuses a SQLite store whose filesystem lacks room for the
estimated size.
"""

import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from sae.errors import UserError
from sae.latent_stats import CacheConfig, SaeWindows
from service.store.engine import Store
from service.store.windows import encode_window, insert_windows

BATCH_ROWS = 20_000
# Stored bytes of one window besides its token ids and activations (4 bytes per token
# each): its decoded text, the other columns, the row header and the index entries. Measured
# by `bench.cache` on SmolLM2's tokenizer; it errs high.
TEXT_BYTES_PER_TOKEN = 6
ROW_OVERHEAD_BYTES = 160

Decode = Callable[[list[list[int]]], Sequence[str]]


def windows_per_latent(config: CacheConfig) -> int:
    """The most windows `cache` keeps of one latent: top, quantile samples and non-firing."""
    return config.n_top + config.quantile_bins * config.per_quantile_bin + config.negatives


def estimated_bytes(n_windows: int, window: int) -> int:
    """About how much store `n_windows` windows of `window` tokens take."""
    return n_windows * (window * (8 + TEXT_BYTES_PER_TOKEN) + ROW_OVERHEAD_BYTES)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


def check_free_disk(store: Store, needed: int) -> str:
    """A line on the room there is for `needed` bytes; a UserError when a SQLite store's
    filesystem has less free. On PostgreSQL the server's disk is not visible from here: the
    line gives the database's current size instead."""
    if store.backend == "postgresql":
        with store.read_session() as session:
            size = session.scalar(select(func.pg_database_size(func.current_database())))
        return f"database now {human_bytes(int(size or 0))}; free disk not checked on PostgreSQL"
    database = store.url.database
    if not database or database == ":memory:":
        return "in-memory store"
    folder = Path(database).resolve().parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"the store {database} needs about {human_bytes(needed)} for these windows but "
            f"{folder} has {human_bytes(free)} free: free disk space, keep fewer windows "
            "(--n-top, --per-bin, --negatives) or use a store elsewhere"
        )
    return f"{human_bytes(free)} free at {folder}"


def write_windows(
    store: Store,
    version_id: int,
    latent_ids: np.ndarray,
    windows: Iterable[SaeWindows],
    decode: Decode,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Insert batches of one SAE's windows into version `version_id`, committing each;
    `latent_ids[i]` is the store id of latent index i. Returns the rows written."""
    written = 0
    for batch in windows:
        texts = decode(batch.token_ids.tolist())
        rows = []
        for row in range(len(batch)):
            token_bytes, activation_bytes = encode_window(
                batch.token_ids[row], batch.activations[row]
            )
            quantile_bin = int(batch.quantile_bin[row])
            rows.append(
                (
                    int(latent_ids[batch.latent[row]]),
                    version_id,
                    batch.kind[row],
                    quantile_bin if quantile_bin >= 0 else None,
                    int(batch.rank[row]),
                    token_bytes,
                    activation_bytes,
                    float(batch.activations[row].max()),
                    # PostgreSQL text cannot hold NUL; the token ids keep the exact window.
                    str(texts[row]).replace("\x00", "\ufffd"),
                )
            )
        with store.session() as session:
            insert_windows(session, rows)
            session.commit()
        written += len(rows)
        if on_rows is not None:
            on_rows(len(rows))
    return written
