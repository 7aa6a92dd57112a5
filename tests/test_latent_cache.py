"""The streaming latent cache against brute-force recomputation on real SmolLM2 activations."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sae.data import load_chunks
from sae.errors import UserError
from sae.latent_stats import CacheConfig, collect_latent_stats
from sae.subject_model import capture_activations

HOOKPOINT = "model.layers.6.mlp"
CHUNK_LEN = 64
N_LATENTS = 48


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tokenizer = smollm2
    chunks = load_chunks("embedded", tokenizer, chunk_len=CHUNK_LEN, max_tokens=40 * CHUNK_LEN)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(N_LATENTS, 576, generator=generator) / 576**0.5
    # Thresholds at different quantiles give rare, medium and dense latents.
    bias = -torch.linspace(0.5, 3.0, N_LATENTS)

    def activations(batch: torch.Tensor) -> torch.Tensor:
        return capture_activations(model, batch, [HOOKPOINT])[HOOKPOINT]

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ directions.T + bias)

    dense = encode(activations(chunks).reshape(-1, 576)).reshape(len(chunks), CHUNK_LEN, -1)
    return activations, encode, chunks, dense


def run(setup, config: CacheConfig, **kwargs):
    activations, encode, chunks, _ = setup
    return collect_latent_stats(activations, [encode], [N_LATENTS], chunks, config, **kwargs)[0]


def test_counts_and_top_windows_match_brute_force(setup):
    *_, chunks, dense = setup
    config = CacheConfig(window=16, n_top=5, n_reservoir=20, negatives=6, batch_size=7)
    stats = run(setup, config)
    assert np.array_equal(stats.firing_count, (dense > 0).sum(dim=(0, 1)).numpy())
    assert np.allclose(stats.max_activation, dense.amax(dim=(0, 1)).numpy())
    assert 0 < (stats.firing_count > 0).sum() <= N_LATENTS

    windows = dense.reshape(len(chunks), CHUNK_LEN // 16, 16, N_LATENTS).reshape(-1, 16, N_LATENTS)
    window_tokens = chunks.reshape(-1, 16)
    examples = stats.examples
    for latent in range(N_LATENTS):
        window_max = windows[:, :, latent].amax(dim=1)
        expected = window_max[window_max > 0].sort(descending=True).values[:5]
        top = (examples.latent == latent) & (np.array(examples.kind) == "top")
        recorded = examples.activations[top].max(axis=1)
        assert np.allclose(recorded, expected.numpy()), latent
        # Each stored top window's per-token activations and tokens are the real ones.
        for acts, tokens in zip(examples.activations[top], examples.token_ids[top], strict=True):
            matches = (window_tokens == torch.from_numpy(tokens).long()).all(dim=1)
            occurrences = torch.nonzero(matches).flatten().tolist()
            assert any(
                torch.allclose(windows[i, :, latent], torch.from_numpy(acts)) for i in occurrences
            )


def test_negative_windows_do_not_fire(setup):
    *_, chunks, dense = setup
    config = CacheConfig(window=16, n_top=3, n_reservoir=10, negatives=8, batch_size=5)
    examples = run(setup, config).examples
    windows = dense.reshape(-1, 16, N_LATENTS)
    window_tokens = chunks.reshape(-1, 16)
    negative = np.flatnonzero(np.array(examples.kind) == "random")
    assert negative.size > 0
    for row in negative:
        latent = examples.latent[row]
        matches = (window_tokens == torch.from_numpy(examples.token_ids[row]).long()).all(dim=1)
        # The same tokens could recur elsewhere; at least one occurrence is silent, and the
        # sampled window is one of the latent's silent windows.
        assert any(
            windows[i, :, latent].max() == 0 for i in torch.nonzero(matches).flatten().tolist()
        )


def test_quantile_samples_are_firing_and_distinct_from_top(setup):
    config = CacheConfig(window=16, n_top=4, n_reservoir=40, quantile_bins=4, per_quantile_bin=3)
    examples = run(setup, config).examples
    kinds = np.array(examples.kind)
    quantile = kinds == "quantile"
    assert quantile.any()
    assert (examples.activations[quantile].max(axis=1) > 0).all()
    assert set(examples.quantile_bin[quantile]) <= set(range(4))
    for latent in np.unique(examples.latent[quantile]):
        top_rows = {
            bytes(t) for t in examples.token_ids[(examples.latent == latent) & (kinds == "top")]
        }
        rows = examples.token_ids[(examples.latent == latent) & quantile]
        assert not any(bytes(t) in top_rows for t in rows) or len(top_rows) == 0


def test_resume_equals_uninterrupted(setup, tmp_path: Path):
    config = CacheConfig(window=16, n_top=4, n_reservoir=12, negatives=4, batch_size=4, seed=7)
    whole = run(setup, config)
    state = tmp_path / "state.pt"
    seen: list[int] = []

    def interrupt_after_three(tokens: int, total: int) -> None:
        seen.append(tokens)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(setup, config, state_path=state, save_every=2, on_progress=interrupt_after_three)
    assert state.is_file()
    resumed = run(setup, config, state_path=state, save_every=2)
    assert np.array_equal(whole.firing_count, resumed.firing_count)
    assert np.array_equal(whole.max_activation, resumed.max_activation)
    for name in ("latent", "quantile_bin", "rank", "token_ids", "activations"):
        assert np.array_equal(getattr(whole.examples, name), getattr(resumed.examples, name))
    assert whole.examples.kind == resumed.examples.kind


def test_window_longer_than_chunk_is_a_user_error(setup):
    with pytest.raises(UserError, match="longer than the chunk length"):
        run(setup, CacheConfig(window=CHUNK_LEN + 1))
