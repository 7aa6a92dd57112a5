"""Planted latents: synthetic latents that fire by a known rule on real corpus windows.

A rule (a token predicate: "the word 'return'", "digits") fires with a graded activation on
the tokens it matches in windows of the embedded corpus, and the windows are chosen the way
the latent cache chooses them: the top windows by maximum activation, windows spread over
activation quantiles, and random windows where it does not fire. Benchmarks and tests use
them as latents whose right explanation is known.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae.token_text import token_strings
from service.cache.windows import LatentExamples, Window


@dataclass(frozen=True)
class Rule:
    name: str
    explanation: str
    fires: Callable[[str], bool]


RULES = {
    rule.name: rule
    for rule in (
        Rule("return", "the word 'return'", lambda token: token.strip() == "return"),
        Rule("class", "the word 'class'", lambda token: token.strip() == "class"),
        Rule("digits", "digits", lambda token: any(ch.isdigit() for ch in token)),
        Rule("parenthesis", "opening parentheses", lambda token: "(" in token),
        Rule(
            "capitalised",
            "words starting with a capital letter",
            lambda token: token.strip()[:1].isupper(),
        ),
    )
}


@dataclass
class PlantedWindow:
    token_ids: list[int]
    activations: list[float]
    kind: str
    quantile_bin: int | None
    rank: int


def plant(
    rule: Rule,
    token_windows: np.ndarray,
    tokenizer: Any,
    *,
    n_top: int = 20,
    n_quantiles: int = 5,
    per_quantile: int = 6,
    n_random: int = 30,
    seed: int = 0,
) -> list[PlantedWindow]:
    """Windows of a latent that fires by `rule`, chosen like the latent cache chooses them.

    `token_windows` is (n_windows, window_len) token ids. Each window gets one strength drawn
    at random, so that windows differ in their maximum activation and quantiles mean
    something.
    """
    rng = random.Random(seed)
    vocabulary: dict[int, bool] = {}
    activations = np.zeros(token_windows.shape, dtype=np.float32)
    for row, window in enumerate(token_windows):
        strength = rng.uniform(0.2, 1.0)
        for column, token_id in enumerate(window.tolist()):
            if token_id not in vocabulary:
                vocabulary[token_id] = rule.fires(tokenizer.decode([token_id]))
            if vocabulary[token_id]:
                activations[row, column] = strength * rng.uniform(0.8, 1.2)
    maxima = activations.max(axis=1)
    firing = np.flatnonzero(maxima > 0)
    silent = np.flatnonzero(maxima == 0)
    order = firing[np.argsort(-maxima[firing], kind="stable")]
    chosen: list[PlantedWindow] = []

    def add(row: int, kind: str, quantile_bin: int | None, rank: int) -> None:
        chosen.append(
            PlantedWindow(
                token_windows[row].tolist(), activations[row].tolist(), kind, quantile_bin, rank
            )
        )

    for rank, row in enumerate(order[:n_top]):
        add(int(row), "top", None, rank)
    rest = order[n_top:][::-1]
    for quantile_bin, members in enumerate(np.array_split(rest, n_quantiles)):
        picked = rng.sample(members.tolist(), min(per_quantile, len(members)))
        for rank, row in enumerate(picked):
            add(row, "quantile", quantile_bin, rank)
    for rank, row in enumerate(rng.sample(silent.tolist(), min(n_random, len(silent)))):
        add(row, "random", None, rank)
    return chosen


def to_latent_examples(
    windows: list[PlantedWindow], tokenizer: Any, latent_id: int | None = None
) -> LatentExamples:
    return LatentExamples(
        latent_id,
        [
            Window(
                tuple(token_strings(tokenizer, window.token_ids)),
                tuple(window.activations),
                window.kind,
                window.quantile_bin,
            )
            for window in windows
        ],
    )
