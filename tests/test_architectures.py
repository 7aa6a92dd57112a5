"""SAE architectures: sparse kernels against their dense references, every registered
architecture learning real SmolLM2 activations, and `encode` of saved checkpoints (both
layouts) agreeing with the SAE as it was trained."""

from pathlib import Path

import pytest
import torch

from sae.activation_cache import ActivationCache
from sae.architectures import REGISTRY, SaeConfig, decode, encode, get_architecture
from sae.architectures.base import total_variance
from sae.architectures.sparse import (
    Selection,
    dense_reference_decode,
    dense_reference_pre_activations,
    selected_pre_activations,
    sparse_decode,
)
from sae.checkpoint import SaeWeights, load_sae, save_saelens, save_sparsify
from sae.errors import UserError
from sae.train import config_from_cache, train

HOOKPOINT = "model.layers.6.mlp"


@pytest.mark.parametrize("kind", ["topk", "flat"])
def test_sparse_kernels_match_dense_autograd(kind: str):
    generator = torch.Generator().manual_seed(0)
    n_tokens, d, n = 96, 24, 70
    x = torch.randn(n_tokens, d, generator=generator)
    target = torch.randn(n_tokens, d, generator=generator)
    params = [
        torch.randn(n, d, generator=generator).requires_grad_(),  # encoder weight
        torch.randn(n, generator=generator).requires_grad_(),  # encoder bias
        torch.randn(d, generator=generator).requires_grad_(),  # b_dec
        torch.randn(n, d, generator=generator).requires_grad_(),  # W_dec
    ]
    encoder_weight, encoder_bias, b_dec, W_dec = params
    with torch.no_grad():
        centered = x - b_dec
        pre = centered @ encoder_weight.T + encoder_bias
    if kind == "topk":
        selection = Selection.from_topk(pre.topk(5, dim=1).indices, n)
    else:
        flat = pre.flatten().topk(5 * n_tokens).indices
        selection = Selection.from_flat(flat, n_tokens, n)
        assert bool((selection.rows[1:] >= selection.rows[:-1]).all())

    def gradients(fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for param in params:
            param.grad = None
        if fast:
            values = selected_pre_activations(
                pre, centered, encoder_weight, encoder_bias, b_dec, selection
            )
            out = sparse_decode(torch.relu(values), W_dec, selection)
        else:
            values = dense_reference_pre_activations(
                x, encoder_weight, encoder_bias, b_dec, selection
            )
            out = dense_reference_decode(torch.relu(values), W_dec, selection)
        (out + b_dec - target).pow(2).sum().backward()
        return out.detach(), [param.grad.clone() for param in params]  # type: ignore[union-attr]

    fast_out, fast_grads = gradients(fast=True)
    dense_out, dense_grads = gradients(fast=False)
    torch.testing.assert_close(fast_out, dense_out, rtol=1e-5, atol=1e-4)
    for fast_grad, dense_grad in zip(fast_grads, dense_grads, strict=True):
        assert dense_grad.abs().max() > 0
        torch.testing.assert_close(fast_grad, dense_grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "groupmax"])
def test_bfloat16_selection_picks_what_its_float32_copy_would(name: str):
    # The dense product that picks the latents stays in bfloat16 (no float32 copy is
    # written); the latents, their float32 values and the gradients are those that the
    # float32 copy of the same bfloat16 products gives.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 48, generator=generator)
    config = SaeConfig(architecture=name, n_latents=384, k=8)
    sae = get_architecture(name)(48, config, seed=0)
    sae.selection_dtype = torch.bfloat16
    centered = x - sae.b_dec.detach()
    pre = sae.dense_pre_activations(centered)
    assert pre.dtype == torch.bfloat16
    low, copy = sae.select(pre), sae.select(pre.float())
    assert torch.equal(low.cols, copy.cols) and torch.equal(low.rows, copy.rows)
    grads = []
    for dense in (pre, pre.float()):
        sae.zero_grad()
        values = selected_pre_activations(
            dense, centered, sae.encoder_weight, sae.encoder_bias, sae.b_dec, low
        )
        assert values.dtype == torch.float32
        values.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in (sae.encoder_weight, sae.encoder_bias)])
    for low_grad, copy_grad in zip(*grads, strict=True):
        assert torch.equal(low_grad, copy_grad)


def test_registry_has_the_five_architectures():
    assert {"topk", "relu", "batchtopk", "jumprelu", "groupmax"} <= set(REGISTRY)
    with pytest.raises(UserError, match="unknown SAE architecture 'gated'"):
        get_architecture("gated")


@pytest.mark.parametrize(("k", "latents"), [(0, 64), (65, 64), (-1, 64)])
def test_k_out_of_range_is_a_user_error(k: int, latents: int):
    with pytest.raises(UserError, match="out of range"):
        SaeConfig(architecture="topk", n_latents=latents, k=k)


def test_latents_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="--latents 0"):
        SaeConfig(architecture="relu", n_latents=0)


