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
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
from sqlalchemy import func, select

from sae.errors import UserError
from sae.latent_stats import CacheConfig, SaeWindows
from service.store.engine import Store
from service.store.windows import insert_windows

BATCH_ROWS = 20_000
# Stored bytes of one window besides its token ids and activations (4 bytes per token
# each): its decoded text, the other columns, the row header and the index entries.
# `bench.cache write` measured 580-630 bytes per 32-token window on SQLite and PostgreSQL;
# the estimate (648 there) errs high.
TEXT_BYTES_PER_TOKEN = 6
ROW_OVERHEAD_BYTES = 200

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


def batch_decoder(tokenizer: Any) -> Decode:
    """Windows' text as `tokenizer.decode` gives it, a batch at a time: through the fast
    tokenizer's own batch decode (parallel, in Rust; about 3x transformers' per-window loop)
    when that gives the same text, that is when the tokenizer does not clean up spaces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return partial(backend.decode_batch, skip_special_tokens=False)
    return cast(Decode, tokenizer.batch_decode)


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
        # Encoded as `encode_window` does, a whole batch at once.
        tokens = np.ascontiguousarray(batch.token_ids, dtype="<i4")
        activations = np.ascontiguousarray(batch.activations, dtype="<f4")
        texts = decode(batch.token_ids.tolist())
        store_ids = latent_ids[batch.latent].tolist()
        bins = [None if b < 0 else b for b in batch.quantile_bin.tolist()]
        maxima = activations.max(axis=1).tolist() if len(batch) else []
        rows = [
            (
                store_ids[row],
                version_id,
                batch.kind[row],
                bins[row],
                rank,
                tokens[row].tobytes(),
                activations[row].tobytes(),
                maxima[row],
                # PostgreSQL text cannot hold NUL; the token ids keep the exact window.
                str(texts[row]).replace("\x00", "\ufffd"),
            )
            for row, rank in enumerate(batch.rank.tolist())
        ]
        with store.session() as session:
            insert_windows(session, rows)
            session.commit()
        written += len(rows)
        if on_rows is not None:
            on_rows(len(rows))
    return written
