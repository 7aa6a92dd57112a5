"""Writes SAE checkpoints with the real sparsify and SAELens libraries, for test_interop.py.

Run by that test with the Python of `.venv-interop` (`make interop`), which has
`eai-sparsify` and `sae-lens` installed; it imports nothing of this project.
Usage: python interop_checkpoints.py MODEL_FOLDER OUT_FOLDER

OUT/sparsify/run/h.1.mlp/seed{0,1}/  sparsify Trainer, 2 seeds (init_seeds), on CPU
OUT/saelens_topk/seed{0,1}/          SAELens TopKSAE.save_model
OUT/saelens_jumprelu/seed{0,1}/      SAELens JumpReLUSAE.save_model
OUT/reference.safetensors            inputs and each library's own encoding of them (seed 0)
"""

import inspect
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig
from safetensors.torch import save_file
from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

N_LATENTS = 64
K = 4


def token_dataset(tokenizer, length: int = 64) -> Dataset:
    # Real text that exists offline: the source of a standard-library module.
    ids = tokenizer(inspect.getsource(json), return_tensors="pt")["input_ids"][0]
    rows = ids[: len(ids) // length * length].reshape(-1, length)
    return Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")


def sparsify_checkpoints(model_folder: Path, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    config = TrainConfig(
        SaeConfig(num_latents=N_LATENTS, k=K),
        batch_size=4,
        hookpoints=["h.1.mlp"],
        init_seeds=[0, 1],
        log_to_wandb=False,
        save_dir=str(out / "sparsify"),
        run_name="run",
    )
    Trainer(config, token_dataset(tokenizer), model).fit()


def saelens_checkpoints(d_in: int, out: Path) -> dict[str, torch.nn.Module]:
    saes: dict[str, torch.nn.Module] = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        topk = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=N_LATENTS, k=K))
        topk.save_model(out / "saelens_topk" / f"seed{seed}")
        torch.manual_seed(seed)
        jumprelu = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=N_LATENTS))
        # Thresholds start at zero; spread them so the threshold really decides something.
        with torch.no_grad():
            jumprelu.threshold.uniform_(0.0, 0.5)
        jumprelu.save_model(out / "saelens_jumprelu" / f"seed{seed}")
        if seed == 0:
            saes = {"saelens_topk": topk, "saelens_jumprelu": jumprelu}
    return saes


def reference_encodings(d_in: int, out: Path, saelens: dict[str, torch.nn.Module]) -> None:
    """Each library's own latents for the same inputs, to compare this project's encode with."""
    x = torch.randn(16, d_in, generator=torch.Generator().manual_seed(0))
    tensors = {"x": x}
    with torch.no_grad():
        for name, sae in saelens.items():
            tensors[name] = sae.encode(x)
        sparse = SparseCoder.load_from_disk(out / "sparsify" / "run" / "h.1.mlp" / "seed0")
        encoded = sparse.encode(x)
        dense = torch.zeros(16, sparse.num_latents)
        tensors["sparsify"] = dense.scatter_(1, encoded.top_indices, encoded.top_acts)
    save_file({name: t.contiguous() for name, t in tensors.items()}, out / "reference.safetensors")


if __name__ == "__main__":
    model_folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    width = json.loads((model_folder / "config.json").read_text())["n_embd"]
    sparsify_checkpoints(model_folder, out)
    reference_encodings(width, out, saelens_checkpoints(width, out))
