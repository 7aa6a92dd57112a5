"""The `cache` stage end to end: real SmolLM2, SAE checkpoints on disk, both store backends."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import delete, func, select

from sae.checkpoint import SaeWeights, save_sparsify
from sae.errors import UserError
from sae.latent_stats import CacheConfig
from service.cache.stage import cache_run
from service.cache.windows import load_latent_examples
from service.store.engine import Store
from service.store.models import (
    CacheVersion,
    Example,
    Explanation,
    Latent,
    Prediction,
    Sae,
    Score,
)
from service.store.runs import register_run, register_sae
from service.store.windows import count_windows, decode_window, latent_windows, latest_cache_version

HOOKPOINT = "model.layers.6.mlp"
N_LATENTS = 24
CONFIG = CacheConfig(
    window=16, n_top=4, n_reservoir=12, quantile_bins=3, per_quantile_bin=2, chunk_len=128
)


def sized(tokens: int) -> CacheConfig:
    return CONFIG.model_copy(update={"tokens": tokens})


def make_run(store: Store, folder: Path, seeds: tuple[int, ...] = (0, 1)) -> None:
    with store.session() as session:
        run = register_run(
            session,
            "cache-test",
            subject_model="smollm2",
            hookpoint=HOOKPOINT,
            dataset="embedded",
            architecture="relu",
            n_latents=N_LATENTS,
            k=None,
            seeds=list(seeds),
            path=str(folder),
        )
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            encoder = torch.randn(N_LATENTS, 576, generator=generator) / 576**0.5
            weights = SaeWeights(
                encoder_weight=encoder,
                encoder_bias=-torch.linspace(0.2, 2.0, N_LATENTS),
                W_dec=torch.nn.functional.normalize(encoder, dim=1),
                b_dec=torch.zeros(576),
                cfg={"architecture": "relu", "d_in": 576, "num_latents": N_LATENTS},
            )
            sae_folder = folder / HOOKPOINT / f"seed{seed}"
            save_sparsify(sae_folder, weights)
            register_sae(session, run, seed, n_latents=N_LATENTS, d_in=576, path=str(sae_folder))
        session.commit()


def test_cache_writes_statistics_and_examples(store: Store, tmp_path: Path, home: Path):
    make_run(store, tmp_path)
    summary = cache_run(store, "cache-test", home, sized(4096), show_progress=False)
    assert summary.n_tokens == 4096
    assert [sae.seed for sae in summary.saes] == [0, 1]
    with store.read_session() as session:
        counts = session.scalars(select(Latent.firing_count)).all()
        assert len(counts) == 2 * N_LATENTS
        assert all(count is not None for count in counts)
        assert sum(counts) > 0
        n_examples = session.scalar(select(func.count()).select_from(Example))
        assert n_examples == sum(sae.n_examples for sae in summary.saes) > 0
        kinds = set(session.scalars(select(Example.kind)).all())
        assert {"top", "random"} <= kinds
        top = session.scalars(
            select(Example).where(Example.kind == "top").order_by(Example.max_activation.desc())
        ).first()
        assert top is not None and top.text
        tokens, activations = decode_window(top.token_ids, top.activations)
        assert tokens.shape == activations.shape == (16,)
        assert np.isclose(activations.max(), top.max_activation)
        latent = session.get(Latent, top.latent_id)
        assert latent is not None and latent.max_activation is not None
        assert latent.max_activation >= top.max_activation - 1e-5
    # No resume file is left behind once the results are stored.
    assert not list(tmp_path.glob("latent-cache-*.pt"))


def example_ids(store: Store) -> list[int]:
    with store.read_session() as session:
        return list(session.scalars(select(Example.id).order_by(Example.id)))


def test_rerun_with_the_same_config_is_a_no_op(store: Store, tmp_path: Path, home: Path):
    make_run(store, tmp_path, seeds=(3,))
    lines: list[str] = []
    first = cache_run(store, "cache-test", home, sized(2048), False, lines.append)
    assert first.written and first.version == 1
    (line,) = lines
    assert "cache version 1 of run cache-test: up to 720 windows" in line
    stored = example_ids(store)
    assert len(stored) == first.saes[0].n_examples
    again = cache_run(store, "cache-test", home, sized(2048), False, lines.append)
    assert not again.written and again.saes == [] and again.n_tokens is None
    assert (again.version, again.newest_version) == (1, 1)
    assert len(lines) == 1
    assert example_ids(store) == stored


def score_with_predictions(store: Store, example_ids: list[int]) -> int:
    """A score whose predictions judged these windows; returns the score's id."""
    with store.session() as session, session.begin():
        latent_id = session.scalar(select(Example.latent_id).where(Example.id == example_ids[0]))
        assert latent_id is not None
        explanation = Explanation(latent_id=latent_id, explainer="e", model="m", text="t")
        session.add(explanation)
        session.flush()
        score = Score(
            latent_id=latent_id,
            explanation_id=explanation.id,
            scorer="detection",
            n_examples=len(example_ids),
            n_parsed=len(example_ids),
            n_failed=0,
        )
        session.add(score)
        session.flush()
        for example_id in example_ids:
            session.add(Prediction(score_id=score.id, example_id=example_id, label=True))
        return score.id


