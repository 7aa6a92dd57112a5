"""Cached windows versioned by cache config, in the store on real SQLite and PostgreSQL:
the migration that puts existing windows into a version 1, which version readers see, the
bulk writer and the free-disk check. The `cache` stage itself is in test_cache_stage.py."""

import sqlite3
from typing import Any

import numpy as np
import pytest
from alembic import command
from sqlalchemy import func, inspect, select, text

from sae.errors import UserError
from sae.latent_stats import SaeWindows
from service.cache.writer import check_free_disk, write_windows
from service.store.engine import Store, alembic_config, open_store, upgrade
from service.store.models import CacheVersion, Example, Latent, Sae
from service.store.runs import latent_ids, register_run, register_sae
from service.store.windows import (
    cache_config_hash,
    complete_cache_version,
    count_windows,
    decode_window,
    find_cache_version,
    latent_windows,
    latest_cache_version,
    start_cache_version,
)

OLD_EXAMPLE = (
    "INSERT INTO example (latent_id, kind, quantile_bin, rank, token_ids, activations, "
    "max_activation, text) VALUES (:latent, 'top', NULL, 0, :tokens, :acts, 1.0, 'old')"
)


def add_run(store: Store, name: str, n_latents: int = 3) -> tuple[int, list[int]]:
    """A run with one SAE; its id and its latents' ids."""
    with store.session() as session, session.begin():
        run = register_run(
            session,
            name,
            subject_model="smollm2",
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=n_latents,
            k=2,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=n_latents, d_in=16)
        return run.id, [int(i) for i in latent_ids(session, sae)]


def windows(n_latents: int, per_latent: int, width: int = 4, offset: int = 0) -> SaeWindows:
    """`per_latent` top windows of each latent, token ids offset by `offset`."""
    rows = n_latents * per_latent
    return SaeWindows(
        latent=np.repeat(np.arange(n_latents), per_latent),
        kind=["top"] * rows,
        quantile_bin=np.full(rows, -1),
        rank=np.tile(np.arange(per_latent), n_latents),
        token_ids=(np.arange(rows * width).reshape(rows, width) + offset).astype(np.int32),
        activations=np.linspace(0.5, 2.0, rows * width, dtype=np.float32).reshape(rows, width),
    )


def texts(token_ids: list[list[int]]) -> list[str]:
    return [" ".join(map(str, row)) for row in token_ids]


def write_version(store: Store, run_id: int, ids: list[int], config: dict[str, Any], offset: int):
    with store.session() as session:
        version = start_cache_version(session, run_id, config)
        session.commit()
    batches = windows(len(ids), 2, offset=offset).batches(4)
    written = write_windows(store, version.id, np.asarray(ids), batches, texts)
    return version, written


def test_migration_puts_existing_windows_in_an_honest_version_1(store_url: str):
    upgrade(store_url, "0003")
    old = open_store(store_url, check=False)
    try:
        run_id, ids = add_run(old, "before")
        add_run(old, "no-windows")
        tokens, acts = np.arange(4, dtype="<i4").tobytes(), np.ones(4, dtype="<f4").tobytes()
        with old.session() as session, session.begin():
            for latent in ids[:2]:
                session.execute(
                    text(OLD_EXAMPLE), {"latent": latent, "tokens": tokens, "acts": acts}
                )
    finally:
        old.dispose()

    upgrade(store_url)
    store = open_store(store_url)
    try:
        with store.read_session() as session:
            versions = session.scalars(select(CacheVersion)).all()
            assert [(v.run_id, v.version) for v in versions] == [(run_id, 1)]
            (version,) = versions
            assert version.config is None and version.config_hash is None
            assert version.completed_at is not None
            # SQL NULL, not a JSON null: the config is unknown, not an empty one.
            unknown = session.scalar(
                text("SELECT COUNT(*) FROM cache_version WHERE config IS NULL")
            )
            assert unknown == 1
            latest = latest_cache_version(session, run_id)
            assert latest is not None and latest.id == version.id
            assert count_windows(session, version.id) == 2
            (row,) = session.scalars(latent_windows(ids[0])).all()
            assert row.text == "old" and row.cache_version_id == version.id
            assert session.scalars(latent_windows(ids[2])).all() == []
    finally:
        store.dispose()


def downgrade_store(store: Store, revision: str) -> None:
    """Migrate the store down to `revision` (SQLite's batch mode needs foreign keys off)."""
    with store.engine.connect() as connection:
        if store.backend == "sqlite":
            driver = connection.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            driver.execute("PRAGMA foreign_keys = OFF")
        with connection.begin():
            command.downgrade(alembic_config(connection), revision)


