"""The `transformers` backend: the model runs in this process, no server needed.

The embedded default for machines without a vLLM server (SmolLM2 by default, via
`sae.subject_model.load_model`). One generation runs at a time, in a worker thread so the event loop
stays responsive; log-probabilities come from the model's raw logits. A request's JSON schema
is enforced as vLLM enforces it, by masking the logits at every step to the tokens the schema
allows (xgrammar, the library vLLM uses for it): a small model that ignores the format asked
for in the prompt still answers in it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from sae.token_text import token_strings
from service.config import LLMConfig
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

IN_PROCESS = "in-process"


class TransformersClient(LLMClient):
    """Generates with a transformers causal LM loaded on first use."""

    backend = "transformers"
    enforces_json_schema = True

    def __init__(self, model: str, home: Path, loaded: tuple[Any, Any] | None = None):
        """`loaded`: an already loaded (model, tokenizer) pair to use instead of loading."""
        self.model = model
        self.home = home
        self._loaded = loaded
        self._lock = asyncio.Lock()
        self._grammar_compiler: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from sae.subject_model import load_model

            self._loaded = load_model(self.model, self.home)
        return self._loaded

    async def check(self) -> None:
        await asyncio.to_thread(self._load)

    async def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        async with self._lock:
            started = time.monotonic()
            try:
                return await asyncio.to_thread(self._generate, messages, params, started)
            except RuntimeError as error:  # e.g. a prompt longer than the model's context
                record = CallRecord(
                    self.model, IN_PROCESS, time.monotonic() - started, error=str(error)
                )
                raise LLMError(str(error), [record]) from None

    def _generate(
        self, messages: list[Message], params: SamplingParams, started: float
    ) -> Completion:
        import torch

        model, tokenizer = self._load()
        encoded = tokenizer.apply_chat_template(
            [dict(message) for message in messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids = encoded["input_ids"]
        sampling = params.temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "do_sample": sampling,
            "output_logits": True,
            "return_dict_in_generate": True,
            "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
        }
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            # The checkpoint's generation config may carry sampling defaults; greedy means
            # none of them apply.
            options.update(temperature=None, top_p=None, top_k=None)
        if params.json_schema is not None:
            options["logits_processor"] = [self._schema_processor(params.json_schema)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = model.generate(input_ids, attention_mask=encoded["attention_mask"], **options)
        new_ids = output.sequences[0, input_ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        finish_reason = "length"
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
            finish_reason = "stop"
        pieces = token_strings(tokenizer, new_ids)
        text = "".join(pieces)
        for stop in params.stop:
            if stop in text:
                text = text[: text.index(stop)]
                finish_reason = "stop"
        tokens = None
        if params.logprobs:
            tokens = []
            for position, (token_id, piece) in enumerate(zip(new_ids, pieces, strict=True)):
                logprobs = torch.log_softmax(output.logits[position][0].float(), dim=-1)
                top = torch.topk(logprobs, max(params.top_logprobs, 1))
                alternatives = {
                    tokenizer.decode([int(index)]): float(value)
                    for value, index in zip(top.values, top.indices, strict=True)
                }
                tokens.append(TokenLogprob(piece, float(logprobs[token_id]), alternatives))
        record = CallRecord(
            self.model,
            IN_PROCESS,
            time.monotonic() - started,
            prompt_tokens=int(input_ids.shape[1]),
            completion_tokens=len(new_ids),
        )
        return Completion(text, tokens, finish_reason, [record])

    def _schema_processor(self, schema: dict[str, Any]) -> Any:
        """A fresh logits processor (one per generation) masking to `schema`'s tokens."""
        import xgrammar
        from xgrammar.contrib.hf import LogitsProcessor

        model, tokenizer = self._load()
        if self._grammar_compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=model.config.vocab_size
            )
            self._grammar_compiler = xgrammar.GrammarCompiler(info)
        # Compact JSON, as `autointerp llm serve` has vLLM produce it: free whitespace lets a
        # small model spend its token budget on newlines. The compiler caches by schema text.
        grammar = self._grammar_compiler.compile_json_schema(
            json.dumps(schema, sort_keys=True), any_whitespace=False, separators=(",", ":")
        )
        return LogitsProcessor(grammar)


@register_backend("transformers")
def _create(config: LLMConfig, home: Path) -> LLMClient:
    return TransformersClient(config.model, home)
