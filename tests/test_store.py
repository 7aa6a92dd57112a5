"""The store on real SQLite and PostgreSQL: migrations, revision checks, engine settings,
result writers and the read-only query."""

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

from sae.errors import UserError
from service.store import engine as store_engine
from service.store.engine import Store, head_revision, open_store, upgrade
from service.store.matches import store_match_pair
from service.store.models import Base, Latent, Match, MatchPair, Run, Sae
from service.store.query import format_result, run_query
from service.store.runs import get_run, latent_ids, register_run, register_sae, store_latent_stats
from service.store.windows import decode_window, encode_window


def add_run(store: Store, name: str = "r", n_latents: int = 8, seeds: tuple[int, ...] = (0, 1)):
    with store.session() as session, session.begin():
        run = register_run(
            session,
            name,
            subject_model="smollm2",
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=n_latents,
            k=4,
            seeds=seeds,
            config={"lr": 1e-3},
        )
        saes = [register_sae(session, run, seed, n_latents=n_latents, d_in=16) for seed in seeds]
        return run, saes


def count(store: Store, model: type[Base]) -> int:
    with store.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# --- migrations and revisions -------------------------------------------------------------


def test_upgrade_builds_exactly_the_models_schema(store: Store):
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []
    tables = set(inspect(store.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_upgrade_twice_is_a_no_op(store_url: str):
    assert upgrade(store_url) == (None, head_revision())
    assert upgrade(store_url) == (head_revision(), head_revision())


def test_empty_store_says_how_to_create_it(store_url: str, tmp_path: Path):
    with pytest.raises(UserError, match="autointerp db upgrade"):
        open_store(store_url)


def test_missing_sqlite_file_is_not_created_by_opening(tmp_path: Path):
    path = tmp_path / "absent.db"
    with pytest.raises(UserError, match="no store at .*autointerp db upgrade"):
        open_store(f"sqlite:///{path}")
    assert not path.exists()


def test_newer_schema_is_refused(store: Store):
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    with pytest.raises(UserError, match="newer than this autointerp"):
        open_store(store.url)
    with pytest.raises(UserError, match="newer than this autointerp"):
        upgrade(store.url)


NEXT_MIGRATION = '''"""Test-only revision: a batch ALTER of a table that others reference."""

import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch.alter_column("dataset", existing_type=sa.String(500), type_=sa.String(600))


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.drop_column("note")
'''


def test_older_schema_is_refused_then_upgraded_keeping_rows(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A later migration (written to a copy of service/migrations/) makes the store one revision
    behind; upgrading applies it, on SQLite as a table rebuild, without losing child rows."""
    add_run(store)
    migrations = tmp_path / "migrations"
    shutil.copytree(store_engine.MIGRATIONS_DIR, migrations)
    (migrations / "versions" / "9001_next.py").write_text(
        NEXT_MIGRATION.format(head=head_revision())
    )
    monkeypatch.setattr(store_engine, "MIGRATIONS_DIR", migrations)

    with pytest.raises(UserError, match="older than .*run `autointerp db upgrade`"):
        open_store(store.url)
    assert upgrade(store.url)[1] == "9001"
    upgraded = open_store(store.url)
    try:
        columns = {column["name"] for column in inspect(upgraded.engine).get_columns("run")}
        assert "note" in columns
        assert count(upgraded, Sae) == 2
        assert count(upgraded, Latent) == 16
    finally:
        upgraded.dispose()


def test_unreachable_server_is_one_clear_line():
    with pytest.raises(UserError, match="cannot reach the store at .*127.0.0.1:1/"):
        open_store("postgresql://nobody@127.0.0.1:1/nothing")


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", "sqlite:////no/such/dir/x.db"])
def test_bad_urls_are_user_errors(url: str):
    with pytest.raises(UserError):
        upgrade(url)


# --- engine settings ----------------------------------------------------------------------


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    store = open_store(url)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
    store.dispose()


def test_sqlite_write_session_takes_the_write_lock_at_begin(tmp_path: Path):
    """`session()` must issue BEGIN IMMEDIATE: a plain read inside it already blocks another
    writer. `read_session()` must not."""
    path = tmp_path / "s.db"
    upgrade(f"sqlite:///{path}")
    store = open_store(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    with store.session() as session, session.begin():
        session.execute(select(Run.id)).all()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    with store.read_session() as session, session.begin():
        session.execute(select(Run.id)).all()
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    other.close()
    store.dispose()


def test_foreign_keys_are_enforced(store: Store):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), store.session() as session, session.begin():
        session.add(Latent(sae_id=12345, index=0))


# --- result writers -----------------------------------------------------------------------


def test_register_run_and_saes_is_idempotent(store: Store):
    add_run(store, n_latents=8)
    add_run(store, n_latents=8)
    assert count(store, Run) == 1
    assert count(store, Sae) == 2
    assert count(store, Latent) == 16
    with store.read_session() as session:
        run = get_run(session, "r")
        assert run.seeds == [0, 1] and run.config == {"lr": 1e-3}
        sae = session.scalars(select(Sae).where(Sae.seed == 1)).one()
        assert sae.architecture == "topk" and sae.k == 4
        ids = latent_ids(session, sae)
        assert (ids > 0).all() and len(set(ids.tolist())) == 8


def test_register_sae_refuses_a_different_size(store: Store):
    add_run(store, n_latents=8)
    with (
        pytest.raises(UserError, match="already has a seed-0 SAE .* 8 latents, not 16"),
        store.session() as session,
        session.begin(),
    ):
        register_sae(session, get_run(session, "r"), 0, n_latents=16, d_in=16)


def test_get_run_names_the_runs_there_are(store: Store):
    add_run(store, name="alpha")
    with (
        pytest.raises(UserError, match="no run named 'beta' .*alpha"),
        store.read_session() as session,
    ):
        get_run(session, "beta")


def test_store_match_pair_flags_and_summary_and_replacement(store: Store):
    _, (sae_a, sae_b) = add_run(store, n_latents=4)
    arrays = {
        "partner_decoder": [1, 0, 2, 3],
        "cos_decoder": [0.9, 0.75, 0.70, 0.2],
        "partner_encoder": [1, 2, 2, 0],
        "cos_encoder": [0.8, 0.5, 0.95, 0.9],
    }
    with store.session() as session, session.begin():
        store_match_pair(session, sae_a, sae_b, solver="scipy", seconds=0.1, **arrays)
    with store.read_session() as session:
        pair = session.scalars(select(MatchPair)).one()
        matches = session.scalars(select(Match).order_by(Match.latent_index_a)).all()
    # 0.70 is not above the threshold: shared is strict.
    assert [m.shared for m in matches] == [True, False, False, False]
    assert [m.agree for m in matches] == [True, False, True, False]
    assert pair.shared_fraction == pytest.approx(0.25)
    assert pair.shared_fraction_decoder_only == pytest.approx(0.5)
    assert pair.encoder_decoder_agreement == pytest.approx(0.5)
    assert pair.mean_cos_decoder == pytest.approx(np.mean(arrays["cos_decoder"]))

    arrays["cos_encoder"] = [0.9, 0.9, 0.9, 0.9]
    with store.session() as session, session.begin():
        store_match_pair(session, sae_a, sae_b, solver="scipy", **arrays)
    assert count(store, MatchPair) == 1
    assert count(store, Match) == 4
    with store.read_session() as session:
        assert session.scalar(select(MatchPair.shared_fraction)) == pytest.approx(0.5)


def test_unmatched_latents_are_stored_without_a_cosine(store: Store):
    """A zero or non-finite direction has no partner (-1) and no cosine (NaN): stored as
    NULL, never shared, never agreeing, and left out of the mean cosine."""
    _, (sae_a, sae_b) = add_run(store, n_latents=3)
    with store.session() as session, session.begin():
        store_match_pair(
            session,
            sae_a,
            sae_b,
            solver="sparse",
            partner_decoder=[1, -1, 0],
            cos_decoder=[0.9, np.nan, 0.5],
            partner_encoder=[1, -1, 2],
            cos_encoder=[0.8, np.nan, 0.4],
        )
    with store.read_session() as session:
        pair = session.scalars(select(MatchPair)).one()
        matches = session.scalars(select(Match).order_by(Match.latent_index_a)).all()
    assert [m.cos_decoder for m in matches] == [pytest.approx(0.9), None, pytest.approx(0.5)]
    assert [(m.shared, m.agree) for m in matches] == [(True, True), (False, False), (False, False)]
    assert pair.mean_cos_decoder == pytest.approx(0.7)
    assert pair.shared_fraction == pytest.approx(1 / 3)


def test_store_latent_stats(store: Store):
    _, (sae, _) = add_run(store, n_latents=4)
    with store.session() as session, session.begin():
        store_latent_stats(session, sae, [0, 5, 10, 1], 100, [0.0, 1.5, 2.5, 0.5])
    with store.read_session() as session:
        rows = session.execute(
            select(Latent.firing_count, Latent.firing_frequency, Latent.max_activation)
            .where(Latent.sae_id == sae.id)
            .order_by(Latent.index)
        ).all()
    assert [tuple(row) for row in rows] == [
        (0, 0.0, 0.0),
        (5, 0.05, 1.5),
        (10, 0.1, 2.5),
        (1, 0.01, 0.5),
    ]


@pytest.mark.parametrize("half", [False, True])
def test_windows_round_trip_compactly(half: bool):
    tokens = [5, 70000, 0, 2**31 - 1]
    values = [0.0, 1.5, -2.25, 1000.0]
    token_bytes, value_bytes = encode_window(tokens, values, half=half)
    assert len(token_bytes) == 16 and len(value_bytes) == (8 if half else 16)
    decoded_tokens, decoded_values = decode_window(token_bytes, value_bytes)
    assert decoded_tokens.tolist() == tokens
    assert decoded_values.tolist() == values


# --- read-only query ----------------------------------------------------------------------


def test_query_returns_rows_and_formats(store: Store):
    add_run(store, name="alpha")
    result = run_query(store, "SELECT name, n_latents FROM run WHERE name LIKE 'al%'")
    assert result.columns == ["name", "n_latents"]
    assert result.rows == [("alpha", 8)]
    assert format_result(result, "csv") == "name,n_latents\nalpha,8\n"
    assert '"name": "alpha"' in format_result(result, "json")


WRITES = [
    "DELETE FROM run",
    "UPDATE run SET name = 'x'",
    "INSERT INTO run (name) VALUES ('x')",
    "DROP TABLE latent",
    "CREATE TABLE intruder (a INTEGER)",
    "SELECT 1; DELETE FROM run",
    "COMMIT",
    "SET TRANSACTION READ WRITE",
    "PRAGMA query_only = OFF",
    "ALTER TABLE run ADD COLUMN intruder INTEGER",
]


@pytest.mark.parametrize("sql", WRITES)
def test_query_refuses_writes_and_changes_nothing(store: Store, sql: str):
    add_run(store)
    before = (count(store, Run), count(store, Latent), head_revision())
    with pytest.raises(UserError, match="query (refused|failed)"):
        run_query(store, sql)
    assert (count(store, Run), count(store, Latent), head_revision()) == before
    assert "intruder" not in inspect(store.engine).get_table_names()
    with store.read_session() as session:
        assert session.scalar(select(Run.name)) == "r"


def test_query_refuses_writes_in_ctes_and_functions(store: Store):
    add_run(store)
    sql = (
        "WITH gone AS (DELETE FROM run RETURNING id) SELECT count(*) FROM gone"
        if store.backend == "postgresql"
        else "ATTACH DATABASE ':memory:' AS other"
    )
    with pytest.raises(UserError, match="query (refused|failed)"):
        run_query(store, sql)
    assert count(store, Run) == 1


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT * FROM no_such_table", "   "])
def test_query_reports_invalid_sql(store: Store, sql: str):
    with pytest.raises(UserError):
        run_query(store, sql)


def test_query_leaves_pooled_connections_writable(store: Store):
    with pytest.raises(UserError):
        run_query(store, "DELETE FROM run")
    add_run(store, name="after")
    assert count(store, Run) == 1
