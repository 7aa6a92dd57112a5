"""Per-latent values of one hookpoint's SAEs as flat columns (seeds concatenated in seed
order, the order of `HookpointData.match_groups`), and the per-match-group values the tests
take as their units."""

from __future__ import annotations

import numpy as np

from service.report.data import HookpointData, ScoreData
from service.report.statistics import unit_means


class Columns:
    """Per-latent values of one hookpoint's SAEs, concatenated over seeds."""

    def __init__(self, group: HookpointData):
        self.group = group
        self.seeds = group.seeds
        self.match_groups = group.match_groups()

    def gather(self, per_seed: dict[int, np.ndarray | None], fill: float = np.nan) -> np.ndarray:
        parts = []
        for seed in self.seeds:
            values = per_seed.get(seed)
            n = self.group.saes[seed].n_latents
            parts.append(np.full(n, fill) if values is None else values.astype(np.float64))
        return np.concatenate(parts) if parts else np.zeros(0)

    def scores(self, data: ScoreData | None) -> np.ndarray:
        if data is None:
            return self.gather({})
        return self.gather(
            {
                seed: data.for_sae(sae.id).dense(sae.n_latents)
                for seed, sae in self.group.saes.items()
            }
        )


def group_values(values: np.ndarray, groups: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per group of `ids`: the mean of its latents' finite `values` (NaN: none)."""
    present, means, _ = unit_means(values, groups)
    result = np.full(ids.size, np.nan)
    if not present.size:
        return result
    where = np.searchsorted(present, ids)
    found = (where < present.size) & (present[np.minimum(where, present.size - 1)] == ids)
    result[found] = means[where[found]]
    return result


def log_frequency(frequency: np.ndarray) -> np.ndarray:
    """log10 of firing frequencies; NaN for a latent that never fired or is unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(frequency > 0, np.log10(frequency), np.nan)
