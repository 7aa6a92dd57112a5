"""The `cache` stage end to end: real SmolLM2, SAE checkpoints on disk, both store backends."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from sae.checkpoint import SaeWeights, save_sparsify
from sae.errors import UserError
from sae.latent_stats import CacheConfig
from service.cache.stage import cache_run
from service.store.engine import Store
from service.store.models import Example, Latent, Sae
from service.store.runs import register_run, register_sae
from service.store.windows import decode_window

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


def test_rerun_replaces_rather_than_duplicates(store: Store, tmp_path: Path, home: Path):
    make_run(store, tmp_path, seeds=(3,))
    first = cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    again = cache_run(store, "cache-test", home, sized(2048), show_progress=False)
    with store.read_session() as session:
        stored = session.scalar(select(func.count()).select_from(Example))
    assert stored == first.saes[0].n_examples == again.saes[0].n_examples


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
