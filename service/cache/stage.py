"""The `cache` stage: one model pass over a run's dataset with all its SAEs attached, then
firing statistics and example windows for every latent written to the store at once."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from sae.architectures.base import encode
from sae.checkpoint import load_sae
from sae.data import load_chunks
from sae.errors import UserError
from sae.latent_stats import CacheConfig, SaeLatentStats, collect_latent_stats
from sae.subject_model import capture_activations, load_model
from service.progress import token_progress
from service.store.engine import Store
from service.store.models import Example, Latent, Sae
from service.store.runs import get_run, latent_ids, store_latent_stats
from service.store.windows import encode_window

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
    run: str
    n_tokens: int
    tokens_asked: int
    saes: list[SaeCacheSummary]


def cache_run(
    store: Store,
    run_name: str,
    home: Path,
    config: CacheConfig,
    show_progress: bool = True,
) -> CacheSummary:
    """Cache latent statistics and windows for every SAE of the run, resumably."""
    with store.read_session() as session:
        run = get_run(session, run_name)
        saes = list(session.scalars(select(Sae).where(Sae.run_id == run.id).order_by(Sae.seed)))
        model_name, dataset, run_path = run.subject_model, run.dataset, run.path
    if not saes:
        raise UserError(f"run {run_name!r} has no trained SAEs: run `autointerp train` first")
    if config.window > config.chunk_len:
        raise UserError(
            f"window of {config.window} tokens is longer than the chunk length "
            f"{config.chunk_len}: "
            "use a shorter --window or a longer --chunk-len"
        )
    hookpoints = {sae.hookpoint for sae in saes}
    weights = [load_sae(Path(str(sae.path))) for sae in saes]
    model, tokenizer = load_model(model_name, home)
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
        with token_progress(f"caching {hookpoint}", show=show_progress) as update:
            stats = collect_latent_stats(
                partial(_hookpoint_activations, model, hookpoint),
                encoders,
                [saes[i].n_latents for i in members],
                chunks,
                config,
                state_path=work_dir / f"latent-cache-{state_key}-{hookpoint}.pt",
                on_progress=update,
            )
        results.update(zip(members, stats, strict=True))
    summaries = _write(store, saes, [results[i] for i in range(len(saes))], tokenizer)
    for state_path in work_dir.glob(f"latent-cache-{state_key}-*.pt"):
        state_path.unlink()
    # The config it ran with, and the tokens the dataset really gave.
    resolved = {**config.model_dump(), "tokens_read": int(chunks.numel())}
    (work_dir / "cache_config.json").write_text(json.dumps(resolved, indent=2))
    return CacheSummary(run_name, int(chunks.numel()), config.tokens, summaries)


def _hookpoint_activations(
    model: torch.nn.Module, hookpoint: str, batch: torch.Tensor
) -> torch.Tensor:
    return capture_activations(model, batch, [hookpoint])[hookpoint]


def _state_key(saes: list[Sae], chunks: torch.Tensor, config: CacheConfig) -> str:
    """A resume file is only valid for the same SAEs, data and settings."""
    key = json.dumps([[s.id for s in saes], list(chunks.shape), config.model_dump()])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _write(
    store: Store, saes: list[Sae], results: list[SaeLatentStats], tokenizer: object
) -> list[SaeCacheSummary]:
    """Replace every SAE's statistics and examples in one transaction."""
    summaries = []
    with store.session() as session:
        for sae_row, stats in zip(saes, results, strict=True):
            sae = session.get(Sae, sae_row.id)
            assert sae is not None
            store_latent_stats(
                session, sae, stats.firing_count, stats.n_tokens, stats.max_activation
            )
            n_examples = _write_examples(session, sae, stats, tokenizer)
            frequency = stats.firing_frequency
            summaries.append(
                SaeCacheSummary(
                    seed=sae.seed,
                    n_latents=sae.n_latents,
                    n_tokens=stats.n_tokens,
                    dead=int((stats.firing_count == 0).sum()),
                    dense=int((frequency > DENSE_FREQUENCY).sum()),
                    n_examples=n_examples,
                )
            )
        session.commit()
    return summaries


def _write_examples(session: Session, sae: Sae, stats: SaeLatentStats, tokenizer: object) -> int:
    ids = latent_ids(session, sae)
    session.execute(
        delete(Example).where(
            Example.latent_id.in_(select(Latent.id).where(Latent.sae_id == sae.id))
        )
    )
    examples = stats.examples
    decode = getattr(tokenizer, "decode")  # noqa: B009 - tokenizers are untyped here
    rows = []
    for row in range(len(examples.kind)):
        token_bytes, activation_bytes = encode_window(
            examples.token_ids[row], examples.activations[row]
        )
        rows.append(
            {
                "latent_id": int(ids[examples.latent[row]]),
                "kind": examples.kind[row],
                "quantile_bin": int(examples.quantile_bin[row])
                if examples.quantile_bin[row] >= 0
                else None,
                "rank": int(examples.rank[row]),
                "token_ids": token_bytes,
                "activations": activation_bytes,
                "max_activation": float(np.max(examples.activations[row])),
                "text": str(decode(examples.token_ids[row].tolist())),
            }
        )
    for start in range(0, len(rows), 5000):
        session.execute(insert(Example), rows[start : start + 5000])
    return len(rows)
