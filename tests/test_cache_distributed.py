"""The latent cache on several processes stores exactly what one process stores: the trackers
merge under one total order (ties to the lower window id), checked in process on windows with
planted ties, and end to end with `torchrun` (2 gloo processes) against `autointerp cache` on
real SmolLM2 activations."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from sqlalchemy import select
from test_cache_stage import make_run

from sae.latent_stats import CacheConfig, _Tracker
from service.store.engine import open_store, upgrade
from service.store.models import Example, Latent, Sae

BIN = Path(sys.executable).parent
CONFIG = CacheConfig(window=4, n_top=3, n_reservoir=5, quantile_bins=2, per_quantile_bin=1)


def batches(n_batches: int, n_latents: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latent activations, window ids) per batch; half the windows repeat an earlier one
    exactly, so top-k and the samples meet ties."""
    generator = torch.Generator().manual_seed(5)
    windows_per_batch = 6
    first = torch.relu(torch.randn(2, 12, n_latents, generator=generator))
    out = []
    for index in range(n_batches):
        acts = torch.relu(torch.randn(2, 12, n_latents, generator=generator))
        if index % 2:
            acts = first.clone()  # the same windows again: equal maxima, other window ids
        ids = torch.arange(index * windows_per_batch, (index + 1) * windows_per_batch)
        out.append((acts, ids))
    return out


def folded(indices: list[int], stream: list[tuple[torch.Tensor, torch.Tensor]]) -> _Tracker:
    tracker = _Tracker(7, CONFIG, torch.device("cpu"))
    for index in indices:
        acts, ids = stream[index]
        tracker.update(acts, ids, torch.Generator().manual_seed(index))
    return tracker


def test_trackers_of_interleaved_shares_merge_into_the_whole_streams() -> None:
    stream = batches(8, 7)
    whole = folded(list(range(8)), stream)
    even, odd = folded([0, 2, 4, 6], stream), folded([1, 3, 5, 7], stream)
    odd.absorb(even)  # either way round
    for name, tensor in whole.state().items():
        assert torch.equal(tensor, odd.state()[name]), name
    assert bool((whole.top_value > 0).any()) and bool((whole.sample_key >= 0).any())


def stored(url: str) -> tuple[list[tuple], list[tuple]]:
    store = open_store(url)
    try:
        with store.read_session() as session:
            latents = session.execute(
                select(Sae.seed, Latent.index, Latent.firing_count, Latent.max_activation)
                .join(Sae, Sae.id == Latent.sae_id)
                .order_by(Sae.seed, Latent.index)
            ).all()
            examples = session.execute(
                select(
                    Sae.seed,
                    Latent.index,
                    Example.kind,
                    Example.quantile_bin,
                    Example.rank,
                    Example.token_ids,
                    Example.activations,
                )
                .join(Latent, Latent.id == Example.latent_id)
                .join(Sae, Sae.id == Latent.sae_id)
                .order_by(Sae.seed, Latent.index, Example.kind, Example.quantile_bin, Example.rank)
            ).all()
    finally:
        store.engine.dispose()
    return [tuple(row) for row in latents], [tuple(row) for row in examples]


def test_two_processes_cache_what_one_caches(tmp_path: Path, home: Path) -> None:
    urls = {}
    for name in ("one", "two"):
        urls[name] = f"sqlite:///{tmp_path / name}.db"
        upgrade(urls[name])
        store = open_store(urls[name])
        make_run(store, tmp_path / name)
        store.engine.dispose()
    # --run-name: torchrun's own options claim --run.
    args = ["cache", "--run-name", "cache-test", "--tokens", "8192", "--chunk-len", "128"]
    args += ["--window", "16", "--n-top", "4", "--bins", "3", "--per-bin", "2"]
    # One thread per process in both runs: the activations must be bitwise the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOINTERP_HOME": str(home)}
    one = subprocess.run(
        [str(BIN / "autointerp"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "AUTOINTERP_DB": urls["one"]},
    )
    assert one.returncode == 0, one.stderr
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run(
        [*launcher, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "AUTOINTERP_DB": urls["two"]},
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("examples") == 1, two.stdout  # one table, from rank 0
    latents_one, examples_one = stored(urls["one"])
    latents_two, examples_two = stored(urls["two"])
    assert len(examples_one) > 100 and any(row[2] == "quantile" for row in examples_one)
    assert latents_one == latents_two
    assert examples_one == examples_two
    assert not list((tmp_path / "two").glob("latent-cache-*.pt"))
