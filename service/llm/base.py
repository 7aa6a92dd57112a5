"""The LLM interface every backend implements, the records of its calls, and the registry.

A backend turns chat messages plus per-request sampling parameters into a `Completion`:
the text, each generated token with its log-probability and top alternatives when asked, and
one `CallRecord` per attempt (failed attempts included) so that every call's tokens, latency
and server end up in the store. Backends register a factory under a name (`openai`,
`transformers`); `create_client` builds one from an `LLMConfig`.

Which backend and server to use is `service.config.LLMConfig`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict

from sae.errors import UserError
from service.config.llm import LLMConfig


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    """Sampling parameters of ONE request; frozen, so no request can change another's."""

    model_config = ConfigDict(frozen=True)

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # A JSON schema the answer must follow; backends that cannot enforce it ignore it, and
    # parsers never rely on it being enforced.
    json_schema: dict[str, Any] | None = None


@dataclass
class TokenLogprob:
    """One generated token, its log-probability and the top alternatives at its position."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class CallRecord:
    """One attempt at one request, as the `llm_call` table records it."""

    model: str
    base_url: str
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


@dataclass
class Completion:
    """The answer to one request: its text, tokens (with logprobs when asked) and attempts."""

    text: str
    tokens: list[TokenLogprob] | None
    finish_reason: str | None
    calls: list[CallRecord]

    @property
    def prompt_tokens(self) -> int:
        return sum(call.prompt_tokens or 0 for call in self.calls)

    @property
    def completion_tokens(self) -> int:
        return sum(call.completion_tokens or 0 for call in self.calls)


@dataclass(frozen=True)
class ServerStats:
    """One server's share of a client's work so far: attempts sent, attempts that failed
    (no answer, or an error answer), and requests in flight now."""

    base_url: str
    requests: int
    errors: int
    in_flight: int


class LLMError(Exception):
    """A request that failed for good; `calls` holds every attempt, for the store.

    `transient`: the servers were unreachable or overloaded for the whole retry period, so
    the same request may well succeed later (the job should be retried). `status`: the HTTP
    status of a server's refusal; a 4xx other than 429 (`refused`: a wrong API key, a model
    the server does not serve, a request it cannot take) fails the same way every time, so it
    fails the job rather than pass for an unparseable answer. Otherwise the answer itself was
    unusable (an unreadable body) and counts as a parse failure.
    """

    def __init__(
        self,
        message: str,
        calls: list[CallRecord],
        transient: bool = False,
        status: int | None = None,
    ):
        super().__init__(message)
        self.calls = calls
        self.transient = transient
        self.status = status

    @property
    def refused(self) -> bool:
        return self.status is not None and 400 <= self.status < 500 and self.status != 429

    @property
    def fails_the_job(self) -> bool:
        """Whether the job must stop here: the LLM could not be reached, or refused."""
        return self.transient or self.refused


class LLMClient(ABC):
    """One LLM backend. Safe to share between concurrent tasks of one event loop."""

    model: str
    # The registered name of the backend (`LLMConfig.backend`): with `model`, the LLM's
    # identity in a campaign.
    backend: str
    # Whether `SamplingParams.json_schema` is enforced (guided decoding) by this backend.
    enforces_json_schema: bool = False

    @abstractmethod
    async def check(self) -> None:
        """Raise a UserError (one line: what is wrong, how to fix it) if the LLM is unusable."""

    @abstractmethod
    async def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        """Answer one conversation; raises LLMError when the request cannot be served."""

    def servers(self) -> list[ServerStats]:
        """Per-server figures, for backends that spread requests over servers."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or memory."""


ClientFactory = Callable[[LLMConfig, Path], LLMClient]
BACKENDS: dict[str, ClientFactory] = {}


def register_backend(name: str) -> Callable[[ClientFactory], ClientFactory]:
    """Decorator: make a client factory available under `name`."""

    def decorate(factory: ClientFactory) -> ClientFactory:
        BACKENDS[name] = factory
        return factory

    return decorate


def create_client(config: LLMConfig, home: Path) -> LLMClient:
    """The client `config.backend` names; an unknown name is a user error."""
    factory = BACKENDS.get(config.backend)
    if factory is None:
        known = ", ".join(sorted(BACKENDS))
        raise UserError(f"unknown LLM backend {config.backend!r}; use one of: {known}")
    return factory(config, home)
