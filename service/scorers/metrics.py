"""Classification metrics of a scorer's verdicts, and why one is undefined.

- balanced accuracy: mean recall of the two classes;
- F1 of the positive class;
- ROC AUC: probability that a random positive outranks a random negative, ties counting
  half (the Mann-Whitney U statistic over average ranks);
- Pearson correlation of predicted and true activations (the simulation scorer), None when
  either is constant or fewer than two values are given.

Each is None (stored as NULL) unless both classes are among the verdicts it is computed on:
with one class, balanced accuracy is that class's recall and F1 of an all-positive set is 1.0
for a scorer that always says yes, so a number there would reward saying yes exactly on the
latents that fire in every window. `undefined_reason` names why, so that reports count it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

NO_EXAMPLES = "no examples"
CONSTANT = "constant prediction or truth"


def undefined_reason(
    labels: Sequence[bool], counted: Sequence[bool], counted_as: str = "parsed"
) -> str | None:
    """Why a metric over the verdicts with `counted` True is undefined (None: it is defined).

    `labels` are every example's labels; `counted` says which verdicts the metric uses (those
    that parsed, or those with a probability), `counted_as` how to say so: "no negatives"
    when there were none to score, "no negatives parsed" when all of them failed."""
    y = np.asarray(labels, dtype=bool)
    used = np.asarray(counted, dtype=bool)
    if y.shape != used.shape:
        raise ValueError("labels and counted differ in length")
    if y.size == 0:
        return NO_EXAMPLES
    if not used.any():
        return f"nothing {counted_as}"
    for cls, name in ((False, "negatives"), (True, "positives")):
        if not (y == cls).any():
            return f"no {name}"
        if not (y[used] == cls).any():
            return f"no {name} {counted_as}"
    return None


def metric_undefined_reason(
    metric: str,
    labels: Sequence[bool],
    predicted: Sequence[bool | None],
    probabilities: Sequence[float | None],
) -> str | None:
    """Why `metric` is undefined on verdicts given as their labels, predictions (None:
    unparsed) and probabilities (None: none given); None when it is defined. AUC uses the
    verdicts with a probability, the other metrics those that parsed."""
    if metric == "auc":
        return undefined_reason(labels, [p is not None for p in probabilities], "rated")
    if metric == "correlation":
        # Token-level values are not among the verdicts: with any window parsed, only a
        # constant prediction or a constant truth leaves a correlation undefined.
        if not labels:
            return NO_EXAMPLES
        if all(p is None for p in predicted):
            return "nothing parsed"
        return CONSTANT
    return undefined_reason(labels, [p is not None for p in predicted])


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def balanced_accuracy(labels: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError("labels and predictions differ in length")
    if not _both_classes(y):
        return None
    return float(((p[y]).mean() + (~p[~y]).mean()) / 2)


def f1(labels: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError("labels and predictions differ in length")
    if not _both_classes(y):
        return None
    true_positive = int((y & p).sum())
    return 2 * true_positive / int(y.sum() + p.sum())


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError("labels and scores differ in length")
    if not _both_classes(y):
        return None
    n_positive = int(y.sum())
    n_negative = int(y.size - n_positive)
    ranks = rankdata(s)
    u = ranks[y].sum() - n_positive * (n_positive + 1) / 2
    return float(u / (n_positive * n_negative))


def correlation(truth: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Pearson correlation; None (undefined) when either side is constant or too short."""
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError("truth and predictions differ in length")
    if t.size < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        return None
    t, p = t - t.mean(), p - p.mean()
    return float((t @ p) / np.sqrt((t @ t) * (p @ p)))
