"""Loading what the report needs from the store into plain dataclasses of numpy arrays.

One read session pulls a run's SAEs, their latents' firing statistics, the stored matchings,
the latest explanation per latent and explainer, and the latest score per latent, explainer,
scorer, control and explanation source. Everything downstream (statistics, plots, HTML)
works on these arrays and never touches the store. Latents and scores are read as columns
(`service.store.report_reads`), not ORM objects, and windows only counted: at study scale
(4 seeds x 131,072 latents) an object per row cost more than the query.

Matchings are read with `service.store.matches.read_pair`: a pair stored in one direction
only (A into B) also gives B into A, marked `derived`.

Score controls (the `score.control` column): 'own' is the latent's own explanation;
'shuffled' is the explanation of a random other latent of the same SAE (the specificity
control); 'cross_seed' is the explanation of the latent's matched partner in another seed.
Each score row keeps which latent its explanation came from, so the last two can be paired
with the right own scores.

A control's explanation is stored under the latent it explains, by the job that needed it; it
was written from that latent's own windows with the job's config, as that latent's own job
would write it. So "the latest explanation of a latent" may come from another latent's job,
and a latent whose own job never ran still has one (explanation agreement needs exactly these
for matched partners). Each latent keeps one explanation per explainer, whichever job wrote it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.scorers import primary_metric
from service.scorers.metrics import metric_undefined_reason
from service.store.campaigns import campaign_for_run, describe
from service.store.engine import Store
from service.store.matches import StoredPair, read_pair
from service.store.models import (
    CONTROL_OWN,
    Explanation,
    Latent,
    Prediction,
    Run,
    Sae,
)
from service.store.report_reads import ScoreRow, latent_columns, latest_score_rows
from service.store.runs import find_random_control, get_run
from service.store.scores import latest_explanations
from service.store.windows import count_windows, latest_cache_version


@dataclass
class RunInfo:
    name: str
    subject_model: str
    hookpoint: str
    dataset: str
    architecture: str
    n_latents: int
    k: int | None
    seeds: list[int]


@dataclass
class SaeData:
    """One SAE and its latents' firing statistics, indexed by latent index (NaN: unknown)."""

    id: int
    seed: int
    hookpoint: str
    n_latents: int
    fvu: float | None
    l0: float | None
    dead_fraction: float | None
    latent_ids: np.ndarray
    firing_count: np.ndarray
    firing_frequency: np.ndarray
    max_activation: np.ndarray

    @property
    def has_statistics(self) -> bool:
        return bool(np.isfinite(self.firing_count).any())


@dataclass
class HookpointData:
    """The SAEs of one hookpoint (one per seed) and every ordered pair's matching."""

    hookpoint: str
    saes: dict[int, SaeData]
    pairs: dict[tuple[int, int], StoredPair] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.saes)

    def matched_seeds(self, seed: int) -> list[int]:
        return [other for (a, other) in sorted(self.pairs) if a == seed]

    def shared_any(self, seed: int) -> np.ndarray | None:
        """Latents of `seed` shared with at least one other seed; None without matchings."""
        others = self.matched_seeds(seed)
        if not others:
            return None
        mask = np.zeros(self.saes[seed].n_latents, dtype=bool)
        for other in others:
            mask |= self.pairs[(seed, other)].shared
        return mask

    def match_groups(self) -> np.ndarray:
        """A group id per latent, over the seeds' latents concatenated in seed order: the
        connected components of "shared with" (both cosines above the threshold, with the
        decoder partner), so a shared latent and its partners in every seed form one group
        and a latent shared with no seed is a group of its own."""
        offsets = dict(
            zip(
                self.seeds,
                np.cumsum([0] + [self.saes[s].n_latents for s in self.seeds[:-1]]).tolist(),
                strict=True,
            )
        )
        total = sum(sae.n_latents for sae in self.saes.values())
        rows, columns = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for (seed_a, seed_b), pair in self.pairs.items():
            shared = pair.shared & (pair.partner_decoder >= 0)
            rows.append(offsets[seed_a] + pair.indices[shared])
            columns.append(offsets[seed_b] + pair.partner_decoder[shared])
        row, column = np.concatenate(rows), np.concatenate(columns)
        graph = coo_matrix((np.ones(row.size), (row, column)), shape=(total, total))
        _, labels = connected_components(graph, directed=False)
        return labels.astype(np.int64)

    def matched_similarity(self, seed: int) -> np.ndarray | None:
        """Per latent of `seed`: the best, over other seeds, of the smaller of its decoder and
        encoder matched cosines. A latent is shared exactly when this exceeds the threshold."""
        others = self.matched_seeds(seed)
        if not others:
            return None
        best = np.full(self.saes[seed].n_latents, np.nan)
        for other in others:
            pair = self.pairs[(seed, other)]
            both = np.minimum(pair.cos_decoder, pair.cos_encoder)
            best = np.fmax(best, both)
        return best


