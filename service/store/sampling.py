"""Choosing which latents of a run to queue: all, a seeded random sample, or a stratified
sample with equal numbers of shared and seed-specific latents.

A latent counts as shared when, in some stored matching where its SAE is SAE A, it passed
the shared test (decoder and encoder cosines above threshold); it is seed-specific when it
was matched against at least one other SAE and passed in none. Latents known to be dead (a
firing count of zero) are never queued: there is nothing to explain.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Integer, func, or_, select
from sqlalchemy.orm import Session

from sae.errors import UserError
from service.config import QueueConfig
from service.store.campaigns import describe
from service.store.engine import Store
from service.store.models import Campaign, Latent, Match, MatchPair, Run, Sae
from service.store.queue import DEFAULT_MAX_ATTEMPTS, enqueue
from service.store.runs import get_run


@dataclass
class QueuedLatents:
    """What `queue_run` did: how many latents it chose, how many jobs were new."""

    run: str
    stage: str
    campaign_id: int
    campaign: str
    selected: int
    inserted: int
    shared: int | None = None
    seed_specific: int | None = None


def _alive() -> ColumnElement[bool]:
    return or_(Latent.firing_count.is_(None), Latent.firing_count > 0)


def run_latents(session: Session, run: Run) -> list[int]:
    """Ids of the run's latents that are not known to be dead, in a fixed order."""
    return list(
        session.scalars(
            select(Latent.id)
            .join(Sae, Sae.id == Latent.sae_id)
            .where(Sae.run_id == run.id, _alive())
            .order_by(Latent.id)
        )
    )


def shared_and_specific(session: Session, run: Run) -> tuple[list[int], list[int]]:
    """The run's live latents split into (shared, seed-specific) by the stored matchings."""
    rows = session.execute(
        select(Latent.id, func.max(Match.shared.cast(Integer)))
        .join(Sae, Sae.id == Latent.sae_id)
        .join(MatchPair, MatchPair.sae_a_id == Latent.sae_id)
        .join(Match, (Match.pair_id == MatchPair.id) & (Match.latent_index_a == Latent.index))
        .where(Sae.run_id == run.id, _alive())
        .group_by(Latent.id)
        .order_by(Latent.id)
    ).all()
    shared = [row[0] for row in rows if row[1]]
    specific = [row[0] for row in rows if not row[1]]
    return shared, specific


def _sample(ids: list[int], n: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(ids, min(n, len(ids))))


def queue_run(
    store: Store,
    run_name: str,
    campaign: Callable[[Session], Campaign],
    selection: QueueConfig | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> QueuedLatents:
    """Queue `selection.stage` jobs in the campaign `campaign(session)` finds or creates, for
    the latents of `run_name` that `selection` chooses, in one transaction.

    "all" live latents; "sample" `latents` of them at random; "stratified" `latents` shared
    and as many seed-specific ones (fewer of both if either group is smaller, so the two stay
    equal). The same seed chooses the same latents.
    """
    selection = selection or QueueConfig()
    stage, n, seed = selection.stage, selection.latents, selection.seed
    if selection.selection != "all" and n is None:
        raise UserError(
            f"selection {selection.selection} needs a number of latents: pass --latents N"
        )
    rng = random.Random(seed)
    with store.session() as session, session.begin():
        run = get_run(session, run_name)
        chosen_campaign = campaign(session)
        result = QueuedLatents(
            run=run.name,
            stage=stage,
            campaign_id=chosen_campaign.id,
            campaign=describe(chosen_campaign),
            selected=0,
            inserted=0,
        )
        if selection.selection == "stratified":
            assert n is not None
            shared, specific = shared_and_specific(session, run)
            if not shared and not specific:
                raise UserError(
                    f"run {run.name!r} has no stored matches to stratify by; match its SAEs "
                    "first, or use --selection all or sample"
                )
            per_group = min(n, len(shared), len(specific))
            if per_group == 0:
                empty = "shared" if not shared else "seed-specific"
                raise UserError(
                    f"run {run.name!r} has no {empty} latents to stratify with; use "
                    "--selection sample"
                )
            chosen_shared = _sample(shared, per_group, rng)
            chosen_specific = _sample(specific, per_group, rng)
            chosen = chosen_shared + chosen_specific
            result.shared, result.seed_specific = len(chosen_shared), len(chosen_specific)
        else:
            latents = run_latents(session, run)
            if not latents:
                raise UserError(f"run {run.name!r} has no live latents to queue")
            chosen = latents if selection.selection == "all" else _sample(latents, n or 0, rng)
        result.selected = len(chosen)
        result.inserted = enqueue(session, chosen, stage, chosen_campaign.id, max_attempts)
    return result
