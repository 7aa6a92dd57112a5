"""Scorers: test an explanation (the intruder: the windows alone) on held-out windows
(registry in `base`, metrics in `metrics`)."""

from service.scorers import detection, embedding, fuzzing, intruder, simulation
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
    "intruder",
    "primary_metric",
    "simulation",
]