def test_downgrade_keeps_the_newest_complete_version(store: Store):
    run_id, ids = add_run(store, "r")
    write_version(store, run_id, ids, {"window": 4}, offset=0)
    newest, written = write_version(store, run_id, ids, {"window": 8}, offset=100)
    with store.session() as session, session.begin():
        complete_cache_version(session, session.merge(newest))
    downgrade_store(store, "0003")
    assert "cache_version" not in inspect(store.engine).get_table_names()
    with store.engine.connect() as connection:
        kept = connection.execute(text("SELECT token_ids FROM example")).scalars().all()
    assert len(kept) == written
    assert min(int(decode_window(tokens, tokens)[0][0]) for tokens in kept) >= 100


def test_versions_are_numbered_and_only_complete_ones_are_read(store: Store):
    run_id, ids = add_run(store, "r")
    other_run, other_ids = add_run(store, "other")
    first, written = write_version(store, run_id, ids, {"window": 4}, offset=0)
    assert written == 6
    with store.read_session() as session:
        # Written but not complete: no reader sees it.
        assert latest_cache_version(session, run_id) is None
        assert session.scalars(latent_windows(ids[0])).all() == []
    with store.session() as session, session.begin():
        complete_cache_version(session, session.merge(first))
    second, _ = write_version(store, run_id, ids, {"window": 8}, offset=100)
    with store.read_session() as session:
        assert (first.version, second.version) == (1, 2)
        latest = latest_cache_version(session, run_id)
        assert latest is not None and latest.id == first.id
        shown = session.scalars(latent_windows(ids[1]).order_by(Example.rank)).all()
        assert [row.rank for row in shown] == [0, 1]
        assert all(row.cache_version_id == first.id for row in shown)
        tokens, activations = decode_window(shown[0].token_ids, shown[0].activations)
        assert tokens.tolist() == [8, 9, 10, 11]
        assert shown[0].text == "8 9 10 11"
        assert shown[0].quantile_bin is None
        assert np.isclose(shown[0].max_activation, activations.max())
        found = find_cache_version(session, run_id, cache_config_hash({"window": 8}))
        assert found is not None and found.id == second.id and found.completed_at is None
        assert find_cache_version(session, other_run, cache_config_hash({"window": 8})) is None
        assert session.scalars(latent_windows(other_ids[0])).all() == []
    with store.session() as session, session.begin():
        complete_cache_version(session, session.merge(second))
    with store.read_session() as session:
        latest = latest_cache_version(session, run_id)
        assert latest is not None and latest.id == second.id
        newest = session.scalars(latent_windows(ids[1])).all()
        assert {row.cache_version_id for row in newest} == {second.id}
        older = session.scalars(latent_windows(ids[1], first.id)).all()
        assert len(older) == 2 and {row.cache_version_id for row in older} == {first.id}
        # Nothing of version 1 was touched by writing version 2.
        assert count_windows(session, first.id) == count_windows(session, second.id) == 6
        sae_id = session.scalar(select(Sae.id).where(Sae.run_id == run_id))
        assert count_windows(session, first.id, sae_id) == 6
        total = session.scalar(select(func.count()).select_from(Example).join(Latent))
        assert total == 12


def test_free_disk_check(store: Store):
    assert check_free_disk(store, 1)
    if store.backend == "sqlite":
        with pytest.raises(UserError, match="needs about .* free: free disk space"):
            check_free_disk(store, 10**18)
    else:
        # The server's disk is not ours to see; the database's size is reported instead.
        assert "database now" in check_free_disk(store, 10**18)


def test_window_text_with_nul_is_stored(store: Store):
    """A window whose tokens decode to a NUL byte (PostgreSQL text cannot hold one) keeps its
    exact token ids and gets a replacement character in its text."""
    run_id, ids = add_run(store, "r", n_latents=1)
    with store.session() as session, session.begin():
        version = start_cache_version(session, run_id, {"window": 4})
    written = write_windows(
        store, version.id, np.asarray(ids), [windows(1, 1)], lambda rows: ["a\x00b"] * len(rows)
    )
    assert written == 1
    with store.read_session() as session:
        row = session.scalars(select(Example)).one()
        assert row.text == "a\ufffdb"
        assert decode_window(row.token_ids, row.activations)[0].tolist() == [0, 1, 2, 3]