@dataclass
class ScoreData:
    """The latest score of each latent for one explainer, scorer and control."""

    explainer: str
    scorer: str
    control: str
    metric: str
    sae_id: np.ndarray
    latent_index: np.ndarray
    value: np.ndarray  # the metric; NaN where the scorer could not compute it
    source_sae_id: np.ndarray  # which latent the explanation was written for
    source_index: np.ndarray
    n_examples: np.ndarray
    n_failed: np.ndarray
    # Why the metric is undefined where `value` is NaN ("no negatives", ...); "" elsewhere.
    undefined_reason: np.ndarray

    def for_sae(self, sae_id: int) -> ScoreData:
        return self._where(self.sae_id == sae_id)

    def for_saes(self, sae_ids: Iterable[int]) -> ScoreData:
        return self._where(np.isin(self.sae_id, list(sae_ids)))

    def _where(self, keep: np.ndarray) -> ScoreData:
        return ScoreData(
            self.explainer,
            self.scorer,
            self.control,
            self.metric,
            *(
                array[keep]
                for array in (
                    self.sae_id,
                    self.latent_index,
                    self.value,
                    self.source_sae_id,
                    self.source_index,
                    self.n_examples,
                    self.n_failed,
                    self.undefined_reason,
                )
            ),
        )

    @staticmethod
    def undefined_counts(reasons: np.ndarray) -> dict[str, int]:
        """How many of `reasons` (an `undefined_reason` array) name a reason, by reason."""
        named, counts = np.unique(reasons[reasons != ""].astype(str), return_counts=True)
        return {str(reason): int(count) for reason, count in zip(named, counts, strict=True)}

    def dense(self, n_latents: int) -> np.ndarray:
        """Values indexed by latent index over one SAE (NaN where unscored); call on the
        result of `for_sae`. A latent scored with several explanation sources (shuffled
        controls drawn again) keeps its newest score."""
        values = np.full(n_latents, np.nan)
        # Rows are in score-id order: the last row of each latent is its newest score.
        _, first_from_end = np.unique(self.latent_index[::-1], return_index=True)
        newest = self.latent_index.size - 1 - first_from_end
        values[self.latent_index[newest]] = self.value[newest]
        return values


@dataclass
class RunData:
    """Everything the report reads about one run."""

    run: RunInfo
    hookpoints: list[HookpointData]
    # explainer -> (sae id, latent index) -> latest explanation text
    explanations: dict[str, dict[tuple[int, int], str]]
    scores: list[ScoreData]
    n_examples: int
    # The one campaign the explanations and scores come from (None: nothing scored yet).
    campaign: str | None = None
    campaign_id: int | None = None

    def score_sets(self, control: str = CONTROL_OWN) -> list[ScoreData]:
        return [score for score in self.scores if score.control == control]

    def find_scores(self, explainer: str, scorer: str, control: str) -> ScoreData | None:
        for score in self.scores:
            if (score.explainer, score.scorer, score.control) == (explainer, scorer, control):
                return score
        return None


def _load_saes(session: Session, run: Run) -> list[SaeData]:
    saes = session.scalars(select(Sae).where(Sae.run_id == run.id).order_by(Sae.id)).all()
    result = []
    for sae in saes:
        latents = latent_columns(session, sae.id, sae.n_latents)
        result.append(
            SaeData(
                sae.id,
                sae.seed,
                sae.hookpoint,
                sae.n_latents,
                sae.fvu,
                sae.l0,
                sae.dead_fraction,
                latents.ids,
                latents.firing_count,
                latents.firing_frequency,
                latents.max_activation,
            )
        )
    return result


def _group_hookpoints(session: Session, saes: list[SaeData]) -> list[HookpointData]:
    """The run's SAEs by hookpoint, with every ordered pair of seeds whose matching is stored
    (in either direction)."""
    groups: dict[str, HookpointData] = {}
    for sae in saes:
        groups.setdefault(sae.hookpoint, HookpointData(sae.hookpoint, {})).saes[sae.seed] = sae
    rows = {sae.id: session.get(Sae, sae.id) for sae in saes}
    for group in groups.values():
        for seed_a, seed_b in itertools.permutations(group.seeds, 2):
            sae_a, sae_b = rows[group.saes[seed_a].id], rows[group.saes[seed_b].id]
            assert sae_a is not None and sae_b is not None
            pair = read_pair(session, sae_a, sae_b)
            if pair is not None:
                group.pairs[(seed_a, seed_b)] = pair
    return [groups[name] for name in sorted(groups)]


def _latent_keys(saes: list[SaeData]) -> dict[int, tuple[int, int]]:
    """latent id -> (sae id, latent index)."""
    keys: dict[int, tuple[int, int]] = {}
    for sae in saes:
        for index, latent_id in enumerate(sae.latent_ids.tolist()):
            if latent_id >= 0:
                keys[latent_id] = (sae.id, index)
    return keys


