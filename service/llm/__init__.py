"""LLM backends behind one interface (`base.LLMClient`), chosen by name from a registry:
`openai` (any OpenAI-compatible server, vLLM first) and `transformers` (in-process)."""

from service.llm import openai_client, transformers_client
from service.llm.base import (
    BACKENDS,
    CallRecord,
    Completion,
    LLMClient,
    LLMError,
    Message,
    SamplingParams,
    TokenLogprob,
    create_client,
)

__all__ = [
    "BACKENDS",
    "CallRecord",
    "Completion",
    "LLMClient",
    "LLMError",
    "Message",
    "SamplingParams",
    "TokenLogprob",
    "create_client",
    "openai_client",
    "transformers_client",
]
