"""The cache stage at scale, two measurements.

    python -m bench.cache stats [--latents 4608] [--saes 2] [--sizes 100000,1000000]
    python -m bench.cache write [--latents 4608,32768] [--saes 2] [--backends sqlite,postgresql]

`stats`: latent-cache throughput, cost split and peak memory at two dataset sizes. SmolLM2
at model.layers.6.mlp with S TopK SAEs (k = 32) of random unit-norm directions: their firing
pattern is what the cache's cost depends on, not how well they were trained. The embedded
corpus has about 523k tokens; a larger size repeats it, which the streaming cache cannot
tell from new text.

`write`: the windows a run's cache writes into the store, through the stage's own writer
(`service.cache.writer.write_windows`, batches of `BATCH_ROWS` committed one by one) into a
fresh SQLite file and a scratch PostgreSQL database. Each SAE gets the default config's
windows per latent (20 top, 10 x 5 quantile, 20 non-firing: 90) of random token ids and
activations, generated batch by batch as the stage slices them, and their text decoded by
SmolLM2's tokenizer as the stage does. 32,768 latents x 2 seeds is about 6 million windows;
it prints rows/s, peak RSS and the store's bytes per window, and each size's ratio to the
smallest's (the 4,608-latent run).

Each measurement runs in its own process so that its peak RSS is its own.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import func, select

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sae.latent_stats import CacheConfig, SaeWindows
    from service.store.models import Run, Sae

HOOKPOINT = "model.layers.6.mlp"


def register_synthetic_run(
    session: "Session", name: str, n_latents: int, seeds: int
) -> tuple["Run", list["Sae"]]:
    """The synthetic run's row and its SAEs: TopK, k 32, d_in 576, at HOOKPOINT."""
    from service.store.runs import register_run, register_sae

    run = register_run(
        session,
        name,
        subject_model="smollm2",
        hookpoint=HOOKPOINT,
        dataset="embedded",
        architecture="topk",
        n_latents=n_latents,
        k=32,
        seeds=list(range(seeds)),
    )
    saes = [
        register_sae(session, run, seed, n_latents=n_latents, d_in=576) for seed in range(seeds)
    ]
    return run, saes


def store_random_matches(
    session: "Session", saes: list["Sae"], n_latents: int, rng: np.random.Generator
) -> None:
    """Every pair of `saes` matched by random permutations, cosines uniform in [0.2, 1)."""
    from service.store.matches import store_match_pair

    for a in range(len(saes)):
        for b in range(a + 1, len(saes)):
            store_match_pair(
                session,
                saes[a],
                saes[b],
                partner_decoder=rng.permutation(n_latents),
                cos_decoder=rng.uniform(0.2, 1.0, n_latents),
                partner_encoder=rng.permutation(n_latents),
                cos_encoder=rng.uniform(0.2, 1.0, n_latents),
                solver="bench",
            )


# SmolLM2's vocabulary: the synthetic windows' token ids are drawn from it.
VOCABULARY = 49_152


def measure_stats(n_latents: int, n_saes: int, tokens: int) -> dict[str, float]:
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


