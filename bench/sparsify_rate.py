"""EleutherAI's sparsify training on the same model, hookpoint, sizes and tokens as `bench.train`.

Runs in the interop environment (`make interop`: sparsify and its own dependencies), never in
the project's: `bench.train` starts it as a subprocess and reads the one line it prints,

    RATE <tokens/s> <steps>

Tokens/s are steady-state, as `bench.train` measures its own: one batch's tokens over the
median time between consecutive steps' model calls (a forward pre-hook stamps each), so
loading and the first steps' initialisation are not counted. Sparsify's Python API with
its documented options: TopK, `init_seeds` for several seeds in one pass, Adam (the
optimizer `autointerp train` uses), FVU loss, no wandb.

    .venv-interop/bin/python -m bench.sparsify_rate MODEL_FOLDER TOKENS.pt layers.6 4608 32 0,1 4
"""

import itertools
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from sparsify import SparseCoderConfig, TrainConfig, Trainer
from transformers import AutoModelForCausalLM


def main() -> None:
    folder, tokens_file, hookpoint, latents, k, seeds, batch_chunks = sys.argv[1:8]
    chunks = torch.load(tokens_file)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": chunks.tolist()}).with_format("torch")
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda _module, _args: stamps.append(time.perf_counter()))
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(
            SparseCoderConfig(num_latents=int(latents), k=int(k)),
            batch_size=int(batch_chunks),
            hookpoints=[hookpoint],
            init_seeds=[int(seed) for seed in seeds.split(",")],
            optimizer="adam",
            log_to_wandb=False,
            save_every=10**9,
            save_dir=scratch,
        )
        Trainer(config, dataset, model).fit()
    step_seconds = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    tokens_per_step = int(batch_chunks) * chunks.shape[1]
    print(f"RATE {tokens_per_step / step_seconds:.1f} {len(stamps) - 1}")


if __name__ == "__main__":
    main()