def test_another_config_adds_a_version_and_predictions_keep_their_windows(
    store: Store, tmp_path: Path, home: Path, tokenizer: Any
):
    make_run(store, tmp_path, seeds=(3,))
    cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    with store.read_session() as session:
        latent_id = session.scalar(select(Example.latent_id).where(Example.kind == "top").limit(1))
        assert latent_id is not None
        first = load_latent_examples(session, latent_id, tokenizer)
    judged = [window.example_id for window in first.windows if window.example_id is not None]
    score_id = score_with_predictions(store, judged)
    before = example_ids(store)

    second = cache_run(store, "cache-test", home, sized(3072), show_progress=False)
    assert second.written and (second.version, second.newest_version) == (2, 2)
    after = example_ids(store)
    assert set(before) < set(after)
    assert len(after) == len(before) + second.saes[0].n_examples
    with store.read_session() as session:
        kept = session.scalars(
            select(Prediction.example_id).where(Prediction.score_id == score_id)
        ).all()
        assert sorted(kept) == sorted(judged)
        versions = session.scalars(select(CacheVersion).order_by(CacheVersion.version)).all()
        assert [v.version for v in versions] == [1, 2]
        assert [v.config["tokens"] for v in versions if v.config] == [2048, 3072]
        assert versions[0].config_hash != versions[1].config_hash
        # Readers use the newest version; the older one stays readable by its id.
        newest = load_latent_examples(session, latent_id, tokenizer)
        ids = {w.example_id for w in newest.windows}
        assert ids and ids.isdisjoint(before)
        older = load_latent_examples(session, latent_id, tokenizer, versions[0].id)
        assert [w.example_id for w in older.windows] == [w.example_id for w in first.windows]
    # The first config again: already stored, nothing written, version 2 stays the newest.
    again = cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    assert not again.written and (again.version, again.newest_version) == (1, 2)
    assert example_ids(store) == after


def test_interrupted_write_is_resumed_without_duplicates(store: Store, tmp_path: Path, home: Path):
    """A version left incomplete with one SAE's windows half written (as a killed `cache`
    leaves it) is invisible to readers; the same call again completes that same version,
    keeping the finished SAE's windows and redoing the other's."""
    make_run(store, tmp_path)
    done = cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    with store.session() as session, session.begin():
        version = session.scalars(select(CacheVersion)).one()
        version.completed_at = None
        half = session.scalars(
            select(Example.id)
            .join(Latent, Latent.id == Example.latent_id)
            .join(Sae, Sae.id == Latent.sae_id)
            .where(Sae.seed == 1)
            .order_by(Example.id.desc())
            .limit(done.saes[1].n_examples // 2)
        ).all()
        session.execute(delete(Example).where(Example.id.in_(half)))
    seed0 = example_ids(store)[: done.saes[0].n_examples]
    with store.read_session() as session:
        assert latest_cache_version(session, version.run_id) is None
        assert session.scalars(latent_windows(seed0[0])).all() == []

    resumed = cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    assert resumed.written and resumed.version == 1
    assert [s.n_examples for s in resumed.saes] == [s.n_examples for s in done.saes]
    with store.read_session() as session:
        assert session.scalar(select(func.count()).select_from(CacheVersion)) == 1
        latest = latest_cache_version(session, version.run_id)
        assert latest is not None and latest.id == version.id
        assert count_windows(session, version.id) == sum(s.n_examples for s in done.saes)
        keys = session.execute(
            select(Example.latent_id, Example.kind, Example.quantile_bin, Example.rank)
        ).all()
        assert len(keys) == len(set(keys))
    assert example_ids(store)[: done.saes[0].n_examples] == seed0


def test_bad_input_changes_nothing(store: Store, tmp_path: Path, home: Path):
    with pytest.raises(UserError, match="no run named"):
        cache_run(store, "missing", home, sized(2048), show_progress=False)
    with store.session() as session:
        register_run(
            session,
            "empty",
            subject_model="smollm2",
            hookpoint=HOOKPOINT,
            dataset="embedded",
            architecture="topk",
            n_latents=8,
            k=2,
            seeds=[0],
        )
        session.commit()
    with pytest.raises(UserError, match="no trained SAEs"):
        cache_run(store, "empty", home, sized(2048), show_progress=False)
    make_run(store, tmp_path)
    with pytest.raises(UserError, match="longer than the chunk length"):
        cache_run(
            store,
            "cache-test",
            home,
            CacheConfig(tokens=2048, window=64, chunk_len=32),
            show_progress=False,
        )
    with store.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Example)) == 0
        assert session.scalar(select(func.count()).select_from(Sae)) == 2
