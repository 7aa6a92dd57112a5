"""`UIConfig`: where the latent browser listens and how much each page shows."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class UIConfig(BaseModel):
    """The latent browser's settings (`autointerp ui`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8050, ge=1, le=65535, description="port to listen on")
    run: str | None = Field(default=None, description="open on this run's page")
    page_size: int = Field(default=50, ge=1, le=1000, description="latents per list page")
    partner_contexts: int = Field(
        default=5, ge=0, description="top contexts shown beside each partner"
    )
    plot_points: int = Field(
        default=2000, ge=10, description="points drawn per scatter plot (a random sample)"
    )
    cached_saes: int = Field(
        default=16, ge=1, description="SAEs whose latent tables the server keeps in memory"
    )
