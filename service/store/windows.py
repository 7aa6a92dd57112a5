"""Example windows in the store: how one is encoded (token ids as int32 and activations as
float32 or float16, little-endian bytes in two columns of the `example` table), which cache
version of a run they belong to, and how they are written in bulk.

Every window points to a `cache_version`: one `cache` of a run under one resolved config.
Versions are only added, never replaced, so a stored prediction keeps its window. Readers
use the run's newest complete version unless told otherwise (`latent_windows`); a version
being written is invisible until `complete_cache_version`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ScalarSelect, Select, delete, func, select
from sqlalchemy.orm import Session

from service.store.models import CacheVersion, Example, Latent, Sae, utcnow

# The columns `insert_windows` writes, in the order of its rows' values.
WINDOW_COLUMNS = (
    "latent_id",
    "cache_version_id",
    "kind",
    "quantile_bin",
    "rank",
    "token_ids",
    "activations",
    "max_activation",
    "text",
)


def encode_window(
    token_ids: npt.ArrayLike, activations: npt.ArrayLike, half: bool = False
) -> tuple[bytes, bytes]:
    """Token ids as int32 and activations as float32 (float16 with `half`), little-endian."""
    tokens = np.asarray(token_ids, dtype="<i4")
    values = np.asarray(activations, dtype="<f2" if half else "<f4")
    if tokens.shape != values.shape or tokens.ndim != 1:
        raise ValueError("expected one activation per token of a 1-D window")
    return tokens.tobytes(), values.tobytes()


def decode_window(token_bytes: bytes, activation_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_window`; the activations' width (2 or 4 bytes) follows from sizes."""
    tokens = np.frombuffer(token_bytes, dtype="<i4")
    width = len(activation_bytes) // max(len(tokens), 1)
    values = np.frombuffer(activation_bytes, dtype="<f2" if width == 2 else "<f4")
    return tokens.astype(np.int64), values.astype(np.float32)


def cache_config_hash(config: dict[str, Any]) -> str:
    """The hash that says two resolved cache configs are the same."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_cache_version(session: Session, run_id: int, config_hash: str) -> CacheVersion | None:
    """The run's newest version cached under the config with this hash, complete or not."""
    return session.scalars(
        select(CacheVersion)
        .where(CacheVersion.run_id == run_id, CacheVersion.config_hash == config_hash)
        .order_by(CacheVersion.version.desc())
        .limit(1)
    ).first()


def start_cache_version(
    session: Session, run_id: int, config: dict[str, Any] | None
) -> CacheVersion:
    """A new, incomplete version of the run's windows; `config` None: not known."""
    newest = session.scalar(
        select(func.max(CacheVersion.version)).where(CacheVersion.run_id == run_id)
    )
    version = CacheVersion(
        run_id=run_id,
        version=(newest or 0) + 1,
        config=config,
        config_hash=None if config is None else cache_config_hash(config),
    )
    session.add(version)
    session.flush()
    return version


def complete_cache_version(session: Session, version: CacheVersion) -> None:
    """Make the version's windows visible to readers (the caller commits)."""
    version.completed_at = utcnow()


def latest_cache_version(session: Session, run_id: int) -> CacheVersion | None:
    """The run's newest complete version: the windows readers use by default."""
    return session.scalars(
        select(CacheVersion)
        .where(CacheVersion.run_id == run_id, CacheVersion.completed_at.is_not(None))
        .order_by(CacheVersion.version.desc())
        .limit(1)
    ).first()


def _latest_version_of_latent(latent_id: int) -> ScalarSelect[Any]:
    """SQL for the id of the newest complete version of the run latent `latent_id` is in."""
    return (
        select(CacheVersion.id)
        .join(Sae, Sae.run_id == CacheVersion.run_id)
        .join(Latent, Latent.sae_id == Sae.id)
        .where(Latent.id == latent_id, CacheVersion.completed_at.is_not(None))
        .order_by(CacheVersion.version.desc())
        .limit(1)
        .scalar_subquery()
    )


def latent_windows(latent_id: int, version_id: int | None = None) -> Select[Example]:
    """A query for the latent's windows in version `version_id`, by default the newest
    complete version of its run; callers add their own filters and order."""
    version = _latest_version_of_latent(latent_id) if version_id is None else version_id
    return select(Example).where(
        Example.latent_id == latent_id, Example.cache_version_id == version
    )


def version_for_added_windows(session: Session, latent_id: int) -> int:
    """The version that windows added by hand (planted, imported) to this latent go into:
    its run's newest complete version, or else a new complete one with config unknown."""
    run_id = session.scalar(
        select(Sae.run_id).join(Latent, Latent.sae_id == Sae.id).where(Latent.id == latent_id)
    )
    if run_id is None:
        raise LookupError(f"latent {latent_id} is not in the store")
    version = latest_cache_version(session, run_id)
    if version is None:
        version = start_cache_version(session, run_id, None)
        complete_cache_version(session, version)
        session.flush()
    return version.id


def count_windows(session: Session, version_id: int, sae_id: int | None = None) -> int:
    """Windows stored in a version, of one SAE or of all."""
    query = select(func.count()).select_from(Example).where(Example.cache_version_id == version_id)
    if sae_id is not None:
        query = query.join(Latent, Latent.id == Example.latent_id).where(Latent.sae_id == sae_id)
    return int(session.scalar(query) or 0)


def delete_sae_windows(session: Session, version_id: int, sae_id: int) -> None:
    """Drop one SAE's windows of a version (only ever of one no reader has seen: incomplete)."""
    session.execute(
        delete(Example).where(
            Example.cache_version_id == version_id,
            Example.latent_id.in_(select(Latent.id).where(Latent.sae_id == sae_id)),
        )
    )


def insert_windows(session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
    """Bulk insert of window rows, values in `WINDOW_COLUMNS` order: PostgreSQL's COPY
    through psycopg 3, one executemany elsewhere; both in the session's transaction."""
    connection = session.connection()
    columns = ", ".join(WINDOW_COLUMNS)
    if connection.dialect.name == "postgresql":
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY example ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" for _ in WINDOW_COLUMNS)
    connection.exec_driver_sql(f"INSERT INTO example ({columns}) VALUES ({marks})", list(rows))
