"""`ReportConfig`: how the report judges and tests a run's scores."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from service.config.score import DEFAULT_EMBEDDING_MODEL


class ReportConfig(BaseModel):
    """The report's settings; written into the JSON and the HTML it produces."""

    model_config = ConfigDict(extra="forbid")

    html: Path | None = Field(default=None, description="also write a self-contained HTML report")
    good_threshold: float = Field(default=0.8, description="a latent scores well above this")
    confidence: float = Field(default=0.95, gt=0, lt=1)
    n_resamples: int = Field(
        default=2000, ge=100, description="bootstrap resamples, and permutations of each test"
    )
    frequency_bins: int = Field(
        default=5,
        ge=1,
        description="bins of equal count of log firing frequency for the frequency-adjusted "
        "shared vs seed-specific difference",
    )
    seed: int = Field(default=0, description="seed of the bootstrap and of random pairs")
    min_control_latents: int = Field(
        default=5, ge=2, description="latents the specificity control needs for a verdict"
    )
    max_random_pairs: int = Field(default=2000, ge=1)
    agreement: bool = Field(
        default=True, description="compare explanations across seeds (loads the embedding model)"
    )
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
