"""Benchmark: training S seeds in one pass against S separate runs, on SmolLM2.

Prints, for one hookpoint (SmolLM2's residual stream after layer 6 by default):
- the truncated model forward alone, in float32 and under bfloat16 autocast (the floor every
  end-to-end step pays),
- end-to-end training tokens/s (model forward + every seed's SAE step) for S = 1, 2, 4, with
  `precision` auto (bfloat16 where this CPU runs it faster) and float32, the cost of S
  together relative to one seed, and relative to S separate runs,
- EleutherAI's sparsify on the same model, hookpoint, sizes and tokens, 2 seeds, in the same
  run (`bench.sparsify_rate`, in the environment `make interop` installs), and the ratio,
- training tokens/s from an activation cache on disk (no model) for S = 1 and 4,
- training tokens/s from the cache with 1 and 2 processes (`torchrun`, gloo), 2 seeds,
  the same global batch: the point on 2 cores is that the same command runs, not speed,
- the design check behind the trainer: stacked seeds (one bmm) against a loop of per-seed
  matrix products, time and bitwise equality,
- peak resident memory of the process.

Rates are steady-state: one batch's tokens over the median step time of a run, so model
loading, tokenisation and initialisation are not counted.

    python -m bench.train [--latents 4608] [--k 32] [--steps 16] [--batch-tokens 1024]
"""

import argparse
import itertools
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sae.activation_cache import build_activation_cache
from sae.architectures import SaeConfig
from sae.data import load_chunks
from sae.precision import Precision, compute_dtype
from sae.subject_model import capture_activations, converted_folder, load_model
from sae.train import TrainConfig, TrainProgress, config_from_cache, train
from service.config import get_settings

SPARSIFY_VERSION = "1.3.3"  # as `make interop` installs it
PRECISIONS: tuple[Precision, ...] = ("auto", "float32")


def steady_rate(config: TrainConfig, out: Path, home: Path, steps: int) -> float:
    """One batch's tokens over the median time between consecutive steps (setup and the
    first step excluded), as `bench.sparsify_rate` measures sparsify."""
    stamps: list[float] = []

    def record(_state: TrainProgress) -> None:
        stamps.append(time.perf_counter())

    train(config, out, home, record, stop_after_steps=steps, checkpoint_seconds=1e9)
    return config.batch_tokens / statistics.median(b - a for a, b in itertools.pairwise(stamps))


