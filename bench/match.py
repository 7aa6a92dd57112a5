"""Benchmark of latent matching, every number against a baseline measured in the same run.

    python -m bench.match                       # 131,072 latents; baselines at 32,768 and 8,192
    python -m bench.match --size 32768 --baseline-size 8192 --exact-size 4096   # quicker

Printed: float32 and bfloat16 matrix-product rates on one 8,192 x 576 @ 576 x 8,192 block and
the candidate scan's dtype (`scan_dtype`, bfloat16 only where it is measurably faster); the wall
time of each phase of `match` (decoder + encoder; candidates, solve, bound) and its peak RSS
at `--size`; at `--baseline-size`, a bare float32 pass that computes only the row maxima of
both cosine matrices on the scan's device, and `match` against it (the ratio is what to compare
across machines and loads); the shared fraction of `match` against the same solver on
candidates found by a float32 scan (the exact candidate graph), and at `--exact-size` against
the dense exact solver.

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

import torch
import typer
from rich.console import Console

from sae.checkpoint import SaeWeights
from sae.matching import MatchConfig, match_saes, shared_mask
from sae.matching.candidates import cosine_blocks, scan_device, scan_dtype
from sae.matching.solvers import assign_sparse
from sae.precision import product_seconds

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
        "decoder_partner": result.decoder.partner.tolist(),
    }


def run_row_maxima(n: int, shared: float) -> dict[str, Any]:
    """The floor any matching pays: both float32 cosine matrices, only their row maxima, on
    the device the candidate scan uses (the GPU where torch sees one)."""
    a, b = synthetic_pair(n, shared)
    device = scan_device()
    started, cpu_started = time.perf_counter(), time.process_time()
    for left, right in ((a.W_dec, b.W_dec), (a.encoder_weight, b.encoder_weight)):
        for _, block in cosine_blocks(unit(left).to(device), unit(right).to(device), 1024):
            block.max(dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def run_float32_candidates(n: int, shared: float, candidates: int) -> dict[str, Any]:
    """The sparse solver on candidates found by a float32 scan: the exact candidate graph."""
    a, b = synthetic_pair(n, shared)
    started = time.perf_counter()
    sides = [
        assign_sparse(unit(left), unit(right), candidates, dtype=torch.float32)
        for left, right in ((a.W_dec, b.W_dec), (a.encoder_weight, b.encoder_weight))
    ]
    shared_fraction = float(shared_mask(sides[0].cosine, sides[1].cosine, 0.7).mean())
    return {
        "seconds": time.perf_counter() - started,
        "shared_fraction": shared_fraction,
        "objectives": [side.objective for side in sides],
    }


def run_product_rates() -> dict[str, Any]:
    """GFLOP/s of one 8,192 x 576 @ 576 x 8,192 product per dtype, and the dtype the candidate
    scan picks on this machine."""
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(8192, D_IN, generator=gen), torch.randn(8192, D_IN, generator=gen)
    gflop = 2 * 8192 * 8192 * D_IN / 1e9
    rates = {
        str(dtype).removeprefix("torch."): gflop / product_seconds(left, right, dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }
    return {"rates": rates, "scan_dtype": str(scan_dtype(scan_device())).removeprefix("torch.")}


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
    size: int = typer.Option(131072, help="latents of the timed matching"),
    baseline_size: int = typer.Option(
        32768, help="latents of the float32 row-maxima baseline and the float32-scan check"
    ),
    exact_size: int = typer.Option(8192, help="latents of the check against the exact solver"),
    shared: float = typer.Option(0.5, help="fraction of B's directions taken from A"),
    candidates: int = typer.Option(32, help="sparse solver top-k"),
    solver: str = typer.Option("auto", help="solver of the timed matching"),
    float32_check: bool = typer.Option(
        True, help="also solve on candidates from a float32 scan (slow: 4 float32 passes)"
    ),
) -> None:
    """Print match's time per phase, peak RSS and agreement, with same-run baselines; each
    line as soon as it is measured, quickest first."""
    console.print(
        f"synthetic SAEs, d={D_IN}: B = A's decoder directions permuted with noise for "
        f"{shared:.0%} of latents, fresh random directions for the rest; "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    console.print(f"start: {uptime()}")
    product = in_process(run_product_rates)
    rates = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in product["rates"].items())
    console.print(
        f"8,192 x {D_IN} @ {D_IN} x 8,192 block: {rates}; candidate scan in "
        f"{product['scan_dtype']}; {uptime()}"
    )
    bare = in_process(run_row_maxima, baseline_size, shared)
    fast = in_process(run_match, baseline_size, shared, solver, candidates)
    console.print(
        f"{baseline_size:,} latents: bare float32 row maxima of both matrices "
        f"{bare['seconds']:.1f} s ({bare['cpu_seconds']:.0f} CPU s); match --solver {solver} "
        f"{fast['seconds']:.1f} s ({fast['cpu_seconds']:.0f} CPU s) = "
        f"{fast['seconds'] / bare['seconds']:.2f}x the bare pass "
        f"({fast['cpu_seconds'] / bare['cpu_seconds']:.2f}x in CPU time, which other work on "
        f"the machine disturbs less); {_phases(fast)}; {uptime()}"
    )
    exact = in_process(run_match, exact_size, shared, "exact", candidates)
    auto = in_process(run_match, exact_size, shared, solver, candidates)
    console.print(
        f"{exact_size:,} latents: match --solver {solver} {auto['seconds']:.1f} s "
        f"({auto['summary']['solver']}), exact {exact['seconds']:.1f} s; shared "
        f"{_percent(auto['summary'])} / {_percent(exact['summary'])}, decoder partners equal: "
        f"{auto['decoder_partner'] == exact['decoder_partner']}; {uptime()}"
    )
    main_run = in_process(run_match, size, shared, solver, candidates)
    console.print(
        f"{size:,} latents: match --solver {solver} {main_run['seconds']:.1f} s "
        f"({main_run['cpu_seconds']:.0f} CPU s), peak RSS {main_run['peak_rss_gib']:.2f} GiB "
        f"(inputs {main_run['rss_before_gib']:.2f}); {_phases(main_run)}; {uptime()}"
    )
    if float32_check:
        reference = in_process(run_float32_candidates, baseline_size, shared, candidates)
        console.print(
            f"{baseline_size:,} latents: shared {_percent(fast['summary'])} (match) / "
            f"{100 * reference['shared_fraction']:.3f}% (sparse on float32-scan candidates, "
            f"{reference['seconds']:.1f} s); {uptime()}"
        )


def _phases(run: dict[str, Any]) -> str:
    summary = run["summary"]
    phases = ", ".join(f"{name} {t:.1f} s" for name, t in summary["phase_seconds"].items())
    return (
        f"{phases}; solver {summary['solver']}, shared {_percent(summary)}, gap bound "
        f"{summary['gap_bound_decoder']:.3g} / {summary['gap_bound_encoder']:.3g} of "
        f"{summary['objective_decoder']:,.1f} / {summary['objective_encoder']:,.1f}"
    )


def _percent(summary: dict[str, Any]) -> str:
    return f"{100 * summary['shared_fraction']:.3f}%"


def uptime() -> str:
    # Other work on the machine slows every number here; the load says how much there was.
    loads = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"load average (1 / 5 / 15 min) {loads}"


if __name__ == "__main__":
    typer.run(main)
