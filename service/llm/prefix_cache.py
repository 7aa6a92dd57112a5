"""The in-process backend's prefix cache: the keys and values of recent prompts, so that a
prompt beginning as one of them did is prefilled only from where the two part (what vLLM's
automatic prefix caching does on a server).

The scoring prompts are built for it: the instructions, then the windows, then the
explanation, so a latent's own, shuffled and cross-seed explanations scored on the same
windows share all but their last few dozen tokens. Entries are whole prompts, evicted least
recently used first once they hold more than `max_tokens` tokens in all.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# Shorter common beginnings (a chat template's first line) save less than they cost.
MIN_SHARED_TOKENS = 32

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    """Prompts' token ids and each layer's keys and values, [1, heads, positions, head_dim].
    The tensors are kept as given and never written to: a user copies what it extends."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, Layers]] = OrderedDict()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, tokens: list[int]) -> tuple[int, Layers | None]:
        """How many of `tokens` a stored prompt begins with (at most all but the last, which
        must be fed to get the next token's logits), and that prompt's layers; (0, None) when
        no stored prompt shares at least MIN_SHARED_TOKENS."""
        wanted = torch.tensor(tokens)
        best, best_key = 0, None
        for key, (stored, _) in self._entries.items():
            n = min(len(stored), len(tokens) - 1)
            if n <= best:
                continue
            differ = torch.nonzero(stored[:n] != wanted[:n])
            shared = int(differ[0, 0]) if len(differ) else n
            if shared > best:
                best, best_key = shared, key
        if best_key is None or best < MIN_SHARED_TOKENS:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1]

    def add(self, tokens: list[int], layers: Layers) -> None:
        """Keep `tokens`' keys and values, evicting the least recently used beyond the limit."""
        key = tuple(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if len(key) > self.max_tokens:
            return
        self._entries[key] = (torch.tensor(tokens), layers)
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            evicted, _ = self._entries.popitem(last=False)
            self._tokens -= len(evicted)
