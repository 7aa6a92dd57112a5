"""The `transformers` backend: the model runs in this process, no server needed.

The embedded default for machines without a vLLM server (SmolLM2 by default, via
`sae.subject_model.load_model`). Concurrent requests are generated together: they wait in a
queue, and one decoding thread takes in as many as the batch has room for
(`LLMConfig.max_batch`) whenever a step ends, so a request joins the running batch rather
than waiting for it to finish (`service.llm.decoding` holds the decode loop). The event loop
stays responsive meanwhile. A greedy answer's text and tokens are the same whether the
request is answered alone or in a batch (its log-probabilities to ~1e-5: matrix products over
more rows round differently). A prompt that begins as a recent one did is prefilled only
from where the two part (`LLMConfig.prefix_cache_tokens`; greedy answers are the same with
it off). A request's JSON schema is enforced as vLLM enforces it, by
masking the logits at every step to the tokens the schema allows (xgrammar): a small model
that ignores the format asked for in the prompt still answers in it; the tokens it forces
are fed without a step of their own. The model runs in bfloat16 where this CPU multiplies
it measurably faster (`LLMConfig.precision`), as vLLM serves it, and every call record names
the dtype.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae.precision import Precision
from service.config import LLMConfig
from service.config.llm import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_TOKENS
from service.llm.base import (
    CallRecord,
    Completion,
    LLMClient,
    LLMError,
    Message,
    SamplingParams,
    TokenLogprob,
    register_backend,
)

if TYPE_CHECKING:
    from service.llm.decoding import BatchDecoder

IN_PROCESS = "in-process"


@dataclass
class Generation:
    """What one request produced: the generated token ids (EOS excluded) and their text."""

    token_ids: list[int]
    text: str
    tokens: list[TokenLogprob] | None
    finish_reason: str
    prompt_tokens: int


@dataclass
class Request:
    """One conversation to answer. `deliver` receives the Generation, or the exception that
    failed this request alone; it is called from the decoding thread, exactly once, unless
    `cancelled` turns true first."""

    messages: list[Message]
    params: SamplingParams
    deliver: Callable[[Generation | BaseException], None]
    cancelled: Callable[[], bool] = lambda: False


class TransformersClient(LLMClient):
    """Generates with a transformers causal LM loaded on first use."""

    backend = "transformers"
    enforces_json_schema = True

    def __init__(
        self,
        model: str,
        home: Path,
        loaded: tuple[Any, Any] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
        precision: Precision = "auto",
    ):
        """`loaded`: an already loaded (model, tokenizer) pair to use instead of loading (in
        its own dtype). `max_batch`: the most requests generated together.
        `prefix_cache_tokens`: the size of the prefix cache in prompt tokens (0: none).
        `precision`: the dtype to load the model in (`sae.precision.compute_dtype`)."""
        self.model = model
        self.home = home
        self.max_batch = max_batch
        self.prefix_cache_tokens = prefix_cache_tokens
        self.precision = precision
        self._loaded = loaded
        self._loading = threading.Lock()
        self._decoder: BatchDecoder | None = None
        self._waiting: deque[Request] = deque()
        # Guards `_waiting` and `_thread`; the decoding thread runs while there is work.
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def _load(self) -> tuple[Any, Any]:
        with self._loading:  # `check` and the decoding thread may both ask first
            if self._loaded is None:
                from sae.precision import compute_dtype
                from sae.subject_model import load_model

                dtype = compute_dtype(self.precision)
                self._loaded = load_model(self.model, self.home, dtype)
            return self._loaded

    @property
    def where(self) -> str:
        """What a call record names as the server: this process, and the model's dtype once
        loaded (`in-process (bfloat16)`)."""
        if self._loaded is None:
            return IN_PROCESS
        return f"{IN_PROCESS} ({str(self._loaded[0].dtype).removeprefix('torch.')})"

    async def check(self) -> None:
        await asyncio.to_thread(self._load)

    async def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Generation | BaseException] = loop.create_future()

        def deliver(outcome: Generation | BaseException) -> None:
            # A closed event loop refuses the callback: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, answer, outcome)

        self._submit(Request(messages, params, deliver, answer.cancelled))
        outcome = await answer
        # As a server's latency: from the call to the answer, the time in the queue included.
        latency = time.monotonic() - started
        if isinstance(outcome, RuntimeError):  # e.g. a prompt longer than the model's context
            record = CallRecord(self.model, self.where, latency, error=str(outcome))
            raise LLMError(str(outcome), [record]) from None
        if isinstance(outcome, BaseException):
            raise outcome
        record = CallRecord(
            self.model,
            self.where,
            latency,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=len(outcome.token_ids),
        )
        return Completion(outcome.text, outcome.tokens, outcome.finish_reason, [record])

    async def aclose(self) -> None:
        """Wait for the decoding thread to finish its work (a cancelled request leaves the
        batch at the next step)."""
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def _submit(self, request: Request) -> None:
        with self._guard:
            self._waiting.append(request)
            if self._thread is not None:
                return
            # Not a daemon: at exit the interpreter waits for it to leave torch's code, which
            # it does at the next step once the event loop has cancelled its callers.
            self._thread = threading.Thread(target=self._work, name="transformers-decoding")
            self._thread.start()

    def _work(self) -> None:
        """The decoding thread: admit waiting requests between steps until none is left.
        Whatever stops it early fails every request it holds, so that none waits forever."""
        try:
            self._decode()
        except BaseException as error:  # noqa: BLE001 - every caller gets the error
            with self._guard:
                waiting, self._waiting = list(self._waiting), deque()
                self._thread = None
            if self._decoder is not None:
                self._decoder.fail_all(error)
            for request in waiting:
                request.deliver(error)

    def _decode(self) -> None:
        if self._decoder is None:
            from service.llm.decoding import BatchDecoder

            model, tokenizer = self._load()
            self._decoder = BatchDecoder(model, tokenizer, self.max_batch, self.prefix_cache_tokens)
        decoder = self._decoder
        while True:
            with self._guard:
                admitted = [
                    self._waiting.popleft()
                    for _ in range(min(decoder.free_slots, len(self._waiting)))
                ]
                if not admitted and decoder.idle:
                    self._thread = None
                    return
            decoder.admit([request for request in admitted if not request.cancelled()])
            decoder.step()


def _settle(answer: asyncio.Future[Generation | BaseException], outcome: Any) -> None:
    if not answer.done():
        answer.set_result(outcome)


@register_backend("transformers")
def _create(config: LLMConfig, home: Path) -> LLMClient:
    return TransformersClient(
        config.model,
        home,
        max_batch=config.max_batch,
        prefix_cache_tokens=config.prefix_cache_tokens,
        precision=config.precision,
    )
