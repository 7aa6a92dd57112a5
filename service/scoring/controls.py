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

from service.store.matches import read_pair
from service.store.models import Example, Latent, Sae
from service.store.windows import latent_windows

# Draws of a random other latent before the control gives up (dead latents have no windows).
CONTROL_DRAWS = 20


def _fires(session: Session, latent_id: int) -> bool:
    """Whether the latent has an activating top window to be explained from."""
    firing = session.scalar(
        latent_windows(latent_id)
        .with_only_columns(Example.id)
        .where(Example.kind == "top", Example.max_activation > 0)
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


def cross_seed_partners(session: Session, latent_id: int, n_seeds: int) -> list[int]:
    """Latent ids of the latent's decoder-matched partners in the `n_seeds` seeds that follow
    its own (other SAEs of its run and hookpoint, in seed order, wrapping around), in that
    order; a seed without a stored matching, an unmatched latent or a partner without an
    activating window gives none."""
    if n_seeds <= 0:
        return []
    latent = session.get(Latent, latent_id)
    assert latent is not None
    sae = session.get(Sae, latent.sae_id)
    assert sae is not None
    others = session.scalars(
        select(Sae)
        .where(Sae.run_id == sae.run_id, Sae.hookpoint == sae.hookpoint, Sae.id != sae.id)
        .order_by(Sae.seed, Sae.id)
    ).all()
    following = [other for other in others if other.seed > sae.seed] + [
        other for other in others if other.seed <= sae.seed
    ]
    partners = []
    for other in following[:n_seeds]:
        pair = read_pair(session, sae, other, [latent.index])
        if pair is None or pair.partner_decoder[0] < 0:
            continue
        partner = session.scalar(
            select(Latent.id).where(
                Latent.sae_id == other.id, Latent.index == int(pair.partner_decoder[0])
            )
        )
        if partner is not None and _fires(session, partner):
            partners.append(int(partner))
    return partners
