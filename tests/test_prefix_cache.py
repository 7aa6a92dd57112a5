"""The prefix cache's bookkeeping on small tensors: the longest stored beginning, never the
whole prompt, nothing under the minimum, least recently used evicted first."""

import torch

from service.llm.prefix_cache import MIN_SHARED_TOKENS, PrefixCache


def layers(n: int, mark: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    keys = torch.full((1, 2, n, 4), mark)
    return [(keys, keys + 1), (keys + 2, keys + 3)]


def test_longest_stored_beginning():
    cache = PrefixCache(max_tokens=1000)
    base = list(range(100))
    cache.add(base[:60], layers(60, 1.0))
    cache.add(base[:80] + [999] * 10, layers(90, 2.0))
    shared, found = cache.longest(base)
    assert shared == 80 and found is not None and float(found[0][0][0, 0, 0, 0]) == 2.0
    # A stored prompt equal to the new one: all but its last token, which gives the logits.
    shared, found = cache.longest(base[:60])
    assert shared == 59 and found is not None
    # Too short a common beginning is not worth a copy.
    assert cache.longest(base[: MIN_SHARED_TOKENS - 1] + [5000] * 50) == (0, None)
    assert cache.longest([7000] * 50) == (0, None)


def test_least_recently_used_evicted_beyond_the_limit():
    cache = PrefixCache(max_tokens=150)
    first, second, third = ([n] * 60 for n in (1, 2, 3))
    cache.add(first, layers(60, 1.0))
    cache.add(second, layers(60, 2.0))
    assert cache.longest(first + [0])[0] == 60  # first is now the most recently used
    cache.add(third, layers(60, 3.0))  # 180 tokens > 150: second goes
    assert len(cache) == 2
    assert cache.longest(second + [0]) == (0, None)
    assert cache.longest(first + [0])[0] == 60 and cache.longest(third + [0])[0] == 60
    cache.add([4] * 200, layers(200, 4.0))  # larger than the whole cache: not kept
    assert len(cache) == 2
