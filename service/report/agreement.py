"""Explanation agreement across seeds: do two seeds explain their matched latents alike?

For each explainer and each pair of seeds (a, b), a latent of a and its decoder-matched
partner in b form a matched pair when both have an explanation; its agreement is the cosine
of the two explanations' sentence embeddings (`service.scorers.embedder`). The baseline is random
pairs: a latent of a with an explained latent of b that is not its partner, drawn with a
seeded generator. Matched pairs are also split into shared and seed-specific latents of a, so
that one sees whether the latents the seeds share are also explained alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats

from service.report.data import HookpointData
from service.report.statistics import DEFAULT_BOOTSTRAP, Bootstrap, Summary, summarize

Embed = Callable[[Sequence[str]], np.ndarray]


class AgreementSection(BaseModel):
    """Embedding cosine of explanations: matched pairs of two seeds against random pairs."""

    explainer: str
    seed_a: int
    seed_b: int
    matched: Summary = Field(description="latent of seed a and its decoder partner in seed b")
    matched_shared: Summary
    matched_seed_specific: Summary
    random: Summary = Field(description="a latent of seed a and a non-partner of seed b")
    difference: float | None = Field(default=None, description="mean matched - mean random")
    p_value: float | None = Field(default=None, description="Mann-Whitney U, matched vs random")


def _pairs_to_compare(
    group: HookpointData,
    explained: dict[tuple[int, int], str],
    seed_a: int,
    seed_b: int,
    max_random_pairs: int,
    rng: np.random.Generator,
) -> tuple[list[tuple[int, int]], np.ndarray, list[tuple[int, int]]]:
    """(matched index pairs, whether each is shared, random index pairs)."""
    sae_a, sae_b = group.saes[seed_a], group.saes[seed_b]
    pair = group.pairs[(seed_a, seed_b)]
    shared = pair.shared
    explained_a = [i for (sae, i) in explained if sae == sae_a.id]
    explained_b = np.array(sorted(i for (sae, i) in explained if sae == sae_b.id), dtype=np.int64)
    matched = [
        (i, int(pair.partner_decoder[i]))
        for i in sorted(explained_a)
        if pair.partner_decoder[i] >= 0 and (sae_b.id, int(pair.partner_decoder[i])) in explained
    ]
    is_shared = np.array([bool(shared[i]) for i, _ in matched], dtype=bool)
    random_pairs: list[tuple[int, int]] = []
    if explained_a and explained_b.size:
        draws = min(max_random_pairs, len(explained_a) * int(explained_b.size))
        first = rng.choice(np.array(explained_a), size=draws)
        second = rng.choice(explained_b, size=draws)
        random_pairs = [
            (int(i), int(j))
            for i, j in zip(first, second, strict=True)
            if pair.partner_decoder[i] != j
        ]
    return matched, is_shared, random_pairs


def _cosines(
    embed: Embed, cache: dict[str, np.ndarray], *groups: list[tuple[str, str]]
) -> list[np.ndarray]:
    """Cosine of each pair of texts, per group; a text is embedded once, then cached."""
    new = sorted({text for pairs in groups for pair in pairs for text in pair} - cache.keys())
    if new:
        cache.update(zip(new, embed(new), strict=True))
    result = []
    for pairs in groups:
        if not pairs:
            result.append(np.zeros(0))
            continue
        left = np.stack([cache[a] for a, _ in pairs])
        right = np.stack([cache[b] for _, b in pairs])
        result.append(np.einsum("ij,ij->i", left, right).astype(np.float64))
    return result


def explanation_agreement(
    group: HookpointData,
    explanations: dict[str, dict[tuple[int, int], str]],
    embed: Embed,
    *,
    max_random_pairs: int = 2000,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> list[AgreementSection]:
    """One section per explainer and unordered pair of seeds that has matched explained
    latents. `embed` is only called when there is something to compare."""
    sections = []
    cache: dict[str, np.ndarray] = {}
    for explainer, explained in sorted(explanations.items()):
        for seed_a, seed_b in itertools.combinations(group.seeds, 2):
            if (seed_a, seed_b) not in group.pairs:
                continue
            rng = np.random.default_rng(
                [value % 2**32 for value in (bootstrap.seed, seed_a, seed_b)]
            )
            matched, is_shared, random_pairs = _pairs_to_compare(
                group, explained, seed_a, seed_b, max_random_pairs, rng
            )
            if not matched:
                continue
            id_a, id_b = group.saes[seed_a].id, group.saes[seed_b].id
            matched_texts = [(explained[(id_a, i)], explained[(id_b, j)]) for i, j in matched]
            random_texts = [(explained[(id_a, i)], explained[(id_b, j)]) for i, j in random_pairs]
            matched_cos, random_cos = _cosines(embed, cache, matched_texts, random_texts)
            section = AgreementSection(
                explainer=explainer,
                seed_a=seed_a,
                seed_b=seed_b,
                matched=summarize(matched_cos, bootstrap),
                matched_shared=summarize(matched_cos[is_shared], bootstrap),
                matched_seed_specific=summarize(matched_cos[~is_shared], bootstrap),
                random=summarize(random_cos, bootstrap),
            )
            if random_cos.size:
                section.difference = float(matched_cos.mean() - random_cos.mean())
                test = stats.mannwhitneyu(matched_cos, random_cos, alternative="two-sided")
                section.p_value = float(test.pvalue)
            sections.append(section)
    return sections
