"""Loading what the report needs from the store into plain dataclasses of numpy arrays.

One read session pulls a run's SAEs, their latents' firing statistics, the stored matchings,
the latest explanation per latent and explainer, and the latest score per latent, explainer,
scorer, control and explanation source. Everything downstream (statistics, plots, HTML)
works on these arrays and never touches the store.

Matchings: a pair stored in one direction only (A into B) also gives B into A, since the
inverse of an optimal assignment is optimal; such a pair is marked `derived`.

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

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.engine import Store
from service.store.models import Example, Explanation, Latent, Match, MatchPair, Run, Sae, Score
from service.store.results import get_run

CONTROL_OWN = "own"
CONTROL_SHUFFLED = "shuffled"
CONTROL_CROSS_SEED = "cross_seed"
# The number each scorer is judged by; scorers not named use balanced accuracy. The embedding
# scorer ranks windows by cosine and has no yes/no answers, so its number is the AUC.
PRIMARY_METRIC = {"embedding": "auc"}
DEFAULT_METRIC = "balanced_accuracy"


def primary_metric(scorer: str) -> str:
    return PRIMARY_METRIC.get(scorer, DEFAULT_METRIC)


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
class PairData:
    """SAE A's latents matched into SAE B: partners and cosines per latent of A."""

    seed_a: int
    seed_b: int
    threshold: float
    partner_decoder: np.ndarray
    cos_decoder: np.ndarray
    partner_encoder: np.ndarray
    cos_encoder: np.ndarray
    derived: bool = False

    @property
    def shared(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (self.cos_decoder > self.threshold) & (self.cos_encoder > self.threshold)

    @property
    def decoder_only(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.cos_decoder > self.threshold

    @property
    def agree(self) -> np.ndarray:
        return (self.partner_decoder == self.partner_encoder) & (self.partner_decoder >= 0)

    def reversed(self, n_b: int) -> PairData:
        """B's latents matched into A, from the same two assignments."""

        def invert(partner: np.ndarray, cosine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            inverse = np.full(n_b, -1, dtype=np.int64)
            inverse_cos = np.full(n_b, np.nan)
            valid = np.flatnonzero((partner >= 0) & (partner < n_b))
            inverse[partner[valid]] = valid
            inverse_cos[partner[valid]] = cosine[valid]
            return inverse, inverse_cos

        partner_decoder, cos_decoder = invert(self.partner_decoder, self.cos_decoder)
        partner_encoder, cos_encoder = invert(self.partner_encoder, self.cos_encoder)
        return PairData(
            self.seed_b,
            self.seed_a,
            self.threshold,
            partner_decoder,
            cos_decoder,
            partner_encoder,
            cos_encoder,
            derived=True,
        )


@dataclass
class HookpointData:
    """The SAEs of one hookpoint (one per seed) and every ordered pair's matching."""

    hookpoint: str
    saes: dict[int, SaeData]
    pairs: dict[tuple[int, int], PairData] = field(default_factory=dict)

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

    def for_sae(self, sae_id: int) -> ScoreData:
        keep = self.sae_id == sae_id
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
                )
            ),
        )

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

    def score_sets(self, control: str = CONTROL_OWN) -> list[ScoreData]:
        return [score for score in self.scores if score.control == control]

    def find_scores(self, explainer: str, scorer: str, control: str) -> ScoreData | None:
        for score in self.scores:
            if (score.explainer, score.scorer, score.control) == (explainer, scorer, control):
                return score
        return None


def _float_or_nan(value: float | int | None) -> float:
    return float("nan") if value is None else float(value)


def _load_saes(session: Session, run: Run) -> list[SaeData]:
    saes = session.scalars(select(Sae).where(Sae.run_id == run.id).order_by(Sae.id)).all()
    result = []
    for sae in saes:
        ids = np.full(sae.n_latents, -1, dtype=np.int64)
        count = np.full(sae.n_latents, np.nan)
        frequency = np.full(sae.n_latents, np.nan)
        maximum = np.full(sae.n_latents, np.nan)
        rows = session.execute(
            select(
                Latent.index,
                Latent.id,
                Latent.firing_count,
                Latent.firing_frequency,
                Latent.max_activation,
            ).where(Latent.sae_id == sae.id)
        )
        for index, latent_id, firing_count, firing_frequency, max_activation in rows:
            ids[index] = latent_id
            count[index] = _float_or_nan(firing_count)
            frequency[index] = _float_or_nan(firing_frequency)
            maximum[index] = _float_or_nan(max_activation)
        result.append(
            SaeData(
                sae.id,
                sae.seed,
                sae.hookpoint,
                sae.n_latents,
                sae.fvu,
                sae.l0,
                sae.dead_fraction,
                ids,
                count,
                frequency,
                maximum,
            )
        )
    return result


def _load_pair(session: Session, pair: MatchPair, n_a: int, seed_a: int, seed_b: int) -> PairData:
    partner_decoder = np.full(n_a, -1, dtype=np.int64)
    partner_encoder = np.full(n_a, -1, dtype=np.int64)
    cos_decoder = np.full(n_a, np.nan)
    cos_encoder = np.full(n_a, np.nan)
    rows = session.execute(
        select(
            Match.latent_index_a,
            Match.partner_decoder,
            Match.cos_decoder,
            Match.partner_encoder,
            Match.cos_encoder,
        ).where(Match.pair_id == pair.id)
    )
    for index, p_decoder, c_decoder, p_encoder, c_encoder in rows:
        partner_decoder[index] = p_decoder
        cos_decoder[index] = _float_or_nan(c_decoder) if p_decoder >= 0 else np.nan
        partner_encoder[index] = p_encoder
        cos_encoder[index] = _float_or_nan(c_encoder) if p_encoder >= 0 else np.nan
    return PairData(
        seed_a,
        seed_b,
        pair.threshold,
        partner_decoder,
        cos_decoder,
        partner_encoder,
        cos_encoder,
    )


