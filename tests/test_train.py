"""The multi-seed trainer on real SmolLM2 activations: seeds trained together equal seeds
trained apart, resume continues exactly, checkpoints and metrics land where promised, and
bad input stops before anything is written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae.activation_cache import (
    ActivationCache,
    CacheManifest,
    activation_file,
    build_activation_cache,
)
from sae.architectures import SaeConfig
from sae.checkpoint import load_sae
from sae.errors import UserError
from sae.train import (
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    STATE_FILE,
    TrainConfig,
    config_from_cache,
    geometric_median,
    train,
)

HOOKPOINT = "model.layers.6.mlp"
UNUSED_HOME = Path("/nonexistent-home-unused")  # training from a cache never loads a model


def small_config(cache: Path, **fields: object) -> TrainConfig:
    values: dict = {
        "sae": SaeConfig(architecture="topk", n_latents=256, k=8),
        "batch_tokens": 2048,
        "warmup_steps": 3,
        "dead_tokens": 4096,  # small, so AuxK and dead counters take part
        "log_every": 2,
        **fields,
    }
    return config_from_cache(cache, **values)


def sae_tensors(out: Path, seed: int) -> dict[str, torch.Tensor]:
    return load_file(out / HOOKPOINT / f"seed{seed}" / "sae.safetensors")


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_seeds_trained_together_equal_seeds_trained_apart(
    smollm2_activation_cache: Path, tmp_path: Path
):
    together = small_config(smollm2_activation_cache, seeds=[3, 7], epochs=1)
    train(together, tmp_path / "together", UNUSED_HOME)
    for seed in (3, 7):
        alone = small_config(smollm2_activation_cache, seeds=[seed], epochs=1)
        train(alone, tmp_path / f"alone{seed}", UNUSED_HOME)
        joint, single = (
            sae_tensors(tmp_path / "together", seed),
            sae_tensors(tmp_path / f"alone{seed}", seed),
        )
        assert joint.keys() == single.keys()
        for name in joint:
            assert torch.equal(joint[name], single[name]), (seed, name)
    # Different seeds really are different SAEs.
    assert not torch.equal(
        sae_tensors(tmp_path / "together", 3)["W_dec"],
        sae_tensors(tmp_path / "together", 7)["W_dec"],
    )


def test_resume_continues_exactly(smollm2_activation_cache: Path, tmp_path: Path):
    config = small_config(smollm2_activation_cache, seeds=[0, 1], epochs=2)
    straight = train(config, tmp_path / "straight", UNUSED_HOME)
    assert straight.step == straight.total_steps == 32
    assert not straight.interrupted

    first = train(config, tmp_path / "resumed", UNUSED_HOME, stop_after_steps=13)
    assert first.interrupted and first.step == 13
    assert not (tmp_path / "resumed" / RESULT_FILE).exists()
    # The device is not part of what must match: a run may resume on another one.
    second = train(config.model_copy(update={"device": "cpu"}), tmp_path / "resumed", UNUSED_HOME)
    assert config.device == "auto"
    assert second.step == 32 and not second.interrupted
    assert second.tokens_trained == 19 * 2048

    for seed in (0, 1):
        a, b = sae_tensors(tmp_path / "straight", seed), sae_tensors(tmp_path / "resumed", seed)
        for name in a:
            assert torch.equal(a[name], b[name]), (seed, name)
    state_a = load_file(tmp_path / "straight" / STATE_FILE)
    state_b = load_file(tmp_path / "resumed" / STATE_FILE)
    assert state_a.keys() == state_b.keys()
    assert any("/adam/" in key for key in state_a)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    # Metric lines are not duplicated by the resume, and their steps increase.
    for seed in (0, 1):
        lines = (tmp_path / "resumed" / HOOKPOINT / f"seed{seed}" / METRICS_FILE).read_text()
        steps = [json.loads(line)["step"] for line in lines.splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 32

    again = train(config, tmp_path / "resumed", UNUSED_HOME)
    assert again.already_finished and again.step == 32


def test_checkpoint_layout_config_and_metrics(smollm2_activation_cache: Path, tmp_path: Path):
    config = small_config(smollm2_activation_cache, seeds=[0, 2], epochs=1)
    result = train(config, tmp_path, UNUSED_HOME)
    saved = TrainConfig.model_validate_json((tmp_path / CONFIG_FILE).read_text())
    assert saved == config
    summary = json.loads((tmp_path / RESULT_FILE).read_text())
    assert [sae["seed"] for sae in summary["saes"]] == [0, 2]
    for sae in result.saes:
        folder = tmp_path / HOOKPOINT / f"seed{sae.seed}"
        assert sae.path == folder
        assert 0 < sae.fvu < 1 and sae.l0 == pytest.approx(8.0)
        weights = load_sae(folder)
        assert weights.encoder_weight.shape == (256, 576)
        assert weights.cfg["architecture"] == "topk" and weights.cfg["k"] == 8
        assert weights.cfg["seed"] == sae.seed and weights.cfg["hookpoint"] == HOOKPOINT
        assert weights.cfg["tokens_trained"] == result.tokens
        lines = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
        assert {"step", "tokens", "fvu", "l0", "dead_fraction"} <= set(lines[-1])
        assert lines[-1]["tokens"] == result.tokens
        assert lines[-1]["fvu"] < lines[0]["fvu"]
        assert all(0 <= line["dead_fraction"] <= 1 for line in lines)


def test_changed_config_or_corrupt_checkpoint_writes_nothing(
    smollm2_activation_cache: Path, tmp_path: Path
):
    config = small_config(smollm2_activation_cache, epochs=1)
    train(config, tmp_path, UNUSED_HOME, stop_after_steps=3)
    before = folder_snapshot(tmp_path)

    changed = small_config(
        smollm2_activation_cache, epochs=1, sae=SaeConfig(architecture="topk", n_latents=512, k=8)
    )
    with pytest.raises(UserError, match="n_latents 256 -> 512"):
        train(changed, tmp_path, UNUSED_HOME)
    assert folder_snapshot(tmp_path) == before

    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[: len(before[STATE_FILE]) // 2])
    truncated = folder_snapshot(tmp_path)
    with pytest.raises(UserError, match="corrupt or truncated"):
        train(config, tmp_path, UNUSED_HOME)
    assert folder_snapshot(tmp_path) == truncated


def write_synthetic_cache(folder: Path, source: CacheManifest, width: int) -> None:
    """A cache with `source`'s provenance but another activation width (generated data)."""
    manifest = source.model_copy(update={"hookpoints": {HOOKPOINT: width}})
    manifest.tokens_done = manifest.n_tokens
    folder.mkdir(parents=True)
    rows = np.random.default_rng(0).standard_normal((manifest.n_tokens, width))
    np.save(activation_file(folder, HOOKPOINT), rows.astype(np.float16))
    (folder / "manifest.json").write_text(manifest.model_dump_json())


