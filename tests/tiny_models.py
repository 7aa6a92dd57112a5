"""A small randomly initialised causal LM of another family than SmolLM2 (GPT-2), built with
transformers from a config and saved to a folder with SmolLM2's tokenizer, for tests of the
generic subject-model path."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sae.subject_model import load_tokenizer

TINY_GPT2_HOOKPOINT = "transformer.h.1.mlp"
TINY_GPT2_WIDTH = 32


def save_tiny_gpt2(folder: Path, home: Path) -> Path:
    """Write a 2-layer GPT-2 of width 32 to `folder` (weights, config, tokenizer)."""
    tokenizer = load_tokenizer("smollm2", home)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=TINY_GPT2_WIDTH,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
