"""Classification metrics of a scorer's verdicts, with scikit-learn's conventions.

- balanced accuracy: mean recall over the classes present in the labels;
- F1 of the positive class, 0 when there are no true and no predicted positives
  (`zero_division=0`);
- ROC AUC: probability that a random positive outranks a random negative, ties counting
  half (the Mann-Whitney U statistic over average ranks); None when a class is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def balanced_accuracy(labels: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError("labels and predictions differ in length")
    if y.size == 0:
        return None
    recalls = [float((p[y == cls] == cls).mean()) for cls in (False, True) if (y == cls).any()]
    return float(np.mean(recalls))


def f1(labels: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError("labels and predictions differ in length")
    if y.size == 0:
        return None
    true_positive = int((y & p).sum())
    denominator = int(y.sum() + p.sum())
    return 2 * true_positive / denominator if denominator else 0.0


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError("labels and scores differ in length")
    n_positive = int(y.sum())
    n_negative = int(y.size - n_positive)
    if n_positive == 0 or n_negative == 0:
        return None
    ranks = rankdata(s)
    u = ranks[y].sum() - n_positive * (n_positive + 1) / 2
    return float(u / (n_positive * n_negative))
