"""Scorers: test an explanation on held-out windows (registry in `base`, metrics in `metrics`)."""

from service.scorers import detection, embedding, fuzzing
from service.scorers.base import (
    SCORERS,
    Scorer,
    ScoreResult,
    Verdict,
    create_scorers,
    primary_metric,
)

__all__ = [
    "SCORERS",
    "ScoreResult",
    "Scorer",
    "Verdict",
    "create_scorers",
    "detection",
    "embedding",
    "fuzzing",
    "primary_metric",
]
