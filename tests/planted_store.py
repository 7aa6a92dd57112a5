"""Planted latents' windows (`service.scoring.planted`) written to a store as `example`
rows, for the tests that queue and score them."""

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from service.config import LLMConfig, ScoreConfig
from service.scoring.campaign import open_campaign
from service.scoring.planted import RULES, PlantedWindow, plant
from service.store.engine import Store
from service.store.models import Example
from service.store.queue import DEFAULT_MAX_ATTEMPTS, enqueue
from service.store.runs import latent_ids, register_run, register_sae
from service.store.windows import encode_window, version_for_added_windows

# A score job no LLM takes part in: the token baseline explains from activation statistics,
# the embedding scorer ranks held-out windows with MiniLM on the CPU.
LLM_FREE_JOB = ScoreConfig(
    explainers=["token_baseline"],
    scorers=["embedding"],
    shuffled_control=False,
    cross_seed=0,
    n_explain_top=4,
    n_explain_quantile=2,
    n_positive=3,
    n_negative=3,
).model_dump(mode="json")


def plant_small(rule: str, windows: Any, tokenizer: Any, seed: int = 0) -> list[PlantedWindow]:
    """20 windows of a latent firing by `rule`: 8 top, 2 x 2 quantile, 8 silent; enough for
    `LLM_FREE_JOB`."""
    return plant(
        RULES[rule],
        windows,
        tokenizer,
        n_top=8,
        n_quantiles=2,
        per_quantile=2,
        n_random=8,
        seed=seed,
    )


def add_planted_windows(session: Session, latent_id: int, windows: Iterable[Any]) -> None:
    """One `example` row per planted window of latent `latent_id`, in its run's newest cache
    version (a new one, config unknown, if it has none)."""
    version_id = version_for_added_windows(session, latent_id)
    for window in windows:
        token_bytes, activation_bytes = encode_window(window.token_ids, window.activations)
        session.add(
            Example(
                latent_id=latent_id,
                cache_version_id=version_id,
                kind=window.kind,
                quantile_bin=window.quantile_bin,
                rank=window.rank,
                token_ids=token_bytes,
                activations=activation_bytes,
                max_activation=max(window.activations),
            )
        )


def one_sae_run(session: Session, n_latents: int, name: str = "r") -> list[int]:
    """A run with one SAE (seed 0, SmolLM2's layer 6 MLP, no weights); its latent ids in index
    order."""
    run = register_run(
        session,
        name,
        subject_model="smollm2",
        hookpoint="model.layers.6.mlp",
        dataset="embedded",
        architecture="topk",
        n_latents=n_latents,
        k=8,
        seeds=[0],
    )
    sae = register_sae(session, run, 0, n_latents=n_latents, d_in=576)
    return [int(latent_id) for latent_id in latent_ids(session, sae)]


def store_planted_run(store: Store, tokenizer: Any, windows: Any, rules: list[str]) -> list[int]:
    """A run "planted" with one SAE whose latent i fires by `rules[i]` (windows planted with
    seed i), its example windows in the store; returns the latent ids in index order."""
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "planted",
            subject_model="smollm2",
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=len(rules),
            k=8,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=len(rules), d_in=576)
        ids = [int(latent_id) for latent_id in latent_ids(session, sae)]
        for index, (latent_id, rule) in enumerate(zip(ids, rules, strict=True)):
            planted = plant(RULES[rule], windows, tokenizer, seed=index)
            add_planted_windows(session, latent_id, planted)
    return ids


def queue_jobs(
    session: Session,
    latents: Iterable[int],
    stage: str,
    job: ScoreConfig | dict[str, Any],
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    llm: LLMConfig | None = None,
) -> int:
    """Queue `stage` for the latents in the campaign of `job` and `llm` (default: the default
    LLM); returns how many jobs were new."""
    config = job if isinstance(job, ScoreConfig) else ScoreConfig.model_validate(job)
    campaign = open_campaign(session, config, llm or LLMConfig())
    return enqueue(session, latents, stage, campaign.id, max_attempts)
