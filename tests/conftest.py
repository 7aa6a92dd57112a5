"""Shared fixtures: the real embedded subject model and the stores tests run against."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scratch_postgres import DEFAULT_SERVER, postgres_unreachable, scratch_postgres
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sae.data import load_chunks
from sae.subject_model import load_model, load_tokenizer
from service.config import get_settings
from service.store.engine import Store, open_store, upgrade


@pytest.fixture(scope="session")
def home() -> Path:
    """The user's autointerp home, so the converted SmolLM2 folder is built once and reused."""
    return get_settings().home


@pytest.fixture(scope="session")
def smollm2(home: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    return load_model("smollm2", home)


# The PostgreSQL server tests create their scratch databases on.
POSTGRES_SERVER = os.environ.get("AUTOINTERP_TEST_POSTGRES", DEFAULT_SERVER)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The PostgreSQL server URL, checked once per session. The tests that need it fail
    without it: a skipped test would prove nothing."""
    reason = postgres_unreachable(POSTGRES_SERVER)
    if reason is not None:
        pytest.fail(
            f"PostgreSQL not reachable at {POSTGRES_SERVER}: {reason}; start it, or name "
            "another server in AUTOINTERP_TEST_POSTGRES"
        )
    return POSTGRES_SERVER


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with scratch_postgres(postgres_server) as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store URL on each backend: a SQLite file under tmp_path, a scratch database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A store migrated to the current schema, on each backend."""
    upgrade(store_url)
    opened = open_store(store_url)
    yield opened
    opened.dispose()


@pytest.fixture(scope="session")
def vllm_url(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real vLLM server serving SmolLM2, started once per session (~2 minutes
    on CPU) from .venv-vllm (`make vllm`), or the server AUTOINTERP_TEST_LLM_URL names.
    Without .venv-vllm the tests that need it fail (`make test` builds it first).

    The server requires an API key, which this fixture puts in AUTOINTERP_LLM_API_KEY for
    the session's clients and the processes it starts (a server named by
    AUTOINTERP_TEST_LLM_URL must be started with the key that variable holds)."""
    import secrets

    from sae.errors import UserError
    from service.config import API_KEY_ENV
    from service.llm.serve import find_vllm_python, free_port, running_server

    given = os.environ.get("AUTOINTERP_TEST_LLM_URL")
    if given:
        yield given
        return
    os.environ[API_KEY_ENV] = secrets.token_hex(16)
    try:
        find_vllm_python()
    except UserError as error:
        pytest.fail(f"{error}; `make vllm` builds .venv-vllm")
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with running_server(
        "smollm2", home, port=free_port(), log_path=log_path, api_key=os.environ[API_KEY_ENV]
    ) as server:
        yield server.url


@pytest.fixture(scope="session")
def smollm2_activation_cache(home: Path) -> Path:
    """32,768 tokens of real SmolLM2 `model.layers.6.mlp` activations (embedded corpus),
    cached on disk under the autointerp home: built once (~10-60 s), reused by later sessions."""
    import shutil
    import tempfile

    from sae.activation_cache import build_activation_cache, read_manifest

    folder = home / "test-activations" / "smollm2-embedded-layer6-mlp-32k"
    existing = read_manifest(folder) if folder.is_dir() else None
    if existing is None or not existing.complete:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
        try:
            build_activation_cache(
                staging, "smollm2", ["model.layers.6.mlp"], home, max_tokens=32_768
            )
            shutil.rmtree(folder, ignore_errors=True)
            # A rename, so a concurrent or interrupted session never sees a half-built cache.
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def tokenizer(home: Path) -> Any:
    """SmolLM2's tokenizer alone (no model weights loaded)."""
    return load_tokenizer("smollm2", home)


@pytest.fixture(scope="session")
def corpus_windows(tokenizer: Any) -> np.ndarray:
    """The first 60,000 tokens of the embedded corpus as 32-token windows."""
    return load_chunks("embedded", tokenizer, chunk_len=32, max_tokens=60_000).numpy()
