"""Settings read from `AUTOINTERP_*` environment variables (pydantic-settings)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path.home() / ".cache" / "autointerp"


class Settings(BaseSettings):
    """Process-wide configuration; every field is `AUTOINTERP_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="AUTOINTERP_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="model and data cache folder")
    db: str = Field(default="sqlite:///autointerp.db", description="SQLAlchemy URL of the store")


def get_settings() -> Settings:
    return Settings()
