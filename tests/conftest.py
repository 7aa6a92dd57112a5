"""Shared fixtures: the real embedded subject model and the stores tests run against."""

from pathlib import Path

import pytest
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sae.models import load_model
from service.settings import get_settings


@pytest.fixture(scope="session")
def home() -> Path:
    """The user's autointerp home, so the converted SmolLM2 folder is built once and reused."""
    return get_settings().home


@pytest.fixture(scope="session")
def smollm2(home: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    return load_model("smollm2", home)