def sparsify_rate(home: Path, args: argparse.Namespace, seeds: int, scratch: Path) -> float:
    """Sparsify's steady tokens/s on the same model, hookpoint, sizes and tokens, in the
    interop environment (`make interop`), with the same number of threads."""
    python = Path(".venv-interop/bin/python")
    if not python.exists():
        raise SystemExit("sparsify's environment is missing: run `make interop` first")
    _, tokenizer = load_model("smollm2", home)
    tokens = load_chunks("embedded", tokenizer, 256, args.steps * args.batch_tokens)
    tokens_file = scratch / "tokens.pt"
    torch.save(tokens, tokens_file)
    # sparsify names modules from the transformer body (`layers.6`), not the causal LM.
    hookpoint = args.hookpoint.removeprefix("model.")
    command = [str(python), "-m", "bench.sparsify_rate", str(converted_folder("smollm2", home))]
    command += [str(tokens_file), hookpoint, str(args.latents), str(args.k)]
    command += [",".join(map(str, range(seeds))), str(args.batch_tokens // 256)]
    threads = str(torch.get_num_threads())
    finished = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": threads},
    )
    rate = re.search(r"^RATE ([\d.]+)", finished.stdout, re.MULTILINE)
    if rate is None:
        raise RuntimeError(f"no rate in sparsify's output: {finished.stdout}")
    return float(rate.group(1))


def forward_rate(
    home: Path, hookpoint: str, batch_chunks: int, precision: str, repeats: int = 3
) -> float:
    """Tokens/s of the model forward stopped after the hookpoint, as training runs it."""
    model, tokenizer = load_model("smollm2", home)
    ids = load_chunks("embedded", tokenizer, 256, batch_chunks * 256)
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        capture_activations(model, ids, [hookpoint])
        for _ in range(repeats):
            start = time.perf_counter()
            capture_activations(model, ids, [hookpoint])
            best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def processes_rate(cache: Path, out: Path, processes: int, args: argparse.Namespace) -> float:
    """Tokens/s that `autointerp train --from-cache` prints, in `processes` processes."""
    bin_folder = Path(sys.executable).parent
    launcher = [str(bin_folder / "autointerp")]
    if processes > 1:
        launcher = [str(bin_folder / "torchrun"), "--standalone", "--nproc-per-node"]
        launcher += [str(processes), "-m", "service.cli"]
    options = ["--from-cache", str(cache), "--latents", str(args.latents), "--k", str(args.k)]
    options += ["--seeds", "0,1", "--batch-tokens", str(args.batch_tokens)]
    # The cores are shared out among the processes, as torchrun's users would.
    threads = str(max(1, torch.get_num_threads() // processes))
    finished = subprocess.run(
        [*launcher, "train", "--out", str(out), *options],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": threads},
    )
    rate = re.search(r"([\d,]+) tokens/s over", finished.stdout)
    if rate is None:
        raise RuntimeError(f"no rate in the output of train: {finished.stdout}")
    return float(rate.group(1).replace(",", ""))


def stacking_check(d: int, n: int, tokens: int, seeds: int) -> tuple[float, float, bool]:
    """Seconds for one bmm over stacked seeds, for a loop of per-seed mm, and equality."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(seeds, tokens, d, generator=generator)
    weights = torch.randn(seeds, d, n, generator=generator)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    stacked = best(lambda: torch.bmm(x, weights))
    looped = best(lambda: [x[s] @ weights[s] for s in range(seeds)])
    equal = all(torch.equal(torch.bmm(x, weights)[s], x[s] @ weights[s]) for s in range(seeds))
    return stacked, looped, equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hookpoint", default="model.layers.6")
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="training steps per measurement")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--cache", type=Path, help="existing activation cache (else built)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per S")
    args = parser.parse_args()
    home = get_settings().home
    tokens = args.steps * args.batch_tokens
    sae = SaeConfig(architecture="topk", n_latents=args.latents, k=args.k)
    print(
        f"SmolLM2 {args.hookpoint}, TopK {args.latents} latents k={args.k}, "
        f"{args.steps} steps x {args.batch_tokens} tokens; torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    low = compute_dtype("auto")
    print(f"precision auto is {str(low).removeprefix('torch.')} on this machine")
    for precision in ("float32", "bfloat16"):
        forward = forward_rate(home, args.hookpoint, args.batch_tokens // 256, precision)
        print(f"truncated model forward alone, {precision}: {forward:,.0f} tokens/s")

    rates: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        # Interleaved repeats, best of each: a shared machine's load drifts between runs.
        for repeat in range(args.repeats):
            for precision in PRECISIONS:
                for seeds in (1, 2, 4):
                    config = TrainConfig(
                        hookpoints=[args.hookpoint],
                        max_tokens=tokens,
                        sae=sae,
                        seeds=list(range(seeds)),
                        batch_tokens=args.batch_tokens,
                        precision=precision,
                    )
                    out = Path(scratch) / f"model-{precision}-s{seeds}-{repeat}"
                    rate = steady_rate(config, out, home, args.steps)
                    rates[precision, seeds] = max(rates.get((precision, seeds), 0.0), rate)
            rate = sparsify_rate(home, args, 2, Path(scratch))
            rates["sparsify", 2] = max(rates.get(("sparsify", 2), 0.0), rate)
    print("\nend to end (model forward + SAE steps):")
    header = ("precision", "seeds", "tokens/s", "cost vs 1 seed", "vs S runs")
    print("{:>9} {:>5} {:>10} {:>15} {:>10}".format(*header))
    for precision in PRECISIONS:
        for seeds in (1, 2, 4):
            rate = rates[precision, seeds]
            cost = rates[precision, 1] / rate
            print(f"{precision:>9} {seeds:>5} {rate:>10,.0f} {cost:>14.2f}x {cost / seeds:>9.2f}x")
    theirs = rates["sparsify", 2]
    print(
        f"sparsify {SPARSIFY_VERSION}, same model, hookpoint, sizes and tokens, 2 seeds "
        f"(init_seeds, Adam): {theirs:,.0f} tokens/s; autointerp train is "
        f"{rates['auto', 2] / theirs:.1f}x it (precision auto), "
        f"{rates['float32', 2] / theirs:.1f}x (float32)"
    )

    with tempfile.TemporaryDirectory() as scratch:
        cache_folder = args.cache
        if cache_folder is None:
            cache_folder = Path(scratch) / "cache"
            start = time.perf_counter()
            build_activation_cache(
                cache_folder, "smollm2", [args.hookpoint], home, max_tokens=tokens
            )
            print(f"\nbuilt a {tokens:,}-token cache in {time.perf_counter() - start:.0f} s")
        print("\nfrom the activation cache (no model):")
        for seeds in (1, 4):
            config = config_from_cache(
                cache_folder,
                hookpoints=[args.hookpoint],
                sae=sae,
                seeds=list(range(seeds)),
                batch_tokens=args.batch_tokens,
            )
            rate = steady_rate(config, Path(scratch) / f"cache-s{seeds}", home, args.steps)
            print(f"{seeds:>5} seeds: {rate:,.0f} tokens/s")
        print("\nfrom the activation cache, 2 seeds, whole cache, autointerp train:")
        for processes in (1, 2):
            out = Path(scratch) / f"processes-{processes}"
            rate = processes_rate(cache_folder, out, processes, args)
            print(f"{processes:>5} processes: {rate:,.0f} tokens/s")

    stacked, looped, equal = stacking_check(576, args.latents, args.batch_tokens, 4)
    print(
        f"\nencoder product, 4 seeds: stacked bmm {stacked * 1e3:.0f} ms, per-seed loop "
        f"{looped * 1e3:.0f} ms (loop/bmm {looped / stacked:.2f}); bitwise equal: {equal}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory: {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
