"""Reading explanations and scores back: the newest explanation of each latent per explainer,
and the newest score of each latent per explainer, scorer, control and explanation source.
`autointerp show` reads one latent with these, the report a whole run.

A latent scored again (a job requeued, a shuffled control drawn anew) keeps its older rows;
readers see the newest, by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from service.store.models import Explanation, Score


@dataclass(frozen=True)
class LatestScore:
    """One score row, with the explainer and the latent of the explanation it tested."""

    explainer: str
    source_latent_id: int
    score: Score


def latest_explanations(
    session: Session, latents: ColumnElement[bool]
) -> list[tuple[int, str, str]]:
    """(latent id, explainer, text) of the newest explanation per latent and explainer, for
    the latents `latents` selects (a condition on `Explanation.latent_id`)."""
    newest = (
        select(func.max(Explanation.id))
        .where(latents)
        .group_by(Explanation.latent_id, Explanation.explainer)
    )
    rows = session.execute(
        select(Explanation.latent_id, Explanation.explainer, Explanation.text)
        .where(Explanation.id.in_(newest))
        .order_by(Explanation.latent_id, Explanation.explainer)
    )
    return [(int(latent_id), explainer, text) for latent_id, explainer, text in rows]


def latest_scores(
    session: Session, latent_ids: Iterable[int] | ColumnElement[bool]
) -> list[LatestScore]:
    """The newest score per (latent, explainer, scorer, control, explanation source) of the
    latents given as ids or as a condition on `Score.latent_id`, oldest first."""
    selects = (
        latent_ids
        if isinstance(latent_ids, ColumnElement)
        else Score.latent_id.in_(list(latent_ids))
    )
    newest = (
        select(func.max(Score.id))
        .join(Explanation, Explanation.id == Score.explanation_id)
        .where(selects)
        .group_by(
            Score.latent_id,
            Explanation.explainer,
            Score.scorer,
            Score.control,
            Explanation.latent_id,
        )
    )
    rows = session.execute(
        select(Explanation.explainer, Explanation.latent_id, Score)
        .join(Explanation, Explanation.id == Score.explanation_id)
        .where(Score.id.in_(newest))
        .order_by(Score.id)
    ).all()
    return [LatestScore(explainer, source, score) for explainer, source, score in rows]
