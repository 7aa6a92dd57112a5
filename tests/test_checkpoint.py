"""Round trips of both checkpoint layouts and one-line errors for broken checkpoints."""

import json
from pathlib import Path

import pytest
import torch

from sae.checkpoint import (
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    SaeWeights,
    load_sae,
    save_saelens,
    save_sparsify,
)
from sae.errors import UserError


def make_weights(n_latents: int = 12, d_in: int = 5, seed: int = 0, jumprelu: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return SaeWeights(
        encoder_weight=torch.randn(n_latents, d_in, generator=gen),
        encoder_bias=torch.randn(n_latents, generator=gen),
        W_dec=torch.randn(n_latents, d_in, generator=gen),
        b_dec=torch.randn(d_in, generator=gen),
        cfg={"architecture": "jumprelu" if jumprelu else "topk", "k": 3, "l1_coefficient": 0.0},
        threshold=torch.rand(n_latents, generator=gen) if jumprelu else None,
    )


def assert_same(a: SaeWeights, b: SaeWeights) -> None:
    assert torch.equal(a.encoder_weight, b.encoder_weight)
    assert torch.equal(a.encoder_bias, b.encoder_bias)
    assert torch.equal(a.W_dec, b.W_dec)
    assert torch.equal(a.b_dec, b.b_dec)
    if a.threshold is None:
        assert b.threshold is None
    else:
        assert b.threshold is not None and torch.equal(a.threshold, b.threshold)


@pytest.mark.parametrize("jumprelu", [False, True])
@pytest.mark.parametrize("save", [save_sparsify, save_saelens])
def test_round_trip(tmp_path: Path, save, jumprelu: bool) -> None:
    weights = make_weights(jumprelu=jumprelu)
    save(tmp_path / "ckpt", weights)
    loaded = load_sae(tmp_path / "ckpt")
    assert_same(weights, loaded)
    assert loaded.cfg["architecture"] == weights.cfg["architecture"]
    assert loaded.cfg["k"] == 3


def test_sparsify_layout_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    save_sparsify(tmp_path, make_weights(n_latents=7, d_in=4))
    tensors = load_file(str(tmp_path / SPARSIFY_WEIGHTS))
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert tensors["encoder.weight"].shape == (7, 4)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == 4 and cfg["num_latents"] == 7 and cfg["architecture"] == "topk"


def test_saelens_layout_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weights = make_weights(n_latents=7, d_in=4)
    weights.cfg["architecture"] = "relu"
    save_saelens(tmp_path, weights)
    tensors = load_file(str(tmp_path / SAELENS_WEIGHTS))
    assert tensors["W_enc"].shape == (4, 7)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_sae"] == 7 and cfg["architecture"] == "standard"
    assert load_sae(tmp_path).cfg["architecture"] == "relu"


def test_save_over_existing_leaves_no_temp_files(tmp_path: Path) -> None:
    save_sparsify(tmp_path, make_weights(seed=0))
    second = make_weights(seed=1)
    save_sparsify(tmp_path, second)
    assert_same(second, load_sae(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", SPARSIFY_WEIGHTS]


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    first = make_weights(seed=0)
    save_sparsify(tmp_path, first)
    broken = make_weights(seed=1)
    broken.cfg["unserialisable"] = object()
    with pytest.raises(TypeError):
        save_sparsify(tmp_path, broken)
    assert_same(first, load_sae(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", SPARSIFY_WEIGHTS]


def test_views_of_a_stacked_tensor_save(tmp_path: Path) -> None:
    stacked = torch.randn(2, 6, 3)
    weights = SaeWeights(stacked[1], torch.zeros(6), stacked[0], torch.zeros(3))
    save_sparsify(tmp_path, weights)
    assert torch.equal(load_sae(tmp_path).encoder_weight, stacked[1])


def test_inconsistent_weights_refuse_to_save(tmp_path: Path) -> None:
    weights = make_weights()
    weights.W_dec = weights.W_dec[:, :3]
    with pytest.raises(ValueError, match="W_dec"):
        save_sparsify(tmp_path, weights)
    assert not any(tmp_path.iterdir())


def one_line_error(folder: Path) -> str:
    with pytest.raises(UserError) as info:
        load_sae(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(tmp_path / "nope")


def test_folder_without_weights_names_subfolders(tmp_path: Path) -> None:
    (tmp_path / "seed0").mkdir()
    message = one_line_error(tmp_path)
    assert "seed0" in message and SPARSIFY_WEIGHTS in message


def test_truncated_weights(tmp_path: Path) -> None:
    save_sparsify(tmp_path, make_weights())
    path = tmp_path / SPARSIFY_WEIGHTS
    path.write_bytes(path.read_bytes()[:-40])
    message = one_line_error(tmp_path)
    assert SPARSIFY_WEIGHTS in message and "corrupt or truncated" in message


def test_garbage_weights(tmp_path: Path) -> None:
    save_saelens(tmp_path, make_weights())
    (tmp_path / SAELENS_WEIGHTS).write_bytes(b"\x00" * 3)
    assert SAELENS_WEIGHTS in one_line_error(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    save_sparsify(tmp_path, make_weights())
    (tmp_path / "cfg.json").unlink()
    assert "cfg.json is missing" in one_line_error(tmp_path)


def test_bad_json_config(tmp_path: Path) -> None:
    save_sparsify(tmp_path, make_weights())
    (tmp_path / "cfg.json").write_text("{not json")
    assert "cfg.json is not readable JSON" in one_line_error(tmp_path)


def test_config_disagreeing_with_weights(tmp_path: Path) -> None:
    save_sparsify(tmp_path, make_weights(n_latents=12))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["num_latents"] = 24
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert "num_latents=24" in one_line_error(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_sparsify(tmp_path, make_weights())
    save_file({"W_dec": torch.zeros(12, 5)}, str(tmp_path / SPARSIFY_WEIGHTS))
    assert "lacks tensor(s) encoder.weight" in one_line_error(tmp_path)


def test_wrong_shapes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_sparsify(tmp_path, make_weights(n_latents=12, d_in=5))
    save_file(
        {
            "encoder.weight": torch.zeros(12, 5),
            "encoder.bias": torch.zeros(12),
            "W_dec": torch.zeros(12, 4),
            "b_dec": torch.zeros(5),
        },
        str(tmp_path / SPARSIFY_WEIGHTS),
    )
    assert "W_dec has shape (12, 4)" in one_line_error(tmp_path)