def test_resume_with_another_width_is_refused(smollm2_activation_cache: Path, tmp_path: Path):
    manifest = ActivationCache(smollm2_activation_cache).manifest
    cache = tmp_path / "cache"
    write_synthetic_cache(cache, manifest, width=576)
    config = small_config(cache, epochs=1)
    out = tmp_path / "out"
    train(config, out, UNUSED_HOME, stop_after_steps=2)
    before = folder_snapshot(out)
    for path in cache.iterdir():
        path.unlink()
    cache.rmdir()
    write_synthetic_cache(cache, manifest, width=64)
    with pytest.raises(UserError, match="d_in"):
        train(config, out, UNUSED_HOME)
    assert folder_snapshot(out) == before


def test_unknown_hookpoint_in_cache_names_the_closest(smollm2_activation_cache: Path):
    config = small_config(smollm2_activation_cache, hookpoints=["model.layers.6.mlpp"])
    with pytest.raises(UserError, match="closest: model.layers.6.mlp"):
        train(config, Path("/tmp/never-written"), UNUSED_HOME)
    assert not Path("/tmp/never-written").exists()


def test_activation_cache_build_resumes_and_reads_back(home: Path, tmp_path: Path):
    def interrupt_after_first(done: int, total: int) -> None:
        raise KeyboardInterrupt

    kwargs = {"max_tokens": 3 * 1024, "chunk_len": 256, "batch_chunks": 4, "dtype": "bfloat16"}
    with pytest.raises(KeyboardInterrupt):
        build_activation_cache(
            tmp_path / "resumed",
            "smollm2",
            [HOOKPOINT],
            home,
            on_progress=interrupt_after_first,
            **kwargs,  # type: ignore[arg-type]
        )
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache(tmp_path / "resumed")
    resumed = build_activation_cache(tmp_path / "resumed", "smollm2", [HOOKPOINT], home, **kwargs)  # type: ignore[arg-type]
    straight = build_activation_cache(tmp_path / "straight", "smollm2", [HOOKPOINT], home, **kwargs)  # type: ignore[arg-type]
    assert resumed.n_tokens == straight.n_tokens == 3 * 1024
    rows = torch.arange(resumed.n_tokens)
    a, b = resumed.read(HOOKPOINT, rows), straight.read(HOOKPOINT, rows)
    assert a.dtype == torch.float32 and a.shape == (3 * 1024, 576)
    assert torch.equal(a, b)
    assert float(a.norm(dim=1).mean()) > 1  # real activations, not zeros
    assert torch.equal(resumed.tokens(), straight.tokens())