def synthetic_windows(n_latents: int, config: "CacheConfig", seed: int) -> Iterator["SaeWindows"]:
    """One SAE's windows, `BATCH_ROWS` at a time (whole latents per batch), never all."""
    from sae.latent_stats import SaeWindows
    from service.cache.writer import BATCH_ROWS, windows_per_latent

    per_latent = windows_per_latent(config)
    quantiles = config.quantile_bins * config.per_quantile_bin
    kinds = ["top"] * config.n_top + ["quantile"] * quantiles + ["random"] * config.negatives
    bins = [-1] * config.n_top
    bins += [b for b in range(config.quantile_bins) for _ in range(config.per_quantile_bin)]
    bins += [-1] * config.negatives
    ranks = list(range(config.n_top)) + [
        r for _ in range(config.quantile_bins) for r in range(config.per_quantile_bin)
    ]
    ranks += list(range(config.negatives))
    firing = np.array([kind != "random" for kind in kinds])
    rng = np.random.default_rng(seed)
    latents_per_batch = max(BATCH_ROWS // per_latent, 1)
    for first in range(0, n_latents, latents_per_batch):
        count = min(latents_per_batch, n_latents - first)
        rows = count * per_latent
        activations = rng.exponential(1.0, (rows, config.window)).astype(np.float32)
        activations *= rng.random((rows, config.window)) < 0.2
        activations *= np.tile(firing, count)[:, None]
        yield SaeWindows(
            latent=np.repeat(np.arange(first, first + count), per_latent),
            kind=kinds * count,
            quantile_bin=np.tile(bins, count),
            rank=np.tile(ranks, count),
            token_ids=rng.integers(0, VOCABULARY, (rows, config.window), dtype=np.int32),
            activations=activations,
        )


def measure_write(n_latents: int, n_saes: int, backend: str) -> dict[str, float]:
    from sae.latent_stats import CacheConfig
    from sae.subject_model import load_tokenizer
    from service.cache.writer import batch_decoder, windows_per_latent, write_windows
    from service.config import get_settings
    from service.store.engine import open_store, upgrade
    from service.store.runs import latent_ids
    from service.store.windows import complete_cache_version, start_cache_version
    from tests.scratch_postgres import scratch_postgres

    config = CacheConfig()
    decode = batch_decoder(load_tokenizer("smollm2", get_settings().home))
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder, ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{Path(folder) / 'store.db'}"
        else:
            scratch = stack.enter_context(scratch_postgres(prefix="autointerp_bench"))
            url = scratch.render_as_string(hide_password=False)
        upgrade(url)
        store = open_store(url)
        with store.session() as session, session.begin():
            run, saes = register_synthetic_run(session, "bench", n_latents, n_saes)
            ids = [latent_ids(session, sae) for sae in saes]
            version = start_cache_version(session, run.id, config.model_dump(mode="json"))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        rows = 0
        for seed, sae_ids in enumerate(ids):
            windows = synthetic_windows(n_latents, config, seed)
            rows += write_windows(store, version.id, sae_ids, windows, decode)
        with store.session() as session, session.begin():
            complete_cache_version(session, session.merge(version))
        seconds = time.perf_counter() - start
        if backend == "sqlite":
            size = sum(path.stat().st_size for path in Path(folder).glob("store.db*"))
        else:
            with store.read_session() as session:
                query = select(func.pg_database_size(func.current_database()))
                size = int(session.scalar(query) or 0)
        store.dispose()
    assert rows == n_saes * n_latents * windows_per_latent(config)
    return {
        "rows": float(rows),
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes_per_row": size / rows,
    }


def _subprocess(arguments: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.cache", *arguments]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def stats_main(args: argparse.Namespace) -> None:
    rows = [
        _subprocess(
            ["stats", "--latents", str(args.latents), "--saes", str(args.saes), "--one", size]
        )
        for size in args.sizes.split(",")
    ]
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


def write_main(args: argparse.Namespace) -> None:
    sizes = [int(size) for size in args.latents.split(",")]
    print(f"{args.saes} SAEs, default cache config (90 windows of 32 tokens per latent)")
    print(
        f"{'backend':>10} {'latents':>8} {'windows':>10} {'rows/s':>8} {'x smallest':>10} "
        f"{'RSS before':>10} {'peak MiB':>9} {'x smallest':>10} {'bytes/row':>9}"
    )
    for backend in args.backends.split(","):
        results = [
            _subprocess(["write", "--saes", str(args.saes), "--backends", backend, "--one", str(n)])
            for n in sizes
        ]
        base = results[0]
        for n_latents, row in zip(sizes, results, strict=True):
            rate = row["rows"] / row["seconds"]
            base_rate = base["rows"] / base["seconds"]
            print(
                f"{backend:>10} {n_latents:>8,} {row['rows']:>10,.0f} {rate:>8,.0f} "
                f"{rate / base_rate:>10.2f} {row['rss_before_mib']:>10,.0f} "
                f"{row['peak_rss_mib']:>9,.0f} {row['peak_rss_mib'] / base['peak_rss_mib']:>10.2f} "
                f"{row['bytes_per_row']:>9,.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="latent-cache throughput and memory")
    stats.add_argument("--latents", type=int, default=4608)
    stats.add_argument("--saes", type=int, default=2)
    stats.add_argument("--sizes", default="100000,1000000")
    stats.add_argument("--one", type=int, help=argparse.SUPPRESS)
    write = commands.add_parser("write", help="window writing: rows/s and peak memory")
    write.add_argument("--latents", default="4608,32768")
    write.add_argument("--saes", type=int, default=2)
    write.add_argument("--backends", default="sqlite,postgresql")
    write.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "stats" and args.one:
        print(json.dumps(measure_stats(args.latents, args.saes, args.one)))
    elif args.command == "stats":
        stats_main(args)
    elif args.one:
        print(json.dumps(measure_write(args.one, args.saes, args.backends)))
    else:
        write_main(args)


if __name__ == "__main__":
    main()
