"""Latent cache throughput, cost split and peak memory at two dataset sizes.

    python -m bench.cache [--latents 4608] [--saes 2] [--sizes 100000,1000000]

SmolLM2 at model.layers.6.mlp with S TopK SAEs (k = 32) of random unit-norm directions:
their firing pattern is what the cache's cost depends on, not how well they were trained.
The embedded corpus has about 523k tokens; a larger size repeats it, which the streaming
cache cannot tell from new text. Each size runs in its own process so that its peak RSS is
its own.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

HOOKPOINT = "model.layers.6.mlp"


def measure(n_latents: int, n_saes: int, tokens: int) -> dict[str, float]:
    from sae.data import load_chunks
    from sae.latent_stats import CacheConfig, collect_latent_stats
    from sae.subject_model import capture_activations, load_model
    from service.config import get_settings

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", get_settings().home)
    chunks = load_chunks("embedded", tokenizer, chunk_len=256)
    repeats = -(-tokens // chunks.numel())
    chunks = chunks.repeat(repeats, 1)[: tokens // 256]
    timings = {"forward": 0.0, "encode": 0.0}

    def activations(batch: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        hidden = capture_activations(model, batch, [HOOKPOINT])[HOOKPOINT]
        timings["forward"] += time.perf_counter() - start
        return hidden

    def make_encoder(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        weight = torch.nn.functional.normalize(torch.randn(n_latents, 576, generator=generator))

        def encode(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            pre = x @ weight.T
            values, indices = pre.topk(32, dim=-1)
            out = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
            timings["encode"] += time.perf_counter() - start
            return out

        return encode

    start = time.perf_counter()
    collect_latent_stats(
        activations,
        [make_encoder(seed) for seed in range(n_saes)],
        [n_latents] * n_saes,
        chunks,
        CacheConfig(),
    )
    total = time.perf_counter() - start
    return {
        "tokens": float(chunks.numel()),
        "seconds": total,
        "forward": timings["forward"],
        "encode": timings["encode"],
        "bookkeeping": total - timings["forward"] - timings["encode"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--saes", type=int, default=2)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.latents, args.saes, args.one)))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, "-m", "bench.cache", "--latents", str(args.latents)]
        command += ["--saes", str(args.saes), "--one", str(size)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(f"{args.saes} SAEs x {args.latents} latents at {HOOKPOINT}, window 32")
    print(
        f"{'tokens':>10} {'tok/s':>8} {'forward':>8} {'encode':>8} {'bookkeep':>8} {'peak MiB':>9}"
    )
    for row in rows:
        split = [row[key] / row["seconds"] for key in ("forward", "encode", "bookkeeping")]
        print(
            f"{row['tokens']:>10,.0f} {row['tokens'] / row['seconds']:>8,.0f} "
            + " ".join(f"{share:>8.0%}" for share in split)
            + f" {row['peak_rss_mib']:>8,.0f}"
        )
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        print(f"peak memory ratio, largest / smallest size: {ratio:.3f}")


if __name__ == "__main__":
    main()
