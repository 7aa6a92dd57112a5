"""Column reads for the report and the browser of a whole run: a SAE's latent statistics
and a campaign's newest scores as plain tuples and arrays, never ORM objects (a run of 4
seeds x 131,072 latents has half a million latent rows, and building an object per row costs
more than the query). They read what `service.store.runs.latent_ids` and
`service.store.scores.latest_scores` read, keyed by (SAE id, latent index) instead of
latent id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from service.store.models import Explanation, Latent, Score
from service.store.scores import newest_score_ids


@dataclass
class LatentColumns:
    """One SAE's latents indexed by latent index: store id (-1: no row) and firing statistics
    (NaN: unknown)."""

    ids: np.ndarray
    firing_count: np.ndarray
    firing_frequency: np.ndarray
    max_activation: np.ndarray


def latent_columns(session: Session, sae_id: int, n_latents: int) -> LatentColumns:
    rows = session.execute(
        select(
            Latent.index,
            Latent.id,
            Latent.firing_count,
            Latent.firing_frequency,
            Latent.max_activation,
        ).where(Latent.sae_id == sae_id)
    ).all()
    ids = np.full(n_latents, -1, dtype=np.int64)
    columns = [np.full(n_latents, np.nan) for _ in range(3)]
    if rows:
        index, latent_id, *statistics = zip(*rows, strict=True)
        where = np.asarray(index, dtype=np.int64)
        ids[where] = latent_id
        for column, values in zip(columns, statistics, strict=True):
            # NULL becomes NaN: numpy reads None as NaN in a float array.
            column[where] = np.asarray(values, dtype=np.float64)
    return LatentColumns(ids, *columns)


@dataclass(frozen=True)
class ScoreRow:
    """A newest score of a run's latent, keyed by SAE and latent index; the explanation's
    source latent likewise (source SAE -1 when it is not one of the run's SAEs)."""

    score_id: int
    explainer: str
    scorer: str
    control: str
    sae_id: int
    index: int
    source_sae_id: int
    source_index: int
    balanced_accuracy: float | None
    auc: float | None
    f1: float | None
    correlation: float | None
    n_examples: int
    n_failed: int


def latest_score_rows(session: Session, campaign_id: int, sae_ids: Sequence[int]) -> list[ScoreRow]:
    """The newest score of campaign `campaign_id` per (latent, explainer, scorer, control,
    explanation source) of the latents of SAEs `sae_ids`, oldest first: the rows
    `latest_scores` gives, as columns."""
    of_run = Score.latent_id.in_(select(Latent.id).where(Latent.sae_id.in_(sae_ids)))
    source = aliased(Latent)
    rows = session.execute(
        select(
            Score.id.label("score_id"),
            Explanation.explainer,
            Score.scorer,
            Score.control,
            Latent.sae_id,
            Latent.index,
            source.sae_id.label("source_sae_id"),
            source.index.label("source_index"),
            Score.balanced_accuracy,
            Score.auc,
            Score.f1,
            Score.correlation,
            Score.n_examples,
            Score.n_failed,
        )
        .join(Explanation, Explanation.id == Score.explanation_id)
        .join(Latent, Latent.id == Score.latent_id)
        .join(source, source.id == Explanation.latent_id)
        .where(Score.id.in_(newest_score_ids(campaign_id, of_run)))
        .order_by(Score.id)
    ).all()
    of_sae = set(sae_ids)
    result = [ScoreRow(**row._mapping) for row in rows]
    return [
        row if row.source_sae_id in of_sae else replace(row, source_sae_id=-1, source_index=-1)
        for row in result
    ]
