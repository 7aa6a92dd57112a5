"""Any causal LM as the subject model, not only SmolLM2: a small random GPT-2 built from a
config and saved to a folder (`tiny_models.py`) lists its hookpoints, stops its forward pass
after the deepest hook, trains SAEs, and gets them recorded and cached in the store."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from tiny_models import TINY_GPT2_HOOKPOINT, TINY_GPT2_WIDTH, save_tiny_gpt2

from sae.architectures import SaeConfig
from sae.errors import UserError
from sae.latent_stats import CacheConfig
from sae.subject_model import capture_activations, hookpoint_width, load_model
from sae.train import TrainConfig, train
from service.cache.stage import cache_run
from service.store.engine import Store
from service.store.models import Example, Latent
from service.store.runs import record_training

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), home)


def test_hookpoints_of_a_model_folder(tiny_gpt2: Path):
    result = subprocess.run(
        [AUTOINTERP, "hookpoints", str(tiny_gpt2), "--contains", "h.1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert TINY_GPT2_HOOKPOINT in names and "transformer.h.1.attn" in names
    assert all("h.1" in name for name in names)


def test_forward_stops_after_the_deepest_hook(tiny_gpt2: Path, home: Path):
    model, tokenizer = load_model(str(tiny_gpt2), home)
    ids = tokenizer("def main():\n    return 1", return_tensors="pt")["input_ids"]
    reached = []
    handle = model.lm_head.register_forward_hook(lambda *_: reached.append(True))
    try:
        early = capture_activations(model, ids, ["transformer.h.0.mlp"])
        assert not reached  # layer 1 and the LM head never ran
        full = capture_activations(model, ids, ["transformer.h.0.mlp"], stop_early=False)
        assert reached
    finally:
        handle.remove()
    assert torch.equal(early["transformer.h.0.mlp"], full["transformer.h.0.mlp"])
    assert hookpoint_width(model, TINY_GPT2_HOOKPOINT) == TINY_GPT2_WIDTH


def test_only_the_blocks_up_to_the_deepest_hookpoint_are_loaded(tiny_gpt2: Path, home: Path):
    whole, tokenizer = load_model(str(tiny_gpt2), home)
    cut, _ = load_model(str(tiny_gpt2), home, hookpoints=["transformer.h.0.mlp"])
    assert len(whole.transformer.h) == 2 and len(cut.transformer.h) == 1
    ids = tokenizer("def main():\n    return 1", return_tensors="pt")["input_ids"]
    names = ["transformer.h.0.mlp", "transformer.h.0"]
    expected, got = capture_activations(whole, ids, names), capture_activations(cut, ids, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    # A hookpoint past the blocks (the final norm) needs every block.
    after, _ = load_model(str(tiny_gpt2), home, hookpoints=["transformer.h.0", "transformer.ln_f"])
    assert len(after.transformer.h) == 2


def test_a_cut_load_still_refuses_missing_weights(tiny_gpt2: Path, home: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt2, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(key for key in weights if key.startswith("transformer.h.0.mlp."))
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks weights"):
        load_model(str(broken), home, hookpoints=["transformer.h.0.mlp"])


def test_train_record_and_cache_on_another_family(
    store: Store, tiny_gpt2: Path, tmp_path: Path, home: Path
):
    config = TrainConfig(
        model=str(tiny_gpt2),
        hookpoints=[TINY_GPT2_HOOKPOINT],
        sae=SaeConfig(n_latents=64, k=4),
        seeds=[0, 1],
        max_tokens=4096,
        chunk_len=64,
        batch_tokens=256,
    )
    result = train(config, tmp_path / "out", home)
    assert [sae.seed for sae in result.saes] == [0, 1]
    assert all(sae.fvu < 1.5 for sae in result.saes)
    record_training(store, "gpt2", config, tmp_path / "out", result.saes)
    cache = CacheConfig(
        tokens=2048, window=16, chunk_len=64, quantile_bins=2, per_quantile_bin=2, negatives=4
    )
    summary = cache_run(store, "gpt2", home, cache, show_progress=False)
    assert summary.n_tokens == 2048
    assert [s.n_latents for s in summary.saes] == [64, 64]
    with store.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Example)) > 0
        unset = session.scalar(
            select(func.count()).select_from(Latent).where(Latent.firing_count.is_(None))
        )
        assert unset == 0


def test_unknown_folder_is_one_line(tmp_path: Path):
    result = subprocess.run(
        [AUTOINTERP, "hookpoints", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "is not a model folder (no config.json)" in result.stderr
