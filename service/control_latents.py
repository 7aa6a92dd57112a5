"""Which other latents' explanations a latent is also scored with, read from the store.

The shuffled control: a random other latent of the same SAE. Cross-seed scoring: the latent's
decoder-matched partner in each of the next `n` seeds of its run and hookpoint (the seeds
that follow its own, in seed order, wrapping around). A latent without an activating window
is never a control (there is nothing to explain it from), and a seed whose matching is not
stored, or where the latent has no partner, is skipped: a missing control is not a failure.
"""

from __future__ import annotations

import random

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.store.models import Example, Latent, Match, MatchPair, Sae

# Draws of a random other latent before the control gives up (dead latents have no windows).
CONTROL_DRAWS = 20


def _fires(session: Session, latent_id: int) -> bool:
    """Whether the latent has an activating top window to be explained from."""
    firing = session.scalar(
        select(Example.id)
        .where(Example.latent_id == latent_id, Example.kind == "top", Example.max_activation > 0)
        .limit(1)
    )
    return firing is not None


def control_latent(session: Session, latent_id: int, seed: int) -> int | None:
    """A random other latent of the same SAE that has an activating window, drawn
    deterministically from `seed`; None when CONTROL_DRAWS draws find none."""
    sae_id, n_latents = session.execute(
        select(Latent.sae_id, Sae.n_latents)
        .join(Sae, Sae.id == Latent.sae_id)
        .where(Latent.id == latent_id)
    ).one()
    rng = random.Random(seed)
    for _ in range(CONTROL_DRAWS if n_latents > 1 else 0):
        other = session.scalar(
            select(Latent.id).where(
                Latent.sae_id == sae_id, Latent.index == rng.randrange(n_latents)
            )
        )
        if other is None or other == latent_id:
            continue
        if _fires(session, other):
            return int(other)
    return None


def decoder_partner(session: Session, sae_id: int, other_sae_id: int, index: int) -> int | None:
    """The index of latent `index` of SAE `sae_id`'s decoder-matched partner in SAE
    `other_sae_id`; None when no matching of the two is stored or the latent is unmatched.
    A pair stored only as other-into-this is read backwards (an assignment is one-to-one)."""
    forward = session.scalar(
        select(MatchPair.id).where(MatchPair.sae_a_id == sae_id, MatchPair.sae_b_id == other_sae_id)
    )
    if forward is not None:
        partner = session.scalar(
            select(Match.partner_decoder).where(
                Match.pair_id == forward, Match.latent_index_a == index
            )
        )
    else:
        backward = session.scalar(
            select(MatchPair.id).where(
                MatchPair.sae_a_id == other_sae_id, MatchPair.sae_b_id == sae_id
            )
        )
        if backward is None:
            return None
        partner = session.scalar(
            select(Match.latent_index_a)
            .where(Match.pair_id == backward, Match.partner_decoder == index)
            .limit(1)
        )
    return None if partner is None or partner < 0 else int(partner)


def cross_seed_partners(session: Session, latent_id: int, n_seeds: int) -> list[int]:
    """Latent ids of the latent's decoder-matched partners in the `n_seeds` seeds that follow
    its own (other SAEs of its run and hookpoint, in seed order, wrapping around), in that
    order; a seed without a stored matching, an unmatched latent or a partner without an
    activating window gives none."""
    if n_seeds <= 0:
        return []
    sae_id, index, run_id, hookpoint, own_seed = session.execute(
        select(Latent.sae_id, Latent.index, Sae.run_id, Sae.hookpoint, Sae.seed)
        .join(Sae, Sae.id == Latent.sae_id)
        .where(Latent.id == latent_id)
    ).one()
    others = session.execute(
        select(Sae.id, Sae.seed)
        .where(Sae.run_id == run_id, Sae.hookpoint == hookpoint, Sae.id != sae_id)
        .order_by(Sae.seed, Sae.id)
    ).all()
    following = [row for row in others if row.seed > own_seed] + [
        row for row in others if row.seed <= own_seed
    ]
    partners = []
    for other_sae_id, _ in following[:n_seeds]:
        partner_index = decoder_partner(session, sae_id, other_sae_id, index)
        if partner_index is None:
            continue
        partner = session.scalar(
            select(Latent.id).where(Latent.sae_id == other_sae_id, Latent.index == partner_index)
        )
        if partner is not None and _fires(session, partner):
            partners.append(int(partner))
    return partners
