"""Benchmark of `import-saes`: what recording SAEs trained elsewhere costs, by part, against
the subject model's load as the baseline, in one run.

    python -m bench.import_saes                      # 2 seeds x 4,608 and 32,768 latents
    python -m bench.import_saes --sizes 131072 --seeds 4

Synthetic sparsify-layout checkpoints (d = 576, SmolLM2's layer-6 MLP width) in a temporary
folder; the store is a fresh SQLite file. Parts: reading and checking every checkpoint,
loading SmolLM2 and running it up to the hookpoint (the width check), and writing the run,
SAE and latent rows. Peak RSS is the whole process's.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from sae.checkpoint import SaeWeights, save_sparsify
from sae.checkpoint_import import ImportConfig, check_widths, inspect_checkpoints
from sae.subject_model import load_model
from service.config import get_settings
from service.store.engine import open_store, upgrade
from service.store.imported import record_import

D_IN = 576
HOOKPOINT = "model.layers.6.mlp"
console = Console()


def write_checkpoints(root: Path, n_latents: int, seeds: int) -> None:
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        encoder = torch.randn(n_latents, D_IN, generator=generator)
        weights = SaeWeights(
            encoder_weight=encoder,
            encoder_bias=torch.zeros(n_latents),
            W_dec=encoder / encoder.norm(dim=1, keepdim=True),
            b_dec=torch.zeros(D_IN),
            cfg={"activation": "topk", "k": 32, "num_latents": n_latents},
        )
        save_sparsify(root / f"seed{seed}", weights)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(
    sizes: list[int] = typer.Option([4608, 32768], help="latents per SAE"),
    seeds: int = typer.Option(2, help="seeds per run"),
) -> None:
    home = get_settings().home
    started = time.perf_counter()
    model, _ = load_model("smollm2", home)
    model_seconds = time.perf_counter() - started
    table = Table(
        "latents x seeds",
        "read + check (s)",
        "width probe (s)",
        "whole import (s)",
        "rest: store rows (s)",
        "import / model load",
        "peak RSS (GiB)",
    )
    for n_latents in sizes:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            write_checkpoints(root / "saes", n_latents, seeds)
            config = ImportConfig(hookpoint=HOOKPOINT, folders=[str(root / "saes")])
            started = time.perf_counter()
            saes = inspect_checkpoints(config)
            read_seconds = time.perf_counter() - started
            started = time.perf_counter()
            check_widths(saes, model, HOOKPOINT)
            probe_seconds = time.perf_counter() - started
            url = f"sqlite:///{root / 'store.db'}"
            upgrade(url)
            store = open_store(url)
            try:
                started = time.perf_counter()
                record_import(store, "bench", config, home)
                whole = time.perf_counter() - started
            finally:
                store.dispose()
        # The whole import loads the model again; what is left is the store's share.
        rows = whole - read_seconds - probe_seconds - model_seconds
        table.add_row(
            f"{n_latents:,} x {seeds}",
            f"{read_seconds:.2f}",
            f"{probe_seconds:.2f}",
            f"{whole:.2f}",
            f"{max(rows, 0.0):.2f}",
            f"{whole / model_seconds:.2f}x",
            f"{peak_rss_gib():.2f}",
        )
    console.print(f"SmolLM2 load (baseline): {model_seconds:.2f} s")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
