"""Multi-seed analysis: which latents of each SAE recur in the SAEs of the other seeds.

For S SAEs every unordered pair is matched once (`sae.matching`); the other direction is the
inverse of the same assignments. Per base SAE, a latent is *present* in another SAE when it is
shared with it (both cosines > threshold), and always in its own SAE, so it is present in
1..S SAEs. Reported, averaged over base SAEs:
- how many latents are present in exactly m SAEs, m = 1..S;
- the fraction present only in the base SAE when the base is compared with m - 1 others,
  m = 1..S, averaged over the subsets of other seeds (all of them when few, else a seeded
  random sample).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from sae.checkpoint import SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SaeWeights, load_sae
from sae.errors import UserError
from sae.matching.pair import (
    MatchConfig,
    MatchSummary,
    PairMatch,
    check_compatible,
    match_saes,
    read_assignment,
    write_assignment,
)
from sae.matching.solvers import Progress

SEED_FOLDER = re.compile(r"seed(\d+)$")
MATCHES_FOLDER = "matches"
MAX_SUBSETS = 64


class MultiSeedResult(BaseModel):
    """Everything the multi-seed table shows, for one hookpoint."""

    seeds: list[int]
    n_latents: int
    threshold: float
    pairs: dict[str, MatchSummary] = Field(description="key 'a->b' (seeds) for every ordered pair")
    shared_fraction: list[list[float]] = Field(description="[i][j]: seed i's latents shared with j")
    present_in_exactly: list[float] = Field(
        description="[m-1]: latents present in exactly m SAEs, mean over base SAEs"
    )
    present_in_exactly_fraction: list[float]
    only_in_base_fraction: list[float] = Field(
        description="[m-1]: fraction found only in the base SAE among m SAEs (base + m-1 others)"
    )
    seconds: float


def find_seed_checkpoints(root: Path) -> dict[str, dict[int, Path]]:
    """Map hookpoint -> seed -> checkpoint folder for every `seed<N>` folder under `root`.

    Layout `root/<hookpoint>/seed<N>/`; `root` may also be a single hookpoint's folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the training output folder to --all")
    found: dict[str, dict[int, Path]] = {}
    for weights in sorted([*root.rglob(SPARSIFY_WEIGHTS), *root.rglob(SAELENS_WEIGHTS)]):
        folder = weights.parent
        name_match = SEED_FOLDER.fullmatch(folder.name)
        if name_match is None:
            continue
        hookpoint = folder.parent.name if folder.parent != root else root.name
        found.setdefault(hookpoint, {})[int(name_match.group(1))] = folder
    if not found:
        raise UserError(
            f"no seed<N> checkpoint folders under {root}; expected {root}/<hookpoint>/seed<N>/ "
            f"holding {SPARSIFY_WEIGHTS} or {SAELENS_WEIGHTS}"
        )
    for hookpoint, seeds in found.items():
        if len(seeds) < 2:
            raise UserError(
                f"{root}: hookpoint {hookpoint} has only seed {next(iter(seeds))}; matching "
                "needs at least two seeds of the same SAE"
            )
    return {hookpoint: dict(sorted(seeds.items())) for hookpoint, seeds in sorted(found.items())}


