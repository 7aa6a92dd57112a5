"""`LLMConfig`: which LLM explains and scores latents, and how to reach it.

It is also what a run records about its LLM, so it names the environment variable that holds
an API key, never the key itself.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sae.precision import Precision

DEFAULT_URL = "http://127.0.0.1:8011/v1"
API_KEY_ENV = "AUTOINTERP_LLM_API_KEY"
# Requests in flight per process when nothing sets it (the score stage sets 4 per worker).
DEFAULT_CONCURRENCY = 32
# Requests the in-process backend generates together.
DEFAULT_MAX_BATCH = 8
# SmolLM2-135M keeps 46 KB of keys and values per token in float32: 8,192 tokens, 0.4 GB.
DEFAULT_PREFIX_CACHE_TOKENS = 8192


class LLMConfig(BaseModel):
    """Which LLM to use and how to reach it; safe to save (holds no secret)."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(
        default="openai",
        description="openai (a vLLM or other OpenAI-compatible server) or "
        "transformers (in-process)",
    )
    model: str = Field(default="smollm2", description="model name as the server serves it")
    urls: list[str] = Field(
        default_factory=lambda: [DEFAULT_URL],
        min_length=1,
        description="OpenAI-compatible base URLs, one per server",
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, description="requests in flight per process (default 4 per worker)"
    )

    @property
    def concurrency(self) -> int:
        return self.max_concurrency or DEFAULT_CONCURRENCY

    max_batch: int = Field(
        default=DEFAULT_MAX_BATCH,
        ge=1,
        description="in-process (transformers) backend: requests generated together",
    )
    prefix_cache_tokens: int = Field(
        default=DEFAULT_PREFIX_CACHE_TOKENS,
        ge=0,
        description="in-process (transformers) backend: tokens of recent prompts whose keys "
        "and values are kept, so a prompt that begins the same way is prefilled from where "
        "they part; 0: off",
    )
    precision: Precision = Field(
        default="auto",
        description="the model's dtype in the in-process (transformers) backend and in the "
        "vLLM server `autointerp llm serve` starts, float32 or bfloat16; auto: bfloat16 where "
        "this CPU multiplies it measurably faster (and for vLLM on a GPU that has it), "
        "float32 elsewhere",
    )
    timeout_s: float = Field(default=180.0, gt=0, description="one HTTP request")
    retry_for_s: float = Field(default=900.0, ge=0, description="keep retrying a request this long")
    structured_output: bool = True
    api_key_env: str = API_KEY_ENV
