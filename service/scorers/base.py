"""The scorer interface, its results and its registry.

A scorer tests an explanation on the held-out windows of a split (never the windows the
explainer saw) and returns one verdict per window: its true label, the prediction (None when
the answer could not be parsed, with the raw text kept) and a probability when the scorer
has one. The metrics are computed on what parsed. A new scorer (an embedding scorer, a
simulation scorer) is one module with a class decorated by `register_scorer`; scorers that
need no LLM set `needs_llm = False` and accept None as the client; scorers that test the
windows without an explanation (intruder) set `needs_explanation = False` and run under the
`none` explainer only. A score of a split whose negatives are hard ones (windows where the
latent's nearest neighbours fire) is labelled `SCORER:hard` (`HARD_SUFFIX`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from sae.errors import UserError
from service.cache.windows import ExampleSplit, Window
from service.config import ScoreConfig
from service.llm.base import CallRecord, LLMClient
from service.scorers.metrics import balanced_accuracy, f1, metric_undefined_reason, roc_auc
from service.store.models import CONTROL_OWN

DEFAULT_METRIC = "balanced_accuracy"
HARD_SUFFIX = ":hard"


@dataclass
class Verdict:
    """One held-out window: the truth, what the scorer predicted and the raw answer."""

    window: Window
    label: bool
    predicted: bool | None
    probability: float | None = None
    raw: str | None = None


@dataclass
class ScoreResult:
    """A scorer's verdicts on one explanation; `control` says which explanation it tested
    ("own": the latent's own; controls such as another latent's explanation name themselves)."""

    scorer: str
    verdicts: list[Verdict]
    calls: list[CallRecord] = field(default_factory=list)
    control: str = CONTROL_OWN

    @property
    def parsed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.predicted is not None]

    @property
    def n_examples(self) -> int:
        return len(self.verdicts)

    @property
    def n_parsed(self) -> int:
        return len(self.parsed)

    @property
    def n_failed(self) -> int:
        return self.n_examples - self.n_parsed

    @property
    def balanced_accuracy(self) -> float | None:
        parsed = self.parsed
        return balanced_accuracy([v.label for v in parsed], [bool(v.predicted) for v in parsed])

    @property
    def f1(self) -> float | None:
        parsed = self.parsed
        return f1([v.label for v in parsed], [bool(v.predicted) for v in parsed])

    @property
    def auc(self) -> float | None:
        rated = [v for v in self.verdicts if v.probability is not None]
        return roc_auc([v.label for v in rated], [float(v.probability or 0.0) for v in rated])

    @property
    def correlation(self) -> float | None:
        """Pearson correlation of predicted and true activations (simulation scorers only)."""
        return None

    def undefined_reason(self, metric: str) -> str | None:
        """Why `metric` is undefined on these verdicts ("no negatives", ...), None if defined."""
        return metric_undefined_reason(
            metric,
            [v.label for v in self.verdicts],
            [v.predicted for v in self.verdicts],
            [v.probability for v in self.verdicts],
        )


class Scorer(ABC):
    name: ClassVar[str]
    needs_llm: ClassVar[bool] = True
    needs_explanation: ClassVar[bool] = True
    # Whether the split's negatives enter the score (so hard negatives make a second score).
    uses_negatives: ClassVar[bool] = True
    # The number the scorer is judged by: a `ScoreResult` property name.
    metric: ClassVar[str] = DEFAULT_METRIC

    def __init__(self, config: ScoreConfig):
        self.config = config

    @abstractmethod
    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        """Test `explanation` on `split.positives` and `split.negatives`."""


SCORERS: dict[str, type[Scorer]] = {}


def primary_metric(scorer: str) -> str:
    """The metric scorer `scorer` (or `scorer:hard`) is judged by (balanced accuracy for one
    not registered)."""
    known = SCORERS.get(scorer.removesuffix(HARD_SUFFIX))
    return known.metric if known is not None else DEFAULT_METRIC


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available under its `name`."""
    SCORERS[cls.name] = cls
    return cls


def create_scorers(config: ScoreConfig) -> list[Scorer]:
    unknown = [name for name in config.scorers if name not in SCORERS]
    if unknown:
        known = ", ".join(sorted(SCORERS))
        raise UserError(f"unknown scorer {unknown[0]!r}; use any of: {known}")
    return [SCORERS[name](config) for name in config.scorers]
