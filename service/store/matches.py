"""Matchings between the SAEs of a run in the store: solving and recording every pair of
seeds (`record_matching`), storing one pair (`store_match_pair`), and reading one back in
either direction (`read_pair`, the one reader every stage uses).

A pair is stored as SAE A's latents matched into SAE B. `record_matching` stores both
directions, but a store may hold only one (an older run, or a pair stored by hand); reading
B into A from A into B inverts the assignment (`sae.matching.invert_assignment`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, delete, func, insert, or_, select
from sqlalchemy.orm import Session

from sae.checkpoint import load_sae
from sae.matching import MatchConfig, PairMatch, invert_assignment
from sae.matching.multiseed import MATCHES_FOLDER, match_pair
from sae.matching.solvers import Progress
from service.store.engine import Store
from service.store.models import Match, MatchPair, Sae
from service.store.runs import get_run, run_saes


@dataclass
class StoredPair:
    """SAE A's latents (all, or those asked for) matched into SAE B: each latent's decoder and
    encoder partner in B (-1: unmatched) and their cosines (NaN: unmatched). `derived`: read
    backwards from the B-into-A matching."""

    threshold: float
    indices: np.ndarray
    partner_decoder: np.ndarray
    cos_decoder: np.ndarray
    partner_encoder: np.ndarray
    cos_encoder: np.ndarray
    derived: bool = False

    @property
    def shared(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (self.cos_decoder > self.threshold) & (self.cos_encoder > self.threshold)

    @property
    def decoder_only(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.cos_decoder > self.threshold

    @property
    def agree(self) -> np.ndarray:
        return (self.partner_decoder == self.partner_encoder) & (self.partner_decoder >= 0)


def _pair_row(session: Session, sae_a_id: int, sae_b_id: int) -> MatchPair | None:
    return session.scalars(
        select(MatchPair).where(MatchPair.sae_a_id == sae_a_id, MatchPair.sae_b_id == sae_b_id)
    ).one_or_none()


def _match_arrays(
    session: Session, pair: MatchPair, n_a: int, condition: ColumnElement[bool] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Partners and cosines over all n_a latents of the pair's SAE A, from its stored rows
    (those meeting `condition`); -1 and NaN where no row or no partner."""
    partner_decoder = np.full(n_a, -1, dtype=np.int64)
    partner_encoder = np.full(n_a, -1, dtype=np.int64)
    cos_decoder = np.full(n_a, np.nan)
    cos_encoder = np.full(n_a, np.nan)
    query = select(
        Match.latent_index_a,
        Match.partner_decoder,
        Match.cos_decoder,
        Match.partner_encoder,
        Match.cos_encoder,
    ).where(Match.pair_id == pair.id)
    if condition is not None:
        query = query.where(condition)
    for index, p_decoder, c_decoder, p_encoder, c_encoder in session.execute(query):
        partner_decoder[index] = p_decoder
        partner_encoder[index] = p_encoder
        if p_decoder >= 0 and c_decoder is not None:
            cos_decoder[index] = c_decoder
        if p_encoder >= 0 and c_encoder is not None:
            cos_encoder[index] = c_encoder
    return partner_decoder, cos_decoder, partner_encoder, cos_encoder


def read_pair(
    session: Session, sae_a: Sae, sae_b: Sae, indices: Sequence[int] | None = None
) -> StoredPair | None:
    """SAE A's latents matched into SAE B, from the stored A-into-B matching or, when only
    B-into-A is stored, read backwards from it; None when neither is stored. With `indices`
    only those latents of A are read (and returned, in that order)."""
    wanted = np.arange(sae_a.n_latents) if indices is None else np.asarray(indices, np.int64)
    forward = _pair_row(session, sae_a.id, sae_b.id)
    if forward is not None:
        condition: ColumnElement[bool] | None = (
            None if indices is None else Match.latent_index_a.in_(wanted.tolist())
        )
        arrays = _match_arrays(session, forward, sae_a.n_latents, condition)
        threshold, derived = forward.threshold, False
    else:
        backward = _pair_row(session, sae_b.id, sae_a.id)
        if backward is None:
            return None
        condition = (
            None
            if indices is None
            else or_(
                Match.partner_decoder.in_(wanted.tolist()),
                Match.partner_encoder.in_(wanted.tolist()),
            )
        )
        b_decoder, b_cos_decoder, b_encoder, b_cos_encoder = _match_arrays(
            session, backward, sae_b.n_latents, condition
        )
        partner_decoder, cos_decoder = invert_assignment(b_decoder, b_cos_decoder, sae_a.n_latents)
        partner_encoder, cos_encoder = invert_assignment(b_encoder, b_cos_encoder, sae_a.n_latents)
        arrays = (partner_decoder, cos_decoder, partner_encoder, cos_encoder)
        threshold, derived = backward.threshold, True
    decoder, cos_decoder, encoder, cos_encoder = (array[wanted] for array in arrays)
    return StoredPair(threshold, wanted, decoder, cos_decoder, encoder, cos_encoder, derived)


