"""Batched decoding for the in-process backend: several requests, one forward pass a step.

A request is prefilled alone, with no padding, and then joins the running batch between two
steps (continuous batching): its cache is left-padded to the batch's length, the attention
mask hides the padding, and its position ids count only its own tokens, so that a row's
tokens do not depend on its neighbours (the last bits of its logits do: matrix products over
more rows round differently). A batch of one is the same code, so a request answered alone
and one answered beside others follow the same path.

At every step each row picks its next token by its own rules: greedy, or temperature and
top-p sampling from a generator seeded with its own seed; masked to its JSON schema by its
own xgrammar matcher (the library vLLM uses for it); stopped by EOS, its token budget, the
model's context or a stop string. A finished or cancelled row leaves the batch at once.
A prompt that begins as a recent one did is prefilled from where they part, on a copy of
that prompt's keys and values (`service.llm.prefix_cache`).
Log-probabilities come from the logits after the schema's mask, as vLLM reports them: the
alternatives at an answer token are the answers the schema allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sae.token_text import token_strings
from service.llm.base import SamplingParams, TokenLogprob
from service.llm.prefix_cache import PrefixCache
from service.llm.transformers_client import Generation, Request

# Decoding steps leave this many positions free in the cache for the tokens still to come.
ROOM_STEP = 64


@dataclass(eq=False)
class _Row:
    """A request in the batch and its decoding state."""

    request: Request
    prompt_tokens: int
    generator: torch.Generator | None
    matcher: Any  # xgrammar.GrammarMatcher, or None without a schema
    token_ids: list[int] = field(default_factory=list)
    # How many of `token_ids` are in the cache; the rest are fed at the next step.
    fed: int = 0
    logprobs: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    # Set when this row alone cannot go on (e.g. its token broke its schema).
    error: Exception | None = None

    @property
    def length(self) -> int:
        """Tokens of this row in the cache: the prompt and the generated tokens fed so far."""
        return self.prompt_tokens + self.fed

    @property
    def params(self) -> SamplingParams:
        return self.request.params


class BatchDecoder:
    """The rows being generated and their shared KV cache; used by one thread at a time."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int, prefix_cache_tokens: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(i) for i in [*eos_ids, tokenizer.eos_token_id] if i is not None}
        self.rows: list[_Row] = []
        # Per layer keys and values, each [rows, heads, positions, head_dim], left-padded.
        self.cache: Cache | None = None
        # [rows, positions]: 1 where the cache holds a real token, 0 on the padding.
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self._grammar_compiler: Any = None

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows

    def admit(self, requests: list[Request]) -> None:
        """Prefill each request and add those not already done to the batch, all at once (the
        batch's cache is rebuilt once, not once per request). An error fails its request
        alone."""
        joining: list[tuple[_Row, Cache]] = []
        for request in requests:
            try:
                with torch.inference_mode():
                    row, logits, cache = self._prefill(request)
                    self._choose([row], logits)
            except Exception as error:  # noqa: BLE001 - delivered to the one caller it concerns
                request.deliver(error)
                continue
            if row.finish_reason is not None:
                self._deliver(row)
            else:
                joining.append((row, cache))
        if joining:
            with torch.inference_mode():
                self._join(joining)

    def step(self) -> None:
        """Feed every row its last token and choose the next; deliver the rows that end.
        An error fails every row of the batch (no row can be blamed alone)."""
        try:
            with torch.inference_mode():
                self._step()
        except Exception as error:  # noqa: BLE001 - delivered to the callers it concerns
            self.fail_all(error)

    def fail_all(self, error: BaseException) -> None:
        """Deliver `error` to every row of the batch and empty it."""
        failed, self.rows = self.rows, []
        self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
        for row in failed:
            row.request.deliver(error)

    def _step(self) -> None:
        self._drop([row for row in self.rows if row.request.cancelled()])
        if not self.rows:
            return
        # Each row feeds the tokens it chose since the last step (one, or more where its
        # schema forced some), right-aligned: a shorter row's padding stays masked for good.
        pending = [row.token_ids[row.fed :] for row in self.rows]
        width = max(len(tokens) for tokens in pending)
        input_ids = torch.tensor([[0] * (width - len(t)) + t for t in pending])
        positions = torch.tensor(
            [
                [row.length] * (width - len(t)) + list(range(row.length, row.length + len(t)))
                for row, t in zip(self.rows, pending, strict=True)
            ]
        )
        fed = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in pending])
        mask = torch.cat([self.mask, fed], dim=1)
        with _heads_shared(self.model):
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.mask = mask
        for row in self.rows:
            row.fed = len(row.token_ids)
        self._choose(self.rows, output.logits[:, -1, :].float())
        finished = [row for row in self.rows if row.finish_reason is not None]
        for row in finished:
            self._deliver(row)
        self._drop(finished)

    # --- a request's way in ---------------------------------------------------------------

    def _prefill(self, request: Request) -> tuple[_Row, torch.Tensor, Cache]:
        params = request.params
        encoded = self.tokenizer.apply_chat_template(
            [dict(message) for message in request.messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        input_ids = encoded["input_ids"]
        prompt_tokens = int(input_ids.shape[1])
        if params.max_tokens < 1:
            raise RuntimeError(f"max_tokens is {params.max_tokens}: ask for at least 1")
        if prompt_tokens >= self.context:
            raise RuntimeError(
                f"the prompt has {prompt_tokens} tokens, more than the model's context of "
                f"{self.context}: shorten it"
            )
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        matcher = None
        if params.json_schema is not None:
            import xgrammar

            matcher = xgrammar.GrammarMatcher(self._grammar(params.json_schema))
        row = _Row(request, prompt_tokens, generator, matcher)
        tokens = input_ids[0].tolist()
        shared, layers = self.prefixes.longest(tokens) if self.prefixes else (0, None)
        past = None
        if layers is not None:
            # The stored prompt's first `shared` positions, copied into room for the rest.
            room = prompt_tokens - shared
            past = Cache(
                layers=[
                    _RoomyLayer([keys[:, :, :shared]], [values[:, :, :shared]], room)
                    for keys, values in layers
                ]
            )
        with _heads_shared(self.model):
            output = self.model(
                input_ids=input_ids[:, shared:],
                position_ids=torch.arange(shared, prompt_tokens)[None],
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
        if self.prefixes is not None:
            self.prefixes.add(tokens, _tensors(output.past_key_values))
        return row, output.logits[:, -1, :].float(), output.past_key_values

    def _grammar(self, schema: dict[str, Any]) -> Any:
        import xgrammar

        if self._grammar_compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.model.config.vocab_size
            )
            self._grammar_compiler = xgrammar.GrammarCompiler(info)
        # Compact JSON, as `autointerp llm serve` has vLLM produce it: free whitespace lets a
        # small model spend its token budget on newlines. The compiler caches by schema text.
        return self._grammar_compiler.compile_json_schema(
            json.dumps(schema, sort_keys=True), any_whitespace=False, separators=(",", ":")
        )

    def _join(self, joining: list[tuple[_Row, Cache]]) -> None:
        """Append prefilled rows to the batch, all left-padded to the longest."""
        rows = [row for row, _ in joining]
        width = max(self.mask.shape[1], *(row.length for row in rows))
        parts = [_tensors(cache) for _, cache in joining]
        masks = [torch.ones(1, row.length, dtype=torch.long) for row in rows]
        if self.cache is not None:
            parts.insert(0, _tensors(self.cache))
            masks.insert(0, self.mask)
        self.mask = torch.cat([_pad_left(mask, width) for mask in masks])
        self.rows.extend(rows)
        self.cache = self._roomy_cache([list(per_part) for per_part in zip(*parts, strict=True)])

    def _roomy_cache(self, layers: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> Cache:
        """The batch's cache from each layer's row groups (keys and values), with room for
        every row's remaining tokens."""
        room = max(row.params.max_tokens - len(row.token_ids) for row in self.rows) + 1
        room = min(room, ROOM_STEP)
        return Cache(
            layers=[
                _RoomyLayer([keys for keys, _ in groups], [values for _, values in groups], room)
                for groups in layers
            ]
        )

    # --- choosing tokens ------------------------------------------------------------------

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits [rows, vocab]; mark rows that end."""
        allowed = logits
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        if constrained:
            import xgrammar

            bitmask = xgrammar.allocate_token_bitmask(len(rows), logits.shape[-1])
            for i in constrained:
                rows[i].matcher.fill_next_token_bitmask(bitmask, i)
            allowed = logits.clone()
            xgrammar.apply_token_bitmask_inplace(allowed, bitmask, indices=constrained)
        for i, row in enumerate(rows):
            try:
                self._advance(row, allowed[i])
            except Exception as error:  # noqa: BLE001 - fails this row alone
                row.error, row.finish_reason = error, "error"

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Take the row's next token, and then every token its schema forces (the only one
        it allows) without a forward pass: all are fed together at the next step. A forced
        token is what greedy decoding or sampling would pick, with log-probability 0 beside
        alternatives the schema forbids, as from the masked logits."""
        self._take(row, self._pick(row, logits), logits)
        while row.finish_reason is None and (forced := self._forced(row)) is not None:
            if row.params.logprobs:
                logits = torch.full_like(logits, float("-inf"))
                logits[forced] = 0.0
            self._take(row, forced, logits)

    def _take(self, row: _Row, token: int, logits: torch.Tensor) -> None:
        if row.params.logprobs:
            row.logprobs.append(self._logprobs(logits, token, row.params.top_logprobs))
        row.token_ids.append(token)
        if row.matcher is not None and not row.matcher.accept_token(token):
            raise RuntimeError(f"token {token} does not fit the JSON schema")
        self._check_end(row)

    def _forced(self, row: _Row) -> int | None:
        """The one token the row's schema allows next, or None (no schema, or a choice)."""
        if row.matcher is None:
            return None
        import xgrammar

        vocab = self.model.config.vocab_size
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        row.matcher.fill_next_token_bitmask(bitmask)
        bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = torch.nonzero(bits.flatten()[:vocab])
        return int(allowed[0, 0]) if len(allowed) == 1 else None

    @staticmethod
    def _pick(row: _Row, logits: torch.Tensor) -> int:
        if row.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / row.params.temperature, dim=-1)
        if row.params.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p (always the first).
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs[before >= row.params.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _logprobs(
        self, logits: torch.Tensor, token: int, top: int
    ) -> tuple[float, dict[str, float]]:
        logprobs = torch.log_softmax(logits, dim=-1)
        best = torch.topk(logprobs, max(top, 1))
        alternatives = {
            self.tokenizer.decode([int(index)]): float(value)
            for value, index in zip(best.values, best.indices, strict=True)
        }
        return float(logprobs[token]), alternatives

    def _check_end(self, row: _Row) -> None:
        # The position the last token would be fed at (after the tokens still to be fed).
        position = row.prompt_tokens + len(row.token_ids) - 1
        if row.token_ids[-1] in self.eos_ids or self._stopped(row):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= row.params.max_tokens or position >= self.context:
            row.finish_reason = "length"

    def _stopped(self, row: _Row) -> bool:
        """Whether the text so far holds one of the row's stop strings."""
        if not row.params.stop:
            return False
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return any(stop in text for stop in row.params.stop)

    # --- a request's way out --------------------------------------------------------------

    def _deliver(self, row: _Row) -> None:
        if row.error is not None:
            row.request.deliver(row.error)
            return
        token_ids = row.token_ids
        if token_ids and token_ids[-1] in self.eos_ids:
            token_ids = token_ids[:-1]
        pieces = token_strings(self.tokenizer, token_ids)
        text = "".join(pieces)
        cuts = [text.index(stop) for stop in row.params.stop if stop in text]
        if cuts:
            text = text[: min(cuts)]
        tokens = None
        if row.params.logprobs:
            tokens = [
                TokenLogprob(piece, logprob, top)
                for piece, (logprob, top) in zip(pieces, row.logprobs, strict=False)
            ]
        assert row.finish_reason is not None
        row.request.deliver(
            Generation(token_ids, text, tokens, row.finish_reason, row.prompt_tokens)
        )

    def _drop(self, leaving: list[_Row]) -> None:
        """Take rows out of the batch, and the padding no remaining row needs."""
        if not leaving:
            return
        keep = [i for i, row in enumerate(self.rows) if all(row is not gone for gone in leaving)]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows or self.cache is None:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        # The first position any remaining row uses (argmax: its mask's first 1).
        start = int(self.mask[index].argmax(dim=1).min())
        self.cache = self._roomy_cache(
            [
                [(keys[index, :, start:], values[index, :, start:])]
                for keys, values in _tensors(self.cache)
            ]
        )
        self.mask = self.mask[index, start:]


class _RoomyLayer(DynamicLayer):
    """A layer's keys and values as views into buffers with room to grow, so that a step
    writes its one new position instead of copying the whole cache (DynamicLayer's
    torch.cat, the costliest part of a batched step with long prompts).

    Built from one or more row groups' keys and values, [rows, heads, positions, head_dim],
    stacked and left-padded with zeros to the longest in a single copy."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], room: int):
        super().__init__()
        self.lazy_initialization(keys[0], values[0])
        length = max(part.shape[2] for part in keys)
        self._key_buffer = _stacked(keys, length + room)
        self._value_buffer = _stacked(values, length + room)
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        length, new = self.keys.shape[2], key_states.shape[2]
        if length + new > self._key_buffer.shape[2]:
            room = max(new, ROOM_STEP)
            self._key_buffer = _stacked([self.keys], length + room)
            self._value_buffer = _stacked([self.values], length + room)
        self._key_buffer[:, :, length : length + new] = key_states
        self._value_buffer[:, :, length : length + new] = value_states
        self.keys = self._key_buffer[:, :, : length + new]
        self.values = self._value_buffer[:, :, : length + new]
        return self.keys, self.values


# transformers' "sdpa" copies every key/value head once per query head that shares it
# (SmolLM2: 3 query heads per key/value head) whenever an attention mask is given, as it is
# for a batch with padding: three copies of the whole cache at every layer of every step.
# torch's SDPA shares the heads itself (enable_gqa), mask or not.
SHARED_HEADS_SDPA = "autointerp_sdpa_shared_heads"


def _sdpa_shared_heads(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_HEADS_SDPA, _sdpa_shared_heads)
AttentionMaskInterface.register(SHARED_HEADS_SDPA, sdpa_mask)


@contextmanager
def _heads_shared(model: Any) -> Iterator[None]:
    """Run `model` (if it uses "sdpa") with the head-sharing SDPA while inside; the model's
    own setting is restored on the way out, as other code may use the same model."""
    config = model.config
    previous = config._attn_implementation
    if previous != "sdpa":
        yield
        return
    config._attn_implementation = SHARED_HEADS_SDPA
    try:
        yield
    finally:
        config._attn_implementation = previous


def _tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, [rows, heads, positions, head_dim]."""
    tensors = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
        tensors.append((keys, values))
    return tensors


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before a mask's positions [rows, positions] up to `width`."""
    return F.pad(mask, [width - mask.shape[1], 0])


def _stacked(parts: list[torch.Tensor], size: int) -> torch.Tensor:
    """`parts` ([rows, heads, positions, head_dim] each) one after another along the rows,
    each left-padded with zeros to the longest, in a buffer of `size` positions whose tail
    (the room to grow) is left unwritten."""
    first = parts[0]
    length = max(part.shape[2] for part in parts)
    rows = sum(part.shape[0] for part in parts)
    buffer = first.new_empty(rows, first.shape[1], size, first.shape[3])
    row = 0
    for part in parts:
        end, start = row + part.shape[0], length - part.shape[2]
        buffer[row:end, :, :start] = 0
        buffer[row:end, :, start:length] = part
        row = end
    return buffer
