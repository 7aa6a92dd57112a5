"""The explainer interface and its registry.

An explainer turns the windows the split chose for it into one short explanation. LLM
explainers need a client; statistics-only explainers (a token baseline) take None. A new
explainer is one module with a class decorated by `register_explainer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from sae.errors import UserError
from service.cache.windows import ExampleSplit
from service.config import ScoreConfig
from service.llm.base import CallRecord, LLMClient


@dataclass
class ExplanationResult:
    """One explanation; `text` is empty when nothing usable could be parsed from `raw`."""

    explainer: str
    text: str
    raw: str | None
    parsed: bool
    calls: list[CallRecord] = field(default_factory=list)


class Explainer(ABC):
    name: ClassVar[str]
    needs_llm: ClassVar[bool] = True

    def __init__(self, config: ScoreConfig):
        self.config = config

    @abstractmethod
    async def explain(self, split: ExampleSplit, llm: LLMClient | None) -> ExplanationResult:
        """Explain the latent from `split.explain` only (never the held-out windows)."""


EXPLAINERS: dict[str, type[Explainer]] = {}

ExplainerClass = type[Explainer]


def register_explainer(cls: ExplainerClass) -> ExplainerClass:
    """Class decorator: make an explainer available under its `name`."""
    EXPLAINERS[cls.name] = cls
    return cls


def create_explainers(config: ScoreConfig) -> list[Explainer]:
    unknown = [name for name in config.explainers if name not in EXPLAINERS]
    if unknown:
        known = ", ".join(sorted(EXPLAINERS))
        raise UserError(f"unknown explainer {unknown[0]!r}; use any of: {known}")
    return [EXPLAINERS[name](config) for name in config.explainers]