def test_model_in_the_loop_training(home: Path, tmp_path: Path):
    config = TrainConfig(
        model="smollm2",
        hookpoints=[HOOKPOINT],
        max_tokens=4 * 1024,
        sae=SaeConfig(architecture="topk", n_latents=128, k=4),
        seeds=[0, 1],
        batch_tokens=1024,
        warmup_steps=1,
    )
    result = train(config, tmp_path, home)
    assert result.step == 4 and result.tokens == 4 * 1024
    for seed in (0, 1):
        weights = load_sae(tmp_path / HOOKPOINT / f"seed{seed}")
        assert weights.d_in == 576 and weights.cfg["input_scale_folded"] > 0


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    median = geometric_median(points)
    assert float(median.norm()) < 1.0
    assert float(points.mean(dim=0).norm()) > 10


def test_bfloat16_precision_trains_as_well_as_float32(
    smollm2_activation_cache: Path, tmp_path: Path
):
    # bfloat16 only picks the active latents (the encoder's dense product); values, gradients
    # and weights stay float32, so the SAEs reach the same reconstruction.
    results = {}
    for precision in ("float32", "bfloat16"):
        config = small_config(smollm2_activation_cache, seeds=[0, 1], precision=precision)
        results[precision] = train(config, tmp_path / precision, UNUSED_HOME)
        recorded = json.loads((tmp_path / precision / RESULT_FILE).read_text())
        assert recorded["compute_dtype"] == precision
    for plain, low in zip(results["float32"].saes, results["bfloat16"].saes, strict=True):
        assert low.fvu == pytest.approx(plain.fvu, rel=0.01), (plain.seed, plain.fvu, low.fvu)
    # The products really differ: the weights are not the float32 run's.
    assert not torch.equal(
        sae_tensors(tmp_path / "float32", 0)["W_dec"],
        sae_tensors(tmp_path / "bfloat16", 0)["W_dec"],
    )


def test_a_run_saved_before_precision_resumes_as_float32(
    smollm2_activation_cache: Path, tmp_path: Path
):
    config = small_config(smollm2_activation_cache, seeds=[0], precision="float32")
    train(config, tmp_path, UNUSED_HOME, stop_after_steps=1)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    del saved["precision"]
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="precision"):
        train(small_config(smollm2_activation_cache, seeds=[0]), tmp_path, UNUSED_HOME)
    result = train(config, tmp_path, UNUSED_HOME)
    assert result.start_step == 1 and not result.interrupted
