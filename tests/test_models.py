"""The real embedded subject model: loading, chat, hookpoints and activation capture."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from sae.errors import UserError
from sae.subject_model import (
    blocks_through,
    capture_activations,
    check_hookpoints,
    greedy_chat,
    hookpoints,
    hooks_attached,
    list_models,
    load_model,
    resolve_model,
)

HOOKPOINT = "model.layers.6.mlp"


def test_greedy_chat_answers_sensibly(smollm2):
    model, tokenizer = smollm2
    answer = greedy_chat(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer


def test_model_has_documented_architecture(smollm2):
    model, _ = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    names = hookpoints(model)
    assert HOOKPOINT in names
    assert "model.layers.29.mlp" in names


def test_capture_shapes_and_hooks_removed(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")["input_ids"]
    names = ["model.layers.2.self_attn", HOOKPOINT]
    captured = capture_activations(model, ids, names)
    assert set(captured) == set(names)
    for tensor in captured.values():
        assert tensor.shape == (1, ids.shape[1], 576)
        assert torch.isfinite(tensor).all()
    assert hooks_attached(model) == 0


def test_hooks_removed_when_forward_fails(smollm2):
    model, _ = smollm2
    bad_ids = torch.full((1, 4), 10**9)  # out of the vocabulary: the embedding lookup fails
    with pytest.raises(IndexError):
        capture_activations(model, bad_ids, [HOOKPOINT])
    assert hooks_attached(model) == 0


def test_truncated_forward_matches_full(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(["The quick brown fox", "import os, sys"], return_tensors="pt", padding=True)[
        "input_ids"
    ]
    truncated = capture_activations(model, ids, [HOOKPOINT], stop_early=True)[HOOKPOINT]
    full = capture_activations(model, ids, [HOOKPOINT], stop_early=False)[HOOKPOINT]
    # The same float32 kernels on the same inputs; bitwise equal alone, but once not in the
    # full suite on an AMD EPYC (float32 products may round differently with buffer
    # alignment): equal to float32 rounding, far below any other layer's difference.
    torch.testing.assert_close(truncated, full, rtol=1e-5, atol=1e-6)


def test_blocks_past_the_deepest_hookpoint_are_not_loaded(smollm2, home: Path):
    whole, tokenizer = smollm2
    cut, _ = load_model("smollm2", home, hookpoints=[HOOKPOINT, "model.layers.2"])
    assert len(whole.model.layers) == 30 and len(cut.model.layers) == 7
    assert sum(p.numel() for p in cut.parameters()) < 0.4 * whole.num_parameters()
    ids = tokenizer(["The quick brown fox", "import os, sys"], return_tensors="pt", padding=True)[
        "input_ids"
    ]
    expected = capture_activations(whole, ids, [HOOKPOINT])[HOOKPOINT]
    got = capture_activations(cut, ids, [HOOKPOINT])[HOOKPOINT]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    config = AutoConfig.from_pretrained(resolve_model("smollm2", home))
    assert blocks_through(config, ["model.layers.29.mlp"]) == 30
    # Outside the blocks (embeddings, final norm, head) or past them: every block is needed.
    outside = (["model.embed_tokens"], [HOOKPOINT, "model.norm"], ["lm_head"], ["model.layers.30"])
    for names in outside:
        assert blocks_through(config, names) is None


def test_unknown_hookpoint_names_closest(smollm2):
    model, _ = smollm2
    with pytest.raises(UserError, match=r"model\.layers\.6\.mlp"):
        check_hookpoints(model, ["model.layers.6.mlpp"])


def test_missing_local_folder_is_a_user_error(tmp_path: Path, home: Path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), home)
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path), home)


def test_list_models_shows_embedded(home: Path, smollm2):
    names = [name for name, _ in list_models(home)]
    assert "smollm2" in names