def matching_recorded(store: Store, run_name: str) -> bool:
    """True when every ordered pair of same-hookpoint SAEs of the run has a stored matching."""
    expected = sum(len(s) * (len(s) - 1) for s in run_saes(store, run_name).values())
    with store.read_session() as session:
        run = get_run(session, run_name)
        stored = session.scalar(
            select(func.count())
            .select_from(MatchPair)
            .join(Sae, Sae.id == MatchPair.sae_a_id)
            .where(Sae.run_id == run.id)
        )
    return expected > 0 and stored == expected


def record_matching(
    store: Store, run_name: str, config: MatchConfig, progress: Progress | None = None
) -> dict[str, dict[tuple[int, int], PairMatch]]:
    """Match every pair of seeds at each hookpoint of the run and store both directions.

    Each pair is committed as soon as it is solved, and its assignments are kept beside the
    checkpoints (`sae.matching.multiseed.match_pair`), so an interrupted run resumes at the
    pair it was solving and `autointerp match --all` on the same folder reuses what was
    solved here."""
    matches: dict[str, dict[tuple[int, int], PairMatch]] = {}
    for hookpoint, saes in run_saes(store, run_name).items():
        paths = {seed: Path(str(sae.path)) for seed, sae in saes.items()}
        weights = {seed: load_sae(path) for seed, path in paths.items()}
        finished = next(iter(paths.values())).parent / MATCHES_FOLDER
        pairs: dict[tuple[int, int], PairMatch] = {}
        for a, b in itertools.combinations(sorted(saes), 2):
            match = match_pair(weights, a, b, config, progress, finished)
            with store.session() as session:
                for (x, y), direction in (((a, b), match), ((b, a), match.reversed())):
                    store_match_pair(
                        session,
                        saes[x],
                        saes[y],
                        partner_decoder=direction.decoder.partner,
                        cos_decoder=direction.decoder.cosine,
                        partner_encoder=direction.encoder.partner,
                        cos_encoder=direction.encoder.cosine,
                        solver=direction.summary.solver,
                        threshold=config.threshold,
                        seconds=direction.summary.seconds,
                    )
                    pairs[(x, y)] = direction
                session.commit()
        matches[hookpoint] = pairs
    return matches


def store_match_pair(
    session: Session,
    sae_a: Sae,
    sae_b: Sae,
    *,
    partner_decoder: npt.ArrayLike,
    cos_decoder: npt.ArrayLike,
    partner_encoder: npt.ArrayLike,
    cos_encoder: npt.ArrayLike,
    solver: str,
    threshold: float = 0.7,
    seconds: float | None = None,
) -> MatchPair:
    """Store (replacing any earlier one) the matching of SAE A's latents onto SAE B's.

    Arrays are per latent of A: its partner in B and their cosine, under the decoder matching
    and under the encoder matching. A latent is shared when both cosines exceed `threshold`
    (strictly); `agree` says both matchings chose the same partner.
    """
    partner_dec = np.asarray(partner_decoder, dtype=np.int64)
    partner_enc = np.asarray(partner_encoder, dtype=np.int64)
    cos_dec = np.asarray(cos_decoder, dtype=np.float64)
    cos_enc = np.asarray(cos_encoder, dtype=np.float64)
    n = sae_a.n_latents
    if any(array.shape != (n,) for array in (partner_dec, partner_enc, cos_dec, cos_enc)):
        raise ValueError(f"expected one partner and cosine per latent of SAE A ({n})")
    with np.errstate(invalid="ignore"):  # NaN, unmatched, is never above the threshold
        decoder_only = cos_dec > threshold
        shared = decoder_only & (cos_enc > threshold)
    # An unmatched latent (partner -1 under both) has no partner to agree on.
    agree = (partner_dec == partner_enc) & (partner_dec >= 0)
    summary = {
        "solver": solver,
        "threshold": threshold,
        "n_latents": n,
        "shared_fraction": float(shared.mean()),
        "shared_fraction_decoder_only": float(decoder_only.mean()),
        "encoder_decoder_agreement": float(agree.mean()),
        "mean_cos_decoder": _finite_mean(cos_dec),
        "mean_cos_encoder": _finite_mean(cos_enc),
        "seconds": seconds,
    }
    pair = session.scalars(
        select(MatchPair).where(MatchPair.sae_a_id == sae_a.id, MatchPair.sae_b_id == sae_b.id)
    ).one_or_none()
    if pair is None:
        pair = MatchPair(sae_a_id=sae_a.id, sae_b_id=sae_b.id, **summary)
        session.add(pair)
    else:
        for key, value in summary.items():
            setattr(pair, key, value)
        session.execute(delete(Match).where(Match.pair_id == pair.id))
    session.flush()
    session.execute(
        insert(Match),
        [
            {
                "pair_id": pair.id,
                "latent_index_a": index,
                "partner_decoder": int(partner_dec[index]),
                "cos_decoder": _finite_or_none(cos_dec[index]),
                "partner_encoder": int(partner_enc[index]),
                "cos_encoder": _finite_or_none(cos_enc[index]),
                "shared": bool(shared[index]),
                "agree": bool(agree[index]),
            }
            for index in range(n)
        ],
    )
    return pair


def _finite_or_none(value: float) -> float | None:
    """NaN (an unmatched latent's cosine) is stored as NULL: SQLite cannot keep a NaN."""
    return float(value) if np.isfinite(value) else None


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
