"""Benchmark of latent matching: our exact and sparse solvers against SciPy, in one run.

    python bench/match.py                              # 8,192 and 32,768 latents
    python bench/match.py --sizes 131072 --no-exact    # the sparse solver alone at 131,072

Synthetic SAEs, d = 576: SAE B holds a permutation of SAE A's decoder directions, each
perturbed by noise of a random size (matched cosines spread over ~0.5-0.99, across the 0.7
threshold), for `--shared` of the latents, and fresh random directions for the rest. Encoder
rows are the decoder rows plus more noise, redrawn for B, as encoders agree less across seeds.
Each measurement runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from queue import Empty
from typing import Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from sae.checkpoint import SaeWeights
from sae.matching import MatchConfig, match_saes
from sae.matching.solvers import COST_SHIFT, cosine_blocks, lap

D_IN = 576
console = Console()


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def synthetic_pair(n: int, shared: float, seed: int = 0) -> tuple[SaeWeights, SaeWeights]:
    """Two SAEs whose decoders share `shared` of their directions (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    n_shared = int(shared * n)

    def noisy(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        # A random direction of norm sigma added to a unit row gives cosine 1/sqrt(1+sigma^2).
        sigma = low + (high - low) * torch.rand(x.shape[0], 1, generator=gen)
        return unit(x + sigma * unit(torch.randn(x.shape, generator=gen)))

    dec_a = unit(torch.randn(n, D_IN, generator=gen))
    perm = torch.randperm(n, generator=gen)
    dec_b = unit(torch.randn(n, D_IN, generator=gen))
    dec_b[perm[:n_shared]] = noisy(dec_a[:n_shared], 0.1, 1.8)
    enc_a = noisy(dec_a, 0.1, 0.6)
    enc_b = noisy(dec_b, 0.1, 0.6)
    enc_b[perm[:n_shared]] = noisy(enc_a[:n_shared], 0.1, 1.6)

    def sae(dec: torch.Tensor, enc: torch.Tensor) -> SaeWeights:
        return SaeWeights(enc, torch.zeros(n), dec, torch.zeros(D_IN), {"k": 32})

    return sae(dec_a, enc_a), sae(dec_b, enc_b)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_match(n: int, shared: float, solver: str, candidates: int) -> dict[str, Any]:
    a, b = synthetic_pair(n, shared)
    before = peak_rss_gib()
    config = MatchConfig(solver=solver, candidates=candidates)  # type: ignore[arg-type]
    started, cpu_started = time.perf_counter(), time.process_time()
    result = match_saes(a, b, config)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "peak_rss_gib": peak_rss_gib(),
        "rss_before_gib": before,
        "summary": result.summary.model_dump(),
    }


def run_solver_only(n: int, shared: float) -> dict[str, Any]:
    """Our dense LAP and SciPy's on the same decoder cost matrix."""
    from scipy.optimize import linear_sum_assignment

    a, b = synthetic_pair(n, shared)
    dec_a, dec_b = unit(a.W_dec), unit(b.W_dec)
    cost = np.empty((n, n))
    for start, block in cosine_blocks(dec_a, dec_b, 1024):
        cost[start : start + block.shape[0]] = COST_SHIFT - block.numpy()
    out: dict[str, Any] = {}
    if lap is not None:
        started = time.perf_counter()
        x = np.asarray(lap.lapjv(cost, extend_cost=False, return_cost=False)[0])
        out["ours_seconds"] = time.perf_counter() - started
        out["ours_objective"] = float((COST_SHIFT - cost[np.arange(n), x]).sum())
    started = time.perf_counter()
    rows, cols = linear_sum_assignment(cost)
    out["scipy_seconds"] = time.perf_counter() - started
    out["scipy_objective"] = float((COST_SHIFT - cost[rows, cols]).sum())
    return out


def _child(queue: Any, target: Any, args: tuple[Any, ...]) -> None:
    queue.put(target(*args))


def in_process(target: Any, *args: Any) -> dict[str, Any]:
    """Run target(*args) in a fresh process; its peak RSS is then its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, target, args))
    process.start()
    while True:
        try:
            result: dict[str, Any] = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__}{args} died: {process.exitcode}") from None
    process.join()
    return result


def main(
    sizes: str = typer.Option("8192,32768", help="latent counts, comma-separated"),
    shared: float = typer.Option(0.5, help="fraction of B's directions taken from A"),
    candidates: int = typer.Option(32, help="sparse solver top-k"),
    exact: bool = typer.Option(True, help="run the exact solver (dense; 8 n^2 bytes)"),
    scipy_max: int = typer.Option(8192, help="compare against SciPy up to this size"),
) -> None:
    """Print solver times, memory and agreement for each size."""
    console.print(
        f"synthetic SAEs, d={D_IN}: B = A's decoder directions permuted with noise for "
        f"{shared:.0%} of latents, fresh random directions for the rest; "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    for n in [int(size) for size in sizes.split(",")]:
        table = Table("measure", "value", title=f"{n:,} latents")
        table.add_row("load average at the start (1 / 5 / 15 min)", load_average())
        if n <= scipy_max:
            solo = in_process(run_solver_only, n, shared)
            table.add_row("SciPy linear_sum_assignment (decoder)", f"{solo['scipy_seconds']:.2f} s")
            if "ours_seconds" in solo:
                table.add_row("our exact LAP, same matrix", f"{solo['ours_seconds']:.2f} s")
                table.add_row(
                    "speed-up over SciPy", f"{solo['scipy_seconds'] / solo['ours_seconds']:.2f}x"
                )
                table.add_row(
                    "objective, ours - SciPy",
                    f"{solo['ours_objective'] - solo['scipy_objective']:.3g} "
                    f"(of {solo['scipy_objective']:,.3f})",
                )
        dense = in_process(run_match, n, shared, "exact", candidates) if exact else None
        sparse = in_process(run_match, n, shared, "sparse", candidates)
        for name, run in (("exact", dense), ("sparse", sparse)):
            if run is None:
                continue
            summary = run["summary"]
            table.add_row(
                f"{name}: decoder + encoder matching",
                f"{run['seconds']:.1f} s ({run['cpu_seconds']:.0f} CPU s), "
                f"peak RSS {run['peak_rss_gib']:.2f} GiB "
                f"(inputs {run['rss_before_gib']:.2f} GiB)",
            )
            table.add_row(
                f"{name}: shared / decoder-only",
                f"{100 * summary['shared_fraction']:.3f}% / "
                f"{100 * summary['shared_fraction_decoder_only']:.3f}%",
            )
        summary = sparse["summary"]
        table.add_row(
            "sparse: proven gap bound (decoder / encoder)",
            f"{summary['gap_bound_decoder']:.3g} / {summary['gap_bound_encoder']:.3g} of "
            f"{summary['objective_decoder']:,.1f} / {summary['objective_encoder']:,.1f}",
        )
        table.add_row("sparse: candidate edges", f"{summary['candidate_edges']:,}")
        if dense is not None:
            exact_summary = dense["summary"]
            table.add_row(
                "sparse - exact objective (decoder / encoder)",
                f"{summary['objective_decoder'] - exact_summary['objective_decoder']:.4g} / "
                f"{summary['objective_encoder'] - exact_summary['objective_encoder']:.4g}",
            )
            table.add_row(
                "sparse - exact shared fraction",
                f"{100 * (summary['shared_fraction'] - exact_summary['shared_fraction']):+.3f} pp",
            )
            table.add_row("exact / sparse time", f"{dense['seconds'] / sparse['seconds']:.2f}x")
        table.add_row("load average at the end (1 / 5 / 15 min)", load_average())
        console.print(table)


def load_average() -> str:
    # Other work on the machine slows every number here; the load says how much there was.
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    typer.run(main)
