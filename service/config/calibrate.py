"""`CalibrationConfig`: what `autointerp calibrate` plants and the bar a scorer must clear."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.config.score import ScoreConfig


class CalibrationConfig(BaseModel):
    """Planted latents with known rules, the explainers and scorers run on them, and the bar a
    scorer must clear to be called informative."""

    model_config = ConfigDict(extra="forbid")

    subject_model: str = Field(default="smollm2", description="tokenizer of the windows")
    dataset: str = "embedded"
    chunk_len: int = Field(default=32, ge=8)
    max_tokens: int = Field(default=60_000, ge=1000)
    rules: list[str] | None = Field(default=None, description="planted rules (default all)")
    explainers: list[str] = Field(
        default_factory=lambda: ScoreConfig().explainers, min_length=1, description="explainers"
    )
    scorers: list[str] = Field(
        default_factory=lambda: ScoreConfig().scorers, min_length=1, description="scorers"
    )
    n_examples: int = Field(
        default=15, ge=1, description="held-out activating (and as many silent) windows"
    )
    min_auc: float = Field(default=0.75, gt=0.5, le=1, description="right vs wrong AUC")
    min_gap: float = Field(default=0.1, ge=0, description="mean right - mean wrong score")
    seed: int = 0

    @property
    def score(self) -> ScoreConfig:
        """The score config each planted latent is explained and scored with: no controls
        (the wrong explanation is the control), `n_examples` windows of each kind."""
        return ScoreConfig(
            explainers=self.explainers,
            scorers=self.scorers,
            shuffled_control=False,
            cross_seed=0,
            n_positive=self.n_examples,
            n_negative=self.n_examples,
        )