def _load_explanations(
    session: Session, campaign_id: int, sae_ids: list[int], keys: dict[int, tuple[int, int]]
) -> dict[str, dict[tuple[int, int], str]]:
    of_run = Explanation.latent_id.in_(select(Latent.id).where(Latent.sae_id.in_(sae_ids)))
    explanations: dict[str, dict[tuple[int, int], str]] = {}
    for latent_id, explainer, text in latest_explanations(session, campaign_id, of_run):
        if text and latent_id in keys:
            explanations.setdefault(explainer, {})[keys[latent_id]] = text
    return explanations


def _undefined_reasons(session: Session, undefined: dict[int, str]) -> dict[int, str]:
    """Score id -> why its metric (`undefined`: score id -> metric name) is NULL, from the
    score's stored verdicts."""
    verdicts: dict[int, list[tuple[bool, bool | None, float | None]]] = {
        score_id: [] for score_id in undefined
    }
    ids = list(undefined)
    for start in range(0, len(ids), 1000):
        rows = session.execute(
            select(
                Prediction.score_id, Prediction.label, Prediction.predicted, Prediction.probability
            ).where(Prediction.score_id.in_(ids[start : start + 1000]))
        )
        for score_id, label, predicted, probability in rows:
            verdicts[score_id].append((label, predicted, probability))
    reasons = {}
    for score_id, metric in undefined.items():
        stored = verdicts[score_id]
        reason = metric_undefined_reason(
            metric, [v[0] for v in stored], [v[1] for v in stored], [v[2] for v in stored]
        )
        # Verdicts that support the metric although it is NULL: a score written before
        # metrics were computed this way, or by hand; its reason is not on record.
        reasons[score_id] = reason or "unknown"
    return reasons


def _load_scores(session: Session, campaign_id: int, sae_ids: list[int]) -> list[ScoreData]:
    grouped: dict[tuple[str, str, str], list[ScoreRow]] = {}
    undefined: dict[int, str] = {}
    for row in latest_score_rows(session, campaign_id, sae_ids):
        if getattr(row, primary_metric(row.scorer)) is None:
            undefined[row.score_id] = primary_metric(row.scorer)
        grouped.setdefault((row.explainer, row.scorer, row.control), []).append(row)
    reasons = _undefined_reasons(session, undefined)
    scores = []
    for (explainer, scorer, control), rows in sorted(grouped.items()):
        metric = primary_metric(scorer)
        scores.append(
            ScoreData(
                explainer,
                scorer,
                control,
                metric,
                sae_id=np.array([row.sae_id for row in rows], dtype=np.int64),
                latent_index=np.array([row.index for row in rows], dtype=np.int64),
                source_sae_id=np.array([row.source_sae_id for row in rows], dtype=np.int64),
                source_index=np.array([row.source_index for row in rows], dtype=np.int64),
                # NULL (undefined) becomes NaN.
                value=np.array([getattr(row, metric) for row in rows], dtype=np.float64),
                n_examples=np.array([row.n_examples for row in rows], dtype=np.int64),
                n_failed=np.array([row.n_failed for row in rows], dtype=np.int64),
                undefined_reason=np.array(
                    [reasons.get(row.score_id, "") for row in rows], dtype=object
                ),
            )
        )
    return scores


def load_run_data(store: Store, run_name: str, campaign_id: int | None = None) -> RunData:
    """Read everything the report needs about the run `run_name` (UserError if unknown),
    with the explanations and scores of campaign `campaign_id` (None: the newest campaign
    with scores for the run).

    A run without SAEs, matchings or scores loads fine, with those parts empty."""
    with store.read_session() as session:
        run = get_run(session, run_name)
        saes = _load_saes(session, run)
        sae_ids = [sae.id for sae in saes]
        keys = _latent_keys(saes)
        hookpoints = _group_hookpoints(session, saes)
        campaign = campaign_for_run(session, campaign_id, run.id)
        explanations: dict[str, dict[tuple[int, int], str]] = {}
        scores: list[ScoreData] = []
        if campaign is not None and sae_ids:
            explanations = _load_explanations(session, campaign.id, sae_ids, keys)
            scores = _load_scores(session, campaign.id, sae_ids)
        cache_version = latest_cache_version(session, run.id)
        n_examples = count_windows(session, cache_version.id) if cache_version else 0
        info = RunInfo(
            run.name,
            run.subject_model,
            run.hookpoint,
            run.dataset,
            run.architecture,
            run.n_latents,
            run.k,
            list(run.seeds),
        )
    label = describe(campaign) if campaign is not None else None
    return RunData(
        info,
        hookpoints,
        explanations,
        scores,
        n_examples,
        label,
        campaign.id if campaign is not None else None,
    )


def load_random_control(store: Store, data: RunData) -> RunData | None:
    """The random-model control of the run `data` holds, with the explanations and scores of
    `data`'s campaign (never another's: without a campaign, none); None without a control."""
    with store.read_session() as session:
        control = find_random_control(session, get_run(session, data.run.name))
        name = control.name if control is not None else None
    if name is None:
        return None
    if data.campaign_id is None:
        loaded = load_run_data(store, name, None)
        return RunData(loaded.run, loaded.hookpoints, {}, [], loaded.n_examples)
    return load_run_data(store, name, data.campaign_id)