def _group_hookpoints(session: Session, saes: list[SaeData]) -> list[HookpointData]:
    by_id = {sae.id: sae for sae in saes}
    groups: dict[str, HookpointData] = {}
    for sae in saes:
        groups.setdefault(sae.hookpoint, HookpointData(sae.hookpoint, {})).saes[sae.seed] = sae
    if not by_id:
        return []
    stored = session.scalars(
        select(MatchPair).where(MatchPair.sae_a_id.in_(by_id)).order_by(MatchPair.id)
    ).all()
    for pair in stored:
        sae_a, sae_b = by_id[pair.sae_a_id], by_id.get(pair.sae_b_id)
        if sae_b is None or sae_b.hookpoint != sae_a.hookpoint:
            continue
        group = groups[sae_a.hookpoint]
        group.pairs[(sae_a.seed, sae_b.seed)] = _load_pair(
            session, pair, sae_a.n_latents, sae_a.seed, sae_b.seed
        )
    for group in groups.values():
        for (a, b), pair_data in list(group.pairs.items()):
            if (b, a) not in group.pairs:
                group.pairs[(b, a)] = pair_data.reversed(group.saes[b].n_latents)
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
    session: Session, sae_ids: list[int], keys: dict[int, tuple[int, int]]
) -> dict[str, dict[tuple[int, int], str]]:
    latest = (
        select(func.max(Explanation.id))
        .join(Latent, Latent.id == Explanation.latent_id)
        .where(Latent.sae_id.in_(sae_ids))
        .group_by(Explanation.latent_id, Explanation.explainer)
    )
    rows = session.execute(
        select(Explanation.explainer, Explanation.latent_id, Explanation.text).where(
            Explanation.id.in_(latest)
        )
    )
    explanations: dict[str, dict[tuple[int, int], str]] = {}
    for explainer, latent_id, text in rows:
        if text and latent_id in keys:
            explanations.setdefault(explainer, {})[keys[latent_id]] = text
    return explanations


def _load_scores(
    session: Session, sae_ids: list[int], keys: dict[int, tuple[int, int]]
) -> list[ScoreData]:
    latest = (
        select(func.max(Score.id))
        .join(Explanation, Explanation.id == Score.explanation_id)
        .join(Latent, Latent.id == Score.latent_id)
        .where(Latent.sae_id.in_(sae_ids))
        .group_by(
            Score.latent_id,
            Explanation.explainer,
            Score.scorer,
            Score.control,
            Explanation.latent_id,
        )
    )
    rows = session.execute(
        select(
            Explanation.explainer,
            Score.scorer,
            Score.control,
            Score.latent_id,
            Explanation.latent_id,
            Score.balanced_accuracy,
            Score.auc,
            Score.f1,
            Score.n_examples,
            Score.n_failed,
        )
        .join(Explanation, Explanation.id == Score.explanation_id)
        .where(Score.id.in_(latest))
        .order_by(Score.id)
    )
    grouped: dict[tuple[str, str, str], list[tuple[int, int, int, int, float, int, int]]] = {}
    for explainer, scorer, control, latent_id, source_id, accuracy, auc, f1, n, failed in rows:
        if latent_id not in keys:
            continue
        metric = primary_metric(scorer)
        value = {"balanced_accuracy": accuracy, "auc": auc, "f1": f1}[metric]
        sae_id, index = keys[latent_id]
        source_sae, source_index = keys.get(source_id, (-1, -1))
        grouped.setdefault((explainer, scorer, control), []).append(
            (sae_id, index, source_sae, source_index, _float_or_nan(value), n, failed)
        )
    scores = []
    for (explainer, scorer, control), entries in sorted(grouped.items()):
        columns = list(zip(*entries, strict=True))
        scores.append(
            ScoreData(
                explainer,
                scorer,
                control,
                primary_metric(scorer),
                sae_id=np.array(columns[0], dtype=np.int64),
                latent_index=np.array(columns[1], dtype=np.int64),
                source_sae_id=np.array(columns[2], dtype=np.int64),
                source_index=np.array(columns[3], dtype=np.int64),
                value=np.array(columns[4], dtype=np.float64),
                n_examples=np.array(columns[5], dtype=np.int64),
                n_failed=np.array(columns[6], dtype=np.int64),
            )
        )
    return scores


def load_run_data(store: Store, run_name: str) -> RunData:
    """Read everything the report needs about the run `run_name` (UserError if unknown).

    A run without SAEs, matchings or scores loads fine, with those parts empty."""
    with store.read_session() as session:
        run = get_run(session, run_name)
        saes = _load_saes(session, run)
        sae_ids = [sae.id for sae in saes]
        keys = _latent_keys(saes)
        hookpoints = _group_hookpoints(session, saes)
        explanations = _load_explanations(session, sae_ids, keys) if sae_ids else {}
        scores = _load_scores(session, sae_ids, keys) if sae_ids else []
        n_examples = (
            int(
                session.scalar(
                    select(func.count())
                    .select_from(Example)
                    .join(Latent, Latent.id == Example.latent_id)
                    .where(Latent.sae_id.in_(sae_ids))
                )
                or 0
            )
            if sae_ids
            else 0
        )
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
    return RunData(info, hookpoints, explanations, scores, n_examples)
