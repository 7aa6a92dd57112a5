"""Two campaigns side by side on the same run (`autointerp report --compare`): for each
explainer and scorer both ran, the latents both scored, paired, with each campaign's mean,
the mean of the paired differences with its bootstrap interval, and a Wilcoxon signed-rank
test. Only latents scored in both count, so a difference is never a difference in which
latents were scored; shared and seed-specific latents are shown apart, since the question
is whether a change of LLM or config moves one group more than the other."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

from service.report.data import RunData, ScoreData
from service.report.statistics import Bootstrap, Summary, summarize
from service.store.models import CONTROL_OWN


class PairedScores(BaseModel):
    """One explainer and scorer, on the latents (of one group) both campaigns scored."""

    explainer: str
    scorer: str
    metric: str
    group: str = Field(description="all, shared or seed-specific latents")
    n: int = Field(description="latents scored in both campaigns")
    mean_first: float | None = None
    mean_second: float | None = None
    difference: Summary = Field(description="second minus first, paired by latent")
    wilcoxon_p: float | None = Field(default=None, description="two-sided signed-rank test")


class CampaignComparison(BaseModel):
    first: str
    second: str
    test: str = "paired by latent; mean difference with a percentile bootstrap CI; Wilcoxon"
    rows: list[PairedScores]


def _by_latent(scores: ScoreData) -> dict[tuple[int, int], float]:
    return {
        (int(sae), int(index)): float(value)
        for sae, index, value in zip(scores.sae_id, scores.latent_index, scores.value, strict=True)
        if np.isfinite(value)
    }


def _paired(
    explainer: str,
    scorer: str,
    metric: str,
    group: str,
    first: np.ndarray,
    second: np.ndarray,
    bootstrap: Bootstrap,
) -> PairedScores:
    difference = second - first
    row = PairedScores(
        explainer=explainer,
        scorer=scorer,
        metric=metric,
        group=group,
        n=int(difference.size),
        difference=summarize(difference, bootstrap),
    )
    if difference.size:
        row.mean_first, row.mean_second = float(first.mean()), float(second.mean())
    if np.count_nonzero(difference) >= 2:
        row.wilcoxon_p = float(stats.wilcoxon(second, first).pvalue)
    return row


def shared_status(data: RunData) -> dict[tuple[int, int], bool]:
    """(sae id, latent index) -> shared with some other seed, for SAEs that were matched."""
    status: dict[tuple[int, int], bool] = {}
    for group in data.hookpoints:
        for seed, sae in group.saes.items():
            mask = group.shared_any(seed)
            if mask is not None:
                status.update({(sae.id, i): bool(value) for i, value in enumerate(mask)})
    return status


def compare_campaigns(first: RunData, second: RunData, bootstrap: Bootstrap) -> CampaignComparison:
    """Each explainer and scorer both campaigns hold own-explanation scores for, paired by
    latent, over all latents and per group (a latent of an SAE never matched is in "all"
    only)."""
    status = shared_status(first)
    rows = []
    for scores in first.score_sets(CONTROL_OWN):
        other = second.find_scores(scores.explainer, scores.scorer, CONTROL_OWN)
        if other is None:
            continue
        a, b = _by_latent(scores), _by_latent(other)
        both = sorted(a.keys() & b.keys())
        groups = {
            "all": both,
            "shared": [key for key in both if status.get(key) is True],
            "seed-specific": [key for key in both if status.get(key) is False],
        }
        for group, keys in groups.items():
            rows.append(
                _paired(
                    scores.explainer,
                    scores.scorer,
                    scores.metric,
                    group,
                    np.array([a[key] for key in keys]),
                    np.array([b[key] for key in keys]),
                    bootstrap,
                )
            )
    assert first.campaign is not None and second.campaign is not None
    return CampaignComparison(first=first.campaign, second=second.campaign, rows=rows)
