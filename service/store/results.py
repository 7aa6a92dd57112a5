"""Writing what the study learns into the store: runs, SAEs and their latents, latent firing
statistics, matchings between SAEs, and compact example windows.

These are the entry points other stages call (training registers runs and SAEs, matching
stores pairs, the latent cache stores statistics and windows). Free of torch: arrays come in
as anything numpy can read. Each works in the caller's session; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from sae.errors import UserError
from service.store.models import Latent, Match, MatchPair, Run, Sae

LATENT_CHUNK = 5000


def get_run(session: Session, name: str) -> Run:
    """The run called `name`, or a UserError that says how to list the runs there are."""
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    if run is None:
        known = session.scalars(select(Run.name).order_by(Run.name).limit(10)).all()
        listing = ", ".join(known) if known else "none yet"
        raise UserError(f"no run named {name!r} in the store (runs: {listing}); check --run")
    return run


def register_run(
    session: Session,
    name: str,
    *,
    subject_model: str,
    hookpoint: str,
    dataset: str,
    architecture: str,
    n_latents: int,
    k: int | None,
    seeds: Sequence[int],
    path: str | None = None,
    config: dict[str, Any] | None = None,
) -> Run:
    """Create the run `name`, or bring an existing one up to date (re-running a stage)."""
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    if run is None:
        run = Run(name=name)
        session.add(run)
    run.subject_model = subject_model
    run.hookpoint = hookpoint
    run.dataset = dataset
    run.architecture = architecture
    run.n_latents = n_latents
    run.k = k
    run.seeds = [int(seed) for seed in seeds]
    run.path = path
    run.config = dict(config or {})
    session.flush()
    return run


def register_sae(
    session: Session,
    run: Run,
    seed: int,
    *,
    n_latents: int,
    d_in: int,
    hookpoint: str | None = None,
    path: str | None = None,
    architecture: str | None = None,
    k: int | None = None,
    fvu: float | None = None,
    l0: float | None = None,
    dead_fraction: float | None = None,
) -> Sae:
    """Create or update the SAE of `run` for `seed`, with one `latent` row per latent."""
    hookpoint = hookpoint or run.hookpoint
    sae = session.scalars(
        select(Sae).where(Sae.run_id == run.id, Sae.hookpoint == hookpoint, Sae.seed == seed)
    ).one_or_none()
    if sae is None:
        sae = Sae(run_id=run.id, seed=seed, hookpoint=hookpoint, n_latents=n_latents)
        session.add(sae)
    elif sae.n_latents != n_latents:
        raise UserError(
            f"run {run.name!r} already has a seed-{seed} SAE at {hookpoint} with "
            f"{sae.n_latents} latents, not {n_latents}; use a new run name"
        )
    sae.path = path
    sae.d_in = d_in
    sae.architecture = architecture or run.architecture
    sae.k = k if k is not None else run.k
    sae.fvu = fvu
    sae.l0 = l0
    sae.dead_fraction = dead_fraction
    session.flush()
    insert_ignore = (
        postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    )
    for start in range(0, n_latents, LATENT_CHUNK):
        rows = [
            {"sae_id": sae.id, "index": index}
            for index in range(start, min(start + LATENT_CHUNK, n_latents))
        ]
        session.execute(
            insert_ignore(Latent)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["sae_id", "index"])
        )
    return sae


def latent_ids(session: Session, sae: Sae) -> np.ndarray:
    """Primary keys of the SAE's latents, indexed by latent index."""
    ids = np.full(sae.n_latents, -1, dtype=np.int64)
    # Rows are tuples, whose .index is a method: unpack them instead.
    for index, latent_id in session.execute(
        select(Latent.index, Latent.id).where(Latent.sae_id == sae.id)
    ):
        ids[index] = latent_id
    return ids


def store_latent_stats(
    session: Session,
    sae: Sae,
    firing_count: npt.ArrayLike,
    n_tokens: int,
    max_activation: npt.ArrayLike,
) -> None:
    """Record how often each latent fired over `n_tokens` tokens and its largest activation."""
    counts = np.asarray(firing_count, dtype=np.int64)
    maxima = np.asarray(max_activation, dtype=np.float64)
    if counts.shape != (sae.n_latents,) or maxima.shape != (sae.n_latents,):
        raise ValueError(f"expected {sae.n_latents} values per latent")
    ids = latent_ids(session, sae)
    session.execute(
        update(Latent),
        [
            {
                "id": int(ids[index]),
                "firing_count": int(counts[index]),
                "firing_frequency": float(counts[index]) / n_tokens if n_tokens else 0.0,
                "max_activation": float(maxima[index]),
            }
            for index in range(sae.n_latents)
        ],
    )


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


def encode_window(
    token_ids: npt.ArrayLike, activations: npt.ArrayLike, half: bool = False
) -> tuple[bytes, bytes]:
    """Token ids as int32 and activations as float32 (float16 with `half`), little-endian."""
    tokens = np.asarray(token_ids, dtype="<i4")
    values = np.asarray(activations, dtype="<f2" if half else "<f4")
    if tokens.shape != values.shape or tokens.ndim != 1:
        raise ValueError("expected one activation per token of a 1-D window")
    return tokens.tobytes(), values.tobytes()


def decode_window(token_bytes: bytes, activation_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_window`; the activations' width (2 or 4 bytes) follows from sizes."""
    tokens = np.frombuffer(token_bytes, dtype="<i4")
    width = len(activation_bytes) // max(len(tokens), 1)
    values = np.frombuffer(activation_bytes, dtype="<f2" if width == 2 else "<f4")
    return tokens.astype(np.int64), values.astype(np.float32)
