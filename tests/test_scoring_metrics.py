"""Scoring arithmetic against cases computed by hand with scikit-learn's conventions."""

import pytest

from service.cache.windows import Window
from service.scorers.base import ScoreResult, Verdict
from service.scorers.metrics import balanced_accuracy, f1, roc_auc, undefined_reason


def test_balanced_accuracy_is_the_mean_of_per_class_recalls():
    labels = [True, True, True, False, False]
    predicted = [True, False, True, False, True]
    # recall of positives 2/3, of negatives 1/2
    assert balanced_accuracy(labels, predicted) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_balanced_accuracy_of_always_yes_is_one_half_whatever_the_class_balance():
    assert balanced_accuracy([True] * 9 + [False], [True] * 10) == pytest.approx(0.5)
    assert balanced_accuracy([True, False, True, False], [True, False, True, False]) == 1.0


def test_metrics_with_one_class_are_undefined_not_the_one_recall():
    """An "always yes" scorer on a latent that fires in every window used to get 1.0."""
    assert balanced_accuracy([True] * 4, [True] * 4) is None
    assert balanced_accuracy([True, True, True, True], [True, False, True, True]) is None
    assert balanced_accuracy([False, False], [False, False]) is None
    assert f1([True, True], [True, True]) is None
    assert f1([False, False], [False, False]) is None
    assert balanced_accuracy([], []) is None and f1([], []) is None


def test_undefined_reasons_say_which_class_is_missing_and_why():
    assert undefined_reason([True, True], [True, True]) == "no negatives"
    assert undefined_reason([False], [True]) == "no positives"
    assert undefined_reason([True, False], [True, False]) == "no negatives parsed"
    assert undefined_reason([True, False], [False, False]) == "nothing parsed"
    assert undefined_reason([], []) == "no examples"
    assert undefined_reason([True, False], [True, True]) is None
    assert undefined_reason([True, False], [True, False], "rated") == "no negatives rated"


def test_f1_of_the_positive_class():
    labels = [True, True, True, False, False, False]
    predicted = [True, True, False, True, False, False]
    # tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3
    assert f1(labels, predicted) == pytest.approx(2 / 3)
    # Defined with both classes even when nothing is predicted positive.
    assert f1([True, False], [False, False]) == 0.0


def test_auc_counts_ranked_pairs():
    # scikit-learn's documented example: 3 of 4 positive-negative pairs ranked right
    assert roc_auc([False, False, True, True], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([False, True], [0.9, 0.1]) == 0.0
    assert roc_auc([False, False, True, True], [0.1, 0.2, 0.3, 0.4]) == 1.0


def test_auc_counts_ties_as_half():
    assert roc_auc([False, True], [0.5, 0.5]) == 0.5
    # the positive beats 0.2 (1) and ties 0.5 (1/2): 1.5 of 2 pairs
    assert roc_auc([False, False, True], [0.2, 0.5, 0.5]) == pytest.approx(0.75)


def test_auc_needs_both_classes():
    assert roc_auc([True, True], [0.2, 0.9]) is None
    with pytest.raises(ValueError):
        roc_auc([True], [0.1, 0.2])


def test_score_result_scores_what_parsed_and_counts_failures():
    window = Window(("a",), (1.0,), "quantile")
    verdicts = [
        Verdict(window, True, True, 0.9),
        Verdict(window, True, None, None, raw="garbage"),
        Verdict(window, False, False, 0.2),
        Verdict(window, False, True, 0.6),
    ]
    result = ScoreResult("detection", verdicts)
    assert (result.n_examples, result.n_parsed, result.n_failed) == (4, 3, 1)
    assert result.balanced_accuracy == pytest.approx((1.0 + 0.5) / 2)
    assert result.f1 == pytest.approx(2 / 3)
    assert result.auc == 1.0


def test_score_result_with_all_negatives_unparsed_is_undefined_and_says_why():
    window = Window(("a",), (1.0,), "quantile")
    verdicts = [
        Verdict(window, True, True, 0.9),
        Verdict(window, True, True, 0.8),
        Verdict(window, False, None, None, raw="garbage"),
    ]
    result = ScoreResult("detection", verdicts)
    assert result.balanced_accuracy is None and result.f1 is None and result.auc is None
    assert result.undefined_reason("balanced_accuracy") == "no negatives parsed"
    assert result.undefined_reason("auc") == "no negatives rated"
    whole = ScoreResult("detection", [*verdicts[:2], Verdict(window, False, False, 0.1)])
    assert whole.undefined_reason("balanced_accuracy") is None
    assert whole.balanced_accuracy == 1.0
