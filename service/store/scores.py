"""Reading explanations and scores back, always within one campaign: the explanation of each
latent per explainer, and the newest score of each latent per explainer, scorer, control and
explanation source. `autointerp show` reads one latent with these, the report a whole run,
and the worker looks up the explanations a campaign already has, to reuse them.

A latent scored again in the same campaign (a failed job queued again) keeps its older
rows; readers see the newest, by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from service.store.models import Explanation, Score


@dataclass(frozen=True)
class LatestScore:
    """One score row, with the explainer and the latent of the explanation it tested."""

    explainer: str
    source_latent_id: int
    score: Score


@dataclass(frozen=True)
class StoredExplanation:
    """An explanation a campaign already holds; `text` is empty when it could not be parsed."""

    id: int
    latent_id: int
    explainer: str
    text: str
    raw: str | None


def campaign_explanations(
    session: Session, campaign_id: int, latent_ids: Iterable[int]
) -> list[StoredExplanation]:
    """The explanations campaign `campaign_id` holds for these latents (one per explainer)."""
    rows = session.execute(
        select(
            Explanation.id,
            Explanation.latent_id,
            Explanation.explainer,
            Explanation.text,
            Explanation.raw,
        ).where(
            Explanation.campaign_id == campaign_id,
            Explanation.latent_id.in_(list(latent_ids)),
        )
    )
    return [StoredExplanation(*row) for row in rows]


def latest_explanations(
    session: Session, campaign_id: int, latents: ColumnElement[bool]
) -> list[tuple[int, str, str]]:
    """(latent id, explainer, text) of each explanation of campaign `campaign_id`, for the
    latents `latents` selects (a condition on `Explanation.latent_id`)."""
    rows = session.execute(
        select(Explanation.latent_id, Explanation.explainer, Explanation.text)
        .where(Explanation.campaign_id == campaign_id, latents)
        .order_by(Explanation.latent_id, Explanation.explainer)
    )
    return [(int(latent_id), explainer, text) for latent_id, explainer, text in rows]


def newest_score_ids(campaign_id: int, latents: ColumnElement[bool]) -> Select[int]:
    """Ids of the newest score of campaign `campaign_id` per (latent, explainer, scorer,
    control, explanation source) of the latents `latents` selects (a condition on
    `Score.latent_id`)."""
    return (
        select(func.max(Score.id))
        .join(Explanation, Explanation.id == Score.explanation_id)
        .where(Score.campaign_id == campaign_id, latents)
        .group_by(
            Score.latent_id,
            Explanation.explainer,
            Score.scorer,
            Score.control,
            Explanation.latent_id,
        )
    )


def latest_scores(
    session: Session, campaign_id: int, latent_ids: Iterable[int] | ColumnElement[bool]
) -> list[LatestScore]:
    """The newest score of campaign `campaign_id` per (latent, explainer, scorer, control,
    explanation source) of the latents given as ids or as a condition on `Score.latent_id`,
    oldest first."""
    selects = (
        latent_ids
        if isinstance(latent_ids, ColumnElement)
        else Score.latent_id.in_(list(latent_ids))
    )
    rows = session.execute(
        select(Explanation.explainer, Explanation.latent_id, Score)
        .join(Explanation, Explanation.id == Score.explanation_id)
        .where(Score.id.in_(newest_score_ids(campaign_id, selects)))
        .order_by(Score.id)
    ).all()
    return [LatestScore(explainer, source, score) for explainer, source, score in rows]
