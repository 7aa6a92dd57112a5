"""Explainers: turn a latent's example windows into a short explanation (registry in `base`)."""

from service.explainers import llm, none, token_baseline
from service.explainers.base import EXPLAINERS, Explainer, ExplanationResult, create_explainers

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "ExplanationResult",
    "create_explainers",
    "llm",
    "none",
    "token_baseline",
]
