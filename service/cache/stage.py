"""The `cache` stage: one model pass over a run's dataset with all its SAEs attached, then
firing statistics and example windows for every latent written to the store as a new cache
version of the run (see `service.store.windows`), in bounded batches. Under torchrun each
process reads its share of the batches and the main process merges and writes."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from sqlalchemy import select

from sae.architectures.base import encode
from sae.checkpoint import load_sae
from sae.data import load_chunks
from sae.distributed import process_device, process_group
from sae.errors import UserError
from sae.latent_stats import CacheConfig, SaeLatentStats, collect_latent_stats
from sae.subject_model import capture_activations, load_model
from service.cache.writer import (
    BATCH_ROWS,
    batch_decoder,
    check_free_disk,
    estimated_bytes,
    human_bytes,
    windows_per_latent,
    write_windows,
)
from service.progress import token_progress
from service.store.engine import Store
from service.store.models import CacheVersion, Sae
from service.store.runs import get_run, latent_ids, store_latent_stats
from service.store.windows import (
    cache_config_hash,
    complete_cache_version,
    count_windows,
    delete_sae_windows,
    find_cache_version,
    latest_cache_version,
    start_cache_version,
)

DENSE_FREQUENCY = 0.1


@dataclass(frozen=True)
class SaeCacheSummary:
    seed: int
    n_latents: int
    n_tokens: int
    dead: int
    dense: int
    n_examples: int


@dataclass(frozen=True)
class CacheSummary:
    """What `cache_run` did. `written` False: a complete version of the same config was
    already stored (`version`), nothing was read or written and `n_tokens` is None."""

    run: str
    n_tokens: int | None
    tokens_asked: int
    saes: list[SaeCacheSummary]
    version: int
    newest_version: int

    @property
    def written(self) -> bool:
        return self.n_tokens is not None


def cache_run(
    store: Store,
    run_name: str,
    home: Path,
    config: CacheConfig,
    show_progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> CacheSummary:
    """Cache latent statistics and windows for every SAE of the run as a new cache version,
    resumably; a no-op when a complete version of the same config exists. Under torchrun,
    only the main process writes (and announces); the others return with `saes` empty.

    `announce` receives one line before the windows are written: their number, estimated
    size and the room the store has."""
    resolved = config.model_dump(mode="json")
    with store.read_session() as session:
        run = get_run(session, run_name)
        saes = list(session.scalars(select(Sae).where(Sae.run_id == run.id).order_by(Sae.seed)))
        model_name, dataset, run_path, run_id = run.subject_model, run.dataset, run.path, run.id
        existing = find_cache_version(session, run_id, cache_config_hash(resolved))
        newest = latest_cache_version(session, run_id)
    if not saes:
        raise UserError(f"run {run_name!r} has no trained SAEs: run `autointerp train` first")
    if config.window > config.chunk_len:
        raise UserError(
            f"window of {config.window} tokens is longer than the chunk length "
            f"{config.chunk_len}: "
            "use a shorter --window or a longer --chunk-len"
        )
    if existing is not None and existing.completed_at is not None:
        assert newest is not None
        return CacheSummary(run_name, None, config.tokens, [], existing.version, newest.version)
    group = process_group()
    n_windows = sum(sae.n_latents for sae in saes) * windows_per_latent(config)
    room = check_free_disk(store, estimated_bytes(n_windows, config.window))
    if existing is None and group.is_main:
        with store.session() as session:
            existing = start_cache_version(session, run_id, resolved)
            session.commit()
    group.barrier()
    if existing is None:
        # Another process's: the main one started it.
        with store.read_session() as session:
            existing = find_cache_version(session, run_id, cache_config_hash(resolved))
        assert existing is not None
    version = existing
    if announce is not None and group.is_main:
        announce(
            f"cache version {version.version} of run {run_name}: up to {n_windows:,} windows, "
            f"about {human_bytes(estimated_bytes(n_windows, config.window))} ({room})"
        )
    hookpoints = {sae.hookpoint for sae in saes}
    # A GPU when torch sees one (each process its own under torchrun), else the CPU.
    device = process_device("auto")
    weights = [load_sae(Path(str(sae.path))).to(device) for sae in saes]
    model, tokenizer = load_model(model_name, home, device=device, hookpoints=sorted(hookpoints))
    chunks = load_chunks(dataset, tokenizer, config.chunk_len, max_tokens=config.tokens)
    work_dir = Path(run_path) if run_path else home / "runs" / run_name
    work_dir.mkdir(parents=True, exist_ok=True)
    state_key = _state_key(saes, chunks, config)

    results: dict[int, SaeLatentStats] = {}
    # SAEs of one hookpoint share one pass; a run normally has exactly one hookpoint.
    for hookpoint in sorted(hookpoints):
        members = [i for i, sae in enumerate(saes) if sae.hookpoint == hookpoint]
        encoders: list[Callable[[torch.Tensor], torch.Tensor]] = [
            partial(encode, weights[i]) for i in members
        ]
        show = show_progress and group.is_main
        with token_progress(f"caching {hookpoint}", show=show) as update:
            stats = collect_latent_stats(
                partial(_hookpoint_activations, model, hookpoint),
                encoders,
                [saes[i].n_latents for i in members],
                chunks,
                config,
                state_path=work_dir / f"latent-cache-{state_key}-{hookpoint}.pt",
                on_progress=update,
                group=group,
                device=device,
            )
        if group.is_main:  # the others' statistics were folded into the main one's
            results.update(zip(members, stats, strict=True))
    if not group.is_main:
        n_tokens = int(chunks.numel())
        return CacheSummary(run_name, n_tokens, config.tokens, [], version.version, version.version)
    ordered = [results[i] for i in range(len(saes))]
    summaries = _write(store, version, saes, ordered, tokenizer, show_progress)
    for state_path in work_dir.glob(f"latent-cache-{state_key}-*.pt"):
        state_path.unlink()
    # The config it ran with, and the tokens the dataset really gave.
    (work_dir / "cache_config.json").write_text(
        json.dumps({**resolved, "tokens_read": int(chunks.numel())}, indent=2)
    )
    return CacheSummary(
        run_name, int(chunks.numel()), config.tokens, summaries, version.version, version.version
    )


def _hookpoint_activations(
    model: torch.nn.Module, hookpoint: str, batch: torch.Tensor
) -> torch.Tensor:
    return capture_activations(model, batch, [hookpoint])[hookpoint]


def _state_key(saes: list[Sae], chunks: torch.Tensor, config: CacheConfig) -> str:
    """A resume file is only valid for the same SAEs, data and settings."""
    key = json.dumps([[s.id for s in saes], list(chunks.shape), config.model_dump()])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _write(
    store: Store,
    version: CacheVersion,
    saes: list[Sae],
    results: list[SaeLatentStats],
    tokenizer: object,
    show_progress: bool,
) -> list[SaeCacheSummary]:
    """Write each SAE's windows into the version in committed batches, then the latents'
    statistics and the version's completion in one transaction. An SAE whose windows a
    former, interrupted call wrote completely is kept; one it left half written is redone."""
    decode = batch_decoder(tokenizer)
    total = sum(len(stats.examples) for stats in results)
    with token_progress("writing windows", unit="windows", show=show_progress) as update:
        done = 0

        def advance(rows: int) -> None:
            nonlocal done
            done += rows
            update(done, total)

        advance(0)
        for sae_row, stats in zip(saes, results, strict=True):
            expected = len(stats.examples)
            with store.session() as session:
                stored = count_windows(session, version.id, sae_row.id)
                if stored not in (0, expected):
                    delete_sae_windows(session, version.id, sae_row.id)
                    session.commit()
                ids = latent_ids(session, sae_row)
            if stored == expected:
                advance(expected)
            else:
                batches = stats.examples.batches(BATCH_ROWS)
                write_windows(store, version.id, ids, batches, decode, on_rows=advance)
    summaries = []
    with store.session() as session:
        for sae_row, stats in zip(saes, results, strict=True):
            sae = session.get(Sae, sae_row.id)
            assert sae is not None
            store_latent_stats(
                session, sae, stats.firing_count, stats.n_tokens, stats.max_activation
            )
            frequency = stats.firing_frequency
            summaries.append(
                SaeCacheSummary(
                    seed=sae.seed,
                    n_latents=sae.n_latents,
                    n_tokens=stats.n_tokens,
                    dead=int((stats.firing_count == 0).sum()),
                    dense=int((frequency > DENSE_FREQUENCY).sum()),
                    n_examples=len(stats.examples),
                )
            )
        complete_cache_version(session, session.merge(version))
        session.commit()
    return summaries
