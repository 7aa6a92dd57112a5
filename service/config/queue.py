"""`QueueConfig`: which latents of a run the queue stage hands to the score workers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Selection = Literal["all", "sample", "stratified"]


class QueueConfig(BaseModel):
    """All live latents, a seeded random sample of them, or equal numbers of shared and
    seed-specific latents; the same seed chooses the same latents."""

    model_config = ConfigDict(extra="forbid")

    selection: Selection = Field(
        default="all",
        description="all live latents, a random sample, or stratified (as many shared as "
        "seed-specific; needs stored matches)",
    )
    latents: int | None = Field(
        default=None, ge=1, description="sample: latents drawn; stratified: latents per group"
    )
    seed: int = Field(default=0, description="seed of the random choice")
    stage: str = Field(default="explain", description="stage the jobs are for")
