"""The GPU paths against the CPU's: training on CUDA follows training on the CPU and resumes
across devices, the latent cache's trackers keep the same windows on either device, and the
candidate search on the GPU finds the float32 top-k. They run only where torch sees CUDA
(this project's CI machines have none, so there they are reported as skipped)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cache_distributed import CONFIG, batches
from test_matching_candidates import assert_dense_top_k, planted
from test_train import HOOKPOINT, UNUSED_HOME, small_config

from sae.latent_stats import _Tracker
from sae.matching import MatchConfig
from sae.matching.candidates import CPU_BLOCK_ROWS, GPU_BLOCK_ROWS, scan_block_rows, top_candidates
from sae.matching.pair import match_directions
from sae.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_training_on_the_gpu_follows_the_cpu(smollm2_activation_cache: Path, tmp_path: Path):
    runs = {}
    for device in ("cpu", "cuda"):
        config = small_config(
            smollm2_activation_cache, seeds=[0, 1], precision="float32", device=device
        )
        result = train(config, tmp_path / device, UNUSED_HOME)
        assert result.step == result.total_steps and not result.interrupted
        runs[device] = result
    for seed in (0, 1):
        cpu = load_file(tmp_path / "cpu" / HOOKPOINT / f"seed{seed}" / "sae.safetensors")
        gpu = load_file(tmp_path / "cuda" / HOOKPOINT / f"seed{seed}" / "sae.safetensors")
        for name in cpu:
            # The sums run in another order on the GPU; a near-tie among the latents a token
            # picks may fall the other way, so the parameters agree closely, not exactly.
            gap = (gpu[name] - cpu[name]).norm() / cpu[name].norm().clamp_min(1e-12)
            assert gap < 1e-3, (seed, name, float(gap))
    for on_cpu, on_gpu in zip(runs["cpu"].saes, runs["cuda"].saes, strict=True):
        assert abs(on_gpu.fvu - on_cpu.fvu) < 0.01 * on_cpu.fvu


def test_a_gpu_run_resumes_on_the_cpu(smollm2_activation_cache: Path, tmp_path: Path):
    config = small_config(smollm2_activation_cache, seeds=[0], device="cuda")
    first = train(config, tmp_path, UNUSED_HOME, stop_after_steps=5)
    assert first.interrupted and first.step == 5
    second = train(config.model_copy(update={"device": "cpu"}), tmp_path, UNUSED_HOME)
    assert second.start_step == 5 and second.step == second.total_steps


def test_trackers_keep_the_same_windows_on_the_gpu() -> None:
    stream = batches(8, 7)
    kept = {}
    for device in (CPU, CUDA):
        tracker = _Tracker(7, CONFIG, device)
        for index, (acts, ids) in enumerate(stream):
            tracker.update(acts.to(device), ids.to(device), torch.Generator().manual_seed(index))
        kept[device.type] = {name: tensor.cpu() for name, tensor in tracker.state().items()}
    for name, tensor in kept["cpu"].items():
        assert torch.equal(tensor, kept["cuda"][name]), name


def test_candidate_search_on_the_gpu_finds_the_float32_top_k() -> None:
    a, b = planted(4096, 96, 0.5, seed=11)
    cand = top_candidates(a, b, 8, block_rows=512, device=CUDA)
    assert_dense_top_k(cand, a, b, 8)


def test_matching_on_the_gpu_takes_larger_blocks_to_the_same_answer() -> None:
    # 12,288 columns: blocks of 8,192 rows on any GPU of 6.4 GB or more, the last one shorter.
    a, b = planted(12288, 96, 0.5, seed=5)
    assert scan_block_rows(b.shape[0], CUDA) == GPU_BLOCK_ROWS
    large = match_directions(a, b, MatchConfig(solver="sparse"))
    small = match_directions(a, b, MatchConfig(solver="sparse", block_rows=CPU_BLOCK_ROWS))
    assert np.array_equal(large.partner, small.partner)
    assert large.objective == pytest.approx(small.objective, rel=1e-9)
    assert large.gap_bound == pytest.approx(small.gap_bound, abs=1e-9)