def _subsets(others: list[int], size: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    if math.comb(len(others), size) <= MAX_SUBSETS:
        return list(itertools.combinations(others, size))
    return [tuple(rng.choice(others, size=size, replace=False)) for _ in range(MAX_SUBSETS)]


def presence_statistics(
    shared: dict[tuple[int, int], np.ndarray], seeds: list[int], subset_seed: int = 0
) -> tuple[list[float], list[float]]:
    """(latents present in exactly m SAEs, only-in-base fraction at m SAEs), m = 1..S,
    averaged over base SAEs. `shared[(a, b)]` is the boolean mask over a's latents."""
    count = len(seeds)
    rng = np.random.default_rng(subset_seed)
    exactly = np.zeros(count)
    only_in_base = np.zeros(count)
    for base in seeds:
        others = [seed for seed in seeds if seed != base]
        masks = {other: shared[(base, other)] for other in others}
        present = 1 + sum(mask.astype(np.int64) for mask in masks.values())
        exactly += np.bincount(present, minlength=count + 1)[1:]
        for size in range(count):
            fractions = []
            for subset in _subsets(others, size, rng):
                seen = np.zeros_like(present, dtype=bool)
                for other in subset:
                    seen |= masks[other]
                fractions.append(1.0 - seen.mean())
            only_in_base[size] += float(np.mean(fractions))
    return (exactly / count).tolist(), (only_in_base / count).tolist()


def pair_path(folder: Path, a: int, b: int) -> Path:
    """Where the matching of seed a into seed b is kept between runs."""
    return folder / f"seed{a}-seed{b}.npz"


def match_pair(
    saes: dict[int, SaeWeights],
    a: int,
    b: int,
    config: MatchConfig,
    progress: Progress | None,
    finished: Path | None,
) -> PairMatch:
    """Seed a matched into seed b: read from `finished` when an earlier run saved it under
    an equivalent config, else solved (and saved there, the moment it is done)."""
    if finished is not None:
        saved = read_assignment(pair_path(finished, a, b), config)
        if saved is not None:
            return saved
    match = match_saes(saes[a], saes[b], config, progress, (f"seed {a}", f"seed {b}"))
    if finished is not None:
        finished.mkdir(parents=True, exist_ok=True)
        write_assignment(pair_path(finished, a, b), match)
    return match


def analyse_seeds(
    saes: dict[int, SaeWeights],
    config: MatchConfig | None = None,
    progress: Progress | None = None,
    finished: Path | None = None,
) -> MultiSeedResult:
    """Match every pair of the given seeds' SAEs and compute the multi-seed statistics.

    With `finished`, a folder, each pair's matching is saved there as soon as it is solved and
    reused by later calls: an interrupted analysis resumes at the pair it was solving."""
    config = config or MatchConfig()
    seeds = sorted(saes)
    if len(seeds) < 2:
        raise UserError("multi-seed matching needs at least two seeds")
    first = saes[seeds[0]]
    for seed in seeds[1:]:
        names = (f"seed {seeds[0]}", f"seed {seed}")
        if saes[seed].n_latents != first.n_latents:
            raise UserError(
                f"{names[0]} has {first.n_latents} latents but {names[1]} has "
                f"{saes[seed].n_latents}; multi-seed analysis compares SAEs of one size, "
                "match differently sized SAEs pairwise with --into-larger"
            )
        check_compatible(first, saes[seed], config, names)
    pairs: dict[tuple[int, int], PairMatch] = {}
    seconds = 0.0
    for a, b in itertools.combinations(seeds, 2):
        match = match_pair(saes, a, b, config, progress, finished)
        pairs[(a, b)] = match
        pairs[(b, a)] = match.reversed()
        seconds += match.summary.seconds
    shared = {key: match.shared for key, match in pairs.items()}
    exactly, only_in_base = presence_statistics(shared, seeds)
    n_latents = first.n_latents
    return MultiSeedResult(
        seeds=seeds,
        n_latents=n_latents,
        threshold=config.threshold,
        pairs={f"{a}->{b}": match.summary for (a, b), match in sorted(pairs.items())},
        shared_fraction=[
            [1.0 if a == b else pairs[(a, b)].summary.shared_fraction for b in seeds] for a in seeds
        ],
        present_in_exactly=exactly,
        present_in_exactly_fraction=[value / max(n_latents, 1) for value in exactly],
        only_in_base_fraction=only_in_base,
        seconds=seconds,
    )


def analyse_folder(
    root: Path, config: MatchConfig | None = None, progress: Progress | None = None
) -> dict[str, MultiSeedResult]:
    """`analyse_seeds` for every hookpoint of a training output folder. Each pair's matching
    is kept in `<hookpoint folder>/matches/` (see `pair_path`), so rerunning after an
    interruption, or with another threshold, solves only the pairs not yet solved."""
    return {
        hookpoint: analyse_seeds(
            {seed: load_sae(path) for seed, path in seeds.items()},
            config,
            progress,
            finished=next(iter(seeds.values())).parent / MATCHES_FOLDER,
        )
        for hookpoint, seeds in find_seed_checkpoints(root).items()
    }