@pytest.fixture(scope="module")
def trained(smollm2_activation_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short run per architecture on real activations: 2 epochs of 32k tokens."""
    runs = {}
    for name in sorted(REGISTRY):
        out = tmp_path_factory.mktemp(name)
        config = config_from_cache(
            smollm2_activation_cache,
            sae=SaeConfig(architecture=name, n_latents=768, k=16),
            seeds=[0],
            epochs=2,
            batch_tokens=1024,
            lr=2e-3,
            warmup_steps=10,
        )
        result = train(config, out, Path("/nonexistent-home-unused"))
        runs[name] = (result, out)
    return runs


@pytest.mark.parametrize("name", ["topk", "relu", "batchtopk", "jumprelu", "groupmax"])
def test_each_architecture_learns_real_activations(trained: dict, name: str):
    result, _ = trained[name]
    (sae,) = result.saes
    assert result.step == result.total_steps == 64
    # Mean FVU of the last tenth of training: well below 1 (an SAE that learned nothing
    # would sit at ~1), and sparse: far fewer active latents than the 768 available.
    assert sae.fvu < 0.6, sae
    assert 0 < sae.l0 < 768 / 2, sae


@pytest.mark.parametrize("name", ["topk", "relu", "batchtopk", "jumprelu", "groupmax"])
def test_saved_checkpoint_encodes_like_training(
    trained: dict, name: str, smollm2_activation_cache: Path, tmp_path: Path
):
    """The checkpoint on disk (input scale and, for ReLU, decoder norms folded in) gives the
    same reconstruction on raw activations as the SAE did on scaled ones, in both layouts."""
    _, out = trained[name]
    weights = load_sae(out / HOOKPOINT / "seed0")
    assert weights.cfg["architecture"] == name
    assert weights.cfg["d_in"] == weights.d_in == 576
    assert weights.n_latents == 768
    torch.testing.assert_close(weights.W_dec.norm(dim=1), torch.ones(768))
    x = ActivationCache(smollm2_activation_cache).read(HOOKPOINT, torch.arange(2048))
    latents = encode(weights, x)
    assert latents.shape == (2048, 768)
    assert bool((latents >= 0).all())
    l0 = float((latents > 0).sum(dim=1).float().mean())
    if name == "topk":
        assert l0 <= 16
    if name == "groupmax":
        # At most one active latent in each of the k = 16 groups of 48 latents.
        assert int((latents.unflatten(1, (16, 48)) > 0).sum(dim=2).max()) == 1
    error = x - decode(weights, latents)
    fvu = float(error.pow(2).sum() / total_variance(x))
    assert fvu < 0.7, (name, fvu, l0)

    save_saelens(tmp_path / "saelens", weights)
    save_sparsify(tmp_path / "sparsify", weights)
    for layout in ("saelens", "sparsify"):
        reloaded = load_sae(tmp_path / layout)
        assert reloaded.cfg["architecture"] == name
        assert torch.equal(encode(reloaded, x), latents)


def test_encode_rejects_a_wrong_width(trained: dict):
    _, out = trained["topk"]
    weights = load_sae(out / HOOKPOINT / "seed0")
    with pytest.raises(UserError, match="width 100"):
        encode(weights, torch.zeros(3, 100))


def write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint as SAELens writes it: its own file names, keys and orientation."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_encode_follows_saelens_conventions(tmp_path: Path):
    generator = torch.Generator().manual_seed(1)
    d, n = 12, 40
    W_enc, W_dec = torch.randn(d, n, generator=generator), torch.randn(n, d, generator=generator)
    b_enc, b_dec = torch.randn(n, generator=generator), torch.randn(d, generator=generator)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    x = torch.randn(30, d, generator=generator)

    standard = {"architecture": "standard", "d_in": d, "d_sae": n, "apply_b_dec_to_input": False}
    write_saelens(tmp_path / "standard", standard, tensors)
    weights = load_sae(tmp_path / "standard")
    torch.testing.assert_close(encode(weights, x), torch.relu(x @ W_enc + b_enc))

    topk = {"architecture": "topk", "d_in": d, "d_sae": n, "activation_fn_kwargs": {"k": 3}}
    write_saelens(tmp_path / "topk", topk, tensors)
    latents = encode(load_sae(tmp_path / "topk"), x)
    assert int((latents > 0).sum(dim=1).max()) <= 3
    expected = (x - b_dec) @ W_enc + b_enc
    top = expected.topk(3, dim=1)
    torch.testing.assert_close(latents.gather(1, top.indices), torch.relu(top.values))

    scaled = {**standard, "normalize_activations": "expected_average_only_in"}
    write_saelens(tmp_path / "scaled", scaled, tensors)
    with pytest.raises(UserError, match="normalisation"):
        encode(load_sae(tmp_path / "scaled"), x)


def test_groupmax_reads_sparsify_activation_key(tmp_path: Path):
    """sparsify's cfg.json names no architecture; `activation: groupmax` selects it."""
    generator = torch.Generator().manual_seed(0)
    weights = SaeWeights(
        encoder_weight=torch.randn(12, 5, generator=generator),
        encoder_bias=torch.zeros(12),
        W_dec=torch.randn(12, 5, generator=generator),
        b_dec=torch.zeros(5),
        cfg={"activation": "groupmax", "k": 3, "num_latents": 0, "expansion_factor": 2},
    )
    save_sparsify(tmp_path, weights)
    x = torch.randn(7, 5, generator=generator)
    latents = encode(load_sae(tmp_path), x)
    pre = torch.relu(x @ weights.encoder_weight.T)
    expected = torch.zeros_like(pre)
    for group in range(3):
        block = pre[:, group * 4 : (group + 1) * 4]
        index = block.argmax(dim=1, keepdim=True)
        expected[:, group * 4 : (group + 1) * 4].scatter_(1, index, block.gather(1, index))
    torch.testing.assert_close(latents, expected)
    with pytest.raises(UserError, match="unknown SAE architecture 'softmax'"):
        encode(SaeWeights(**{**weights.__dict__, "cfg": {"activation": "softmax", "k": 3}}), x)
