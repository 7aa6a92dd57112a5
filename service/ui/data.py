"""What the browser's pages read from the store.

Lists and plots of a run with 131,072 latents per seed must answer in well under a second, so
each SAE's latent columns and its matchings against every other seed are read once into
numpy arrays (`SaeTable`, about 5 MB per 131,072 latents) and kept while the server runs;
filters, sorts and pages are then array operations. A table is read again when a matching of
its SAE is stored anew (the key holds the match pair ids). Scores and explanation texts of a
campaign, which workers keep adding, are kept per SAE under a key that holds the campaign's
newest score and explanation ids, so a new score shows on the next request.

A latent page reads only that latent: its windows by (cache version, latent), its newest
scores by (latent, campaign, scorer), its explanations, and its partners' from the tables.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from sae.errors import UserError
from service.store.campaigns import campaign_for_run, describe
from service.store.matches import StoredPair, read_pair
from service.store.models import (
    CONTROL_OWN,
    Campaign,
    Example,
    Explanation,
    Latent,
    MatchPair,
    Run,
    Sae,
    Score,
)
from service.store.report_reads import latent_columns
from service.store.runs import get_run
from service.store.scores import latest_explanations, latest_scores
from service.store.windows import decode_window, latent_windows

T = TypeVar("T")
SORTS = ("index", "frequency", "count", "max_activation", "presence", "cosine", "score")


class NotFound(UserError):
    """A page asked for something the store does not hold (answered with 404)."""


@dataclass
class SaeTable:
    """One SAE's latents by index, and their matches into each other seed's SAE."""

    sae_id: int
    seed: int
    hookpoint: str
    n_latents: int
    latent_id: np.ndarray
    firing_count: np.ndarray  # float, NaN: not measured
    firing_frequency: np.ndarray
    max_activation: np.ndarray
    pairs: dict[int, StoredPair]  # other seed -> this SAE's latents matched into it
    presence: np.ndarray | None  # seeds holding the latent (itself included); None: not all matched
    shared_any: np.ndarray  # shared with at least one other seed
    best_cosine: np.ndarray  # highest decoder cosine to a partner; NaN: none


@dataclass
class ScoreTable:
    """One SAE's own-explanation scores and explanation texts in one campaign, by index."""

    scores: dict[tuple[str, str], np.ndarray]  # (explainer, scorer) -> balanced accuracy, NaN
    texts: dict[int, str]  # latent index -> its explanations, joined, lower case (search)


class Cache:
    """A small LRU of values computed under a lock, so two requests never build one twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = build()
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value


def run_and_saes(session: Session, run_name: str) -> tuple[Run, list[Sae]]:
    try:
        run = get_run(session, run_name)
    except UserError as error:
        raise NotFound(str(error)) from error
    saes = session.scalars(
        select(Sae).where(Sae.run_id == run.id).order_by(Sae.hookpoint, Sae.seed)
    )
    return run, list(saes)


def pick_hookpoint(saes: list[Sae], hookpoint: str | None) -> tuple[str, list[Sae]]:
    """The SAEs at `hookpoint` (None: the run's first hookpoint), by seed."""
    hookpoints = sorted({sae.hookpoint for sae in saes})
    if not hookpoints:
        raise NotFound("this run has no SAEs yet: run `autointerp train` first")
    chosen = hookpoint or hookpoints[0]
    if chosen not in hookpoints:
        raise NotFound(f"no hookpoint {chosen!r} in this run (it has {', '.join(hookpoints)})")
    return chosen, [sae for sae in saes if sae.hookpoint == chosen]


def sae_key(session: Session, sae: Sae) -> tuple[int, ...]:
    """What an SAE's cached table depends on: the SAE and its stored matchings (a matching
    stored anew gets a new id)."""
    rows = session.scalars(
        select(MatchPair.id).where(or_(MatchPair.sae_a_id == sae.id, MatchPair.sae_b_id == sae.id))
    )
    return (sae.id, *sorted(rows))


def _read_table(session: Session, sae: Sae, others: list[Sae]) -> SaeTable:
    columns = latent_columns(session, sae.id, sae.n_latents)
    if (columns.ids < 0).any():
        raise UserError(f"SAE {sae.id} does not hold latents 0 to {sae.n_latents - 1}")
    pairs = {}
    for other in others:
        pair = read_pair(session, sae, other)
        if pair is not None:
            pairs[other.seed] = pair
    shared_any = np.zeros(sae.n_latents, dtype=bool)
    for pair in pairs.values():
        shared_any |= pair.shared
    best = np.full(sae.n_latents, -np.inf)
    for pair in pairs.values():
        best = np.fmax(best, pair.cos_decoder)
    complete = bool(others) and len(pairs) == len(others)
    presence = (
        (1 + sum(pair.shared.astype(np.int64) for pair in pairs.values())) if complete else None
    )
    return SaeTable(
        sae_id=sae.id,
        seed=sae.seed,
        hookpoint=sae.hookpoint,
        n_latents=sae.n_latents,
        latent_id=columns.ids,
        firing_count=columns.firing_count,
        firing_frequency=columns.firing_frequency,
        max_activation=columns.max_activation,
        pairs=pairs,
        presence=presence if isinstance(presence, np.ndarray) else None,
        shared_any=shared_any,
        best_cosine=np.where(np.isneginf(best), np.nan, best),
    )


def sae_table(cache: Cache, session: Session, sae: Sae, group: list[Sae]) -> SaeTable:
    """The SAE's table, from `cache` unless one of its matchings was stored since."""
    others = [other for other in group if other.id != sae.id]
    key = ("sae", *sae_key(session, sae))
    return cache.get(key, lambda: _read_table(session, sae, others))


def _positions(table: SaeTable, latent_ids: np.ndarray) -> np.ndarray:
    """Each latent id's index in the SAE, -1 for ids of other SAEs."""
    order = np.argsort(table.latent_id)
    sorted_ids = table.latent_id[order]
    at = np.clip(np.searchsorted(sorted_ids, latent_ids), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == latent_ids, order[at], -1)


def _read_scores(session: Session, campaign_id: int, table: SaeTable) -> ScoreTable:
    # A range of latent ids walks the (latent_id, ...) indexes; ids in the range that belong
    # to another SAE are dropped by `_positions`. Rows are handled as arrays, not one by one.
    low, high = int(table.latent_id.min()), int(table.latent_id.max())
    explanations = session.execute(
        select(Explanation.id, Explanation.latent_id, Explanation.explainer, Explanation.text)
        .where(
            Explanation.campaign_id == campaign_id,
            Explanation.latent_id.between(low, high),
        )
        .order_by(Explanation.latent_id, Explanation.explainer)
    ).all()
    texts: dict[int, str] = {}
    explainer_of: dict[int, str] = {}
    if explanations:
        ids, latents, explainers, bodies = zip(*explanations, strict=True)
        for explanation_id, index, explainer, body in zip(
            ids, _positions(table, np.asarray(latents)).tolist(), explainers, bodies, strict=True
        ):
            if index >= 0:
                explainer_of[explanation_id] = explainer
                texts[index] = f"{texts.get(index, '')}\n{body.lower()}"
    rows = session.execute(
        select(Score.latent_id, Score.explanation_id, Score.scorer, Score.balanced_accuracy)
        .where(
            Score.latent_id.between(low, high),
            Score.campaign_id == campaign_id,
            Score.control == CONTROL_OWN,
        )
        .order_by(Score.id)
    ).all()
    scores: dict[tuple[str, str], np.ndarray] = {}
    if not rows:
        return ScoreTable(scores, texts)
    latents, explanation_ids, scorers, values = zip(*rows, strict=True)
    position = _positions(table, np.asarray(latents))
    by = np.array([explainer_of.get(e, "") for e in explanation_ids], dtype=object)
    scorer_of = np.array(scorers, dtype=object)
    value = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    for explainer in set(explainer_of.values()):
        for scorer in set(scorers):
            chosen = np.flatnonzero((by == explainer) & (scorer_of == scorer) & (position >= 0))
            if not len(chosen):
                continue
            # Rows are oldest first: a latent scored again keeps its newest (last) value.
            last = chosen[::-1][np.unique(position[chosen[::-1]], return_index=True)[1]]
            column = np.full(table.n_latents, np.nan)
            column[position[last]] = value[last]
            scores[(explainer, scorer)] = column
    return ScoreTable(scores, texts)


def score_table(cache: Cache, session: Session, campaign_id: int, table: SaeTable) -> ScoreTable:
    newest = session.execute(
        select(
            select(func.max(Score.id)).where(Score.campaign_id == campaign_id).scalar_subquery(),
            select(func.max(Explanation.id))
            .where(Explanation.campaign_id == campaign_id)
            .scalar_subquery(),
        )
    ).one()
    key = ("scores", table.sae_id, campaign_id, tuple(newest))
    return cache.get(key, lambda: _read_scores(session, campaign_id, table))


def _has_scores(session: Session, campaign_id: int, run: Run) -> bool:
    of_run = select(Latent.id).join(Sae, Sae.id == Latent.sae_id).where(Sae.run_id == run.id)
    found = session.scalar(
        select(Score.id)
        .where(Score.campaign_id == campaign_id, Score.latent_id.in_(of_run))
        .limit(1)
    )
    return found is not None


def choose_campaign(
    cache: Cache, session: Session, run: Run, campaign_id: int | None
) -> Campaign | None:
    """Campaign `campaign_id`, or the newest with scores of the run's latents. The newest is
    remembered per run, so a request asks only about campaigns created since (scanning every
    score for the run's latents takes a second at 131,072 latents per seed)."""
    if campaign_id is not None:
        try:
            return campaign_for_run(session, campaign_id, run.id)
        except UserError as error:
            raise NotFound(str(error)) from error
    known: dict[str, int] = cache.get(("campaign", run.id), dict)
    checked, chosen = known.get("checked", 0), known.get("chosen")
    newer = session.scalars(
        select(Campaign.id).where(Campaign.id > checked).order_by(Campaign.id.desc())
    ).all()
    for candidate in newer:
        if _has_scores(session, candidate, run):
            chosen = candidate
            break
    # Campaigns checked and found without scores are asked again next time: their first
    # scores may come in later.
    if chosen is not None:
        known["chosen"] = known["checked"] = chosen
    return session.get(Campaign, chosen) if chosen is not None else None


# ---------------------------------------------------------------------------------------------
# The latent list


@dataclass
class ListQuery:
    seed: int | None = None
    status: str = ""  # "", "shared", "specific"
    presence: int | None = None
    freq_min: float | None = None
    freq_max: float | None = None
    score: str = ""  # "explainer/scorer" the range and the score column use
    score_min: float | None = None
    score_max: float | None = None
    search: str = ""
    alone: tuple[int, ...] = ()  # seeds the latent is shared with none of
    sort: str = "index"
    descending: bool = False
    page: int = 1


@dataclass
class ListRow:
    seed: int
    index: int
    firing_count: float
    firing_frequency: float
    max_activation: float
    presence: int | None
    cosine: float
    score: float
    explanations: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ListPage:
    rows: list[ListRow]
    total: int
    pages: int
    score_columns: list[str]


def _mask(
    table: SaeTable, scores: ScoreTable | None, score_key: tuple[str, str] | None, query: ListQuery
) -> np.ndarray:
    keep = np.ones(table.n_latents, dtype=bool)
    if query.status == "shared":
        keep &= table.shared_any
    elif query.status == "specific":
        keep &= ~table.shared_any & bool(table.pairs)
    if query.presence is not None:
        keep &= table.presence == query.presence if table.presence is not None else False
    for seed in query.alone:
        pair = table.pairs.get(seed)
        keep &= ~pair.shared if pair is not None else False
    with np.errstate(invalid="ignore"):
        if query.freq_min is not None:
            keep &= table.firing_frequency >= query.freq_min
        if query.freq_max is not None:
            keep &= table.firing_frequency <= query.freq_max
        if query.score_min is not None or query.score_max is not None:
            column = _score_column(table, scores, score_key)
            if query.score_min is not None:
                keep &= column >= query.score_min
            if query.score_max is not None:
                keep &= column <= query.score_max
    if query.search:
        needle = query.search.lower()
        found = np.zeros(table.n_latents, dtype=bool)
        if scores is not None:
            hits = [index for index, text in scores.texts.items() if needle in text]
            found[hits] = True
        keep &= found
    return keep


def _score_column(
    table: SaeTable, scores: ScoreTable | None, key: tuple[str, str] | None
) -> np.ndarray:
    if scores is None or key is None or key not in scores.scores:
        return np.full(table.n_latents, np.nan)
    return scores.scores[key]


def _sort_values(table: SaeTable, column: str, score: np.ndarray) -> np.ndarray:
    values: dict[str, Callable[[], np.ndarray]] = {
        "index": lambda: np.arange(table.n_latents, dtype=np.float64),
        "frequency": lambda: table.firing_frequency,
        "count": lambda: table.firing_count,
        "max_activation": lambda: table.max_activation,
        "presence": lambda: (
            table.presence.astype(np.float64)
            if table.presence is not None
            else np.full(table.n_latents, np.nan)
        ),
        "cosine": lambda: table.best_cosine,
        "score": lambda: score,
    }
    return values[column]()


def list_latents(
    cache: Cache,
    session: Session,
    group: list[Sae],
    campaign_id: int | None,
    query: ListQuery,
    page_size: int,
) -> ListPage:
    """One page of the latents of the SAEs in `group` (one hookpoint) that `query` keeps."""
    saes = [sae for sae in group if query.seed is None or sae.seed == query.seed]
    if not saes:
        raise NotFound(f"no seed {query.seed} at this hookpoint")
    tables = [sae_table(cache, session, sae, group) for sae in saes]
    score_tables = [
        score_table(cache, session, campaign_id, table) if campaign_id is not None else None
        for table in tables
    ]
    columns = sorted({key for scores in score_tables if scores for key in scores.scores})
    score_key = None
    if query.score:
        explainer, _, scorer = query.score.partition("/")
        score_key = (explainer, scorer)
    elif columns:
        score_key = columns[0]
    seeds, indices, keys = [], [], []
    for table, scores in zip(tables, score_tables, strict=True):
        keep = np.flatnonzero(_mask(table, scores, score_key, query))
        score = _score_column(table, scores, score_key)
        seeds.append(np.full(len(keep), table.seed))
        indices.append(keep)
        keys.append(_sort_values(table, query.sort, score)[keep])
    seed_of, index_of = np.concatenate(seeds), np.concatenate(indices)
    key = np.concatenate(keys)
    # Undefined values (NaN) sort last either way; ties by seed, then index.
    primary = np.where(np.isnan(key), np.inf, -key if query.descending else key)
    order = np.lexsort((index_of, seed_of, primary))
    total = len(order)
    pages = max(1, -(-total // page_size))
    start = (min(max(query.page, 1), pages) - 1) * page_size
    chosen = order[start : start + page_size]
    by_seed = {
        table.seed: (table, scores) for table, scores in zip(tables, score_tables, strict=True)
    }
    rows = []
    for position in chosen:
        table, scores = by_seed[int(seed_of[position])]
        index = int(index_of[position])
        score = _score_column(table, scores, score_key)
        rows.append(
            ListRow(
                seed=table.seed,
                index=index,
                firing_count=float(table.firing_count[index]),
                firing_frequency=float(table.firing_frequency[index]),
                max_activation=float(table.max_activation[index]),
                presence=int(table.presence[index]) if table.presence is not None else None,
                cosine=float(table.best_cosine[index]),
                score=float(score[index]),
            )
        )
    if campaign_id is not None and rows:
        ids = {int(by_seed[row.seed][0].latent_id[row.index]): row for row in rows}
        for latent_id, explainer, text in latest_explanations(
            session, campaign_id, Explanation.latent_id.in_(list(ids))
        ):
            ids[latent_id].explanations.append((explainer, text))
    return ListPage(rows, total, pages, [f"{e}/{s}" for e, s in columns])


# ---------------------------------------------------------------------------------------------
# One latent


@dataclass
class Window:
    kind: str
    quantile_bin: int | None
    rank: int
    tokens: list[tuple[str, float]]  # (text, activation)
    max_activation: float


@dataclass
class ScoreLine:
    explainer: str
    scorer: str
    control: str
    source: str  # whose explanation was tested: "own", or "seed S latent I"
    balanced_accuracy: float | None
    f1: float | None
    auc: float | None
    n_examples: int
    n_failed: int


@dataclass
class PartnerView:
    seed: int
    decoder_partner: int | None
    cos_decoder: float | None
    encoder_partner: int | None
    cos_encoder: float | None
    shared: bool
    agree: bool
    explanations: list[tuple[str, str]]
    windows: list[Window]


@dataclass
class LatentPage:
    run: str
    hookpoint: str
    seed: int
    index: int
    n_latents: int
    firing_count: int | None
    firing_frequency: float | None
    max_activation: float | None
    presence: int | None
    campaign: str | None
    explanations: list[tuple[str, str]]
    scores: list[ScoreLine]
    windows: list[Window]
    histogram: tuple[list[int], list[float]]  # counts per bin, bin edges
    partners: list[PartnerView]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _windows(
    session: Session, latent_id: int, tokens: Callable[[list[int]], list[str]], limit: int | None
) -> list[Window]:
    # Non-firing ("random") windows are the scorers' negatives; the page shows firing ones.
    query = (
        latent_windows(latent_id)
        .where(Example.kind != "random")
        .order_by(Example.kind.desc(), Example.quantile_bin.desc(), Example.rank)
    )
    if limit is not None:
        query = query.where(Example.kind == "top").limit(limit)
    windows = []
    for row in session.scalars(query):
        token_ids, activations = decode_window(row.token_ids, row.activations)
        texts = tokens(token_ids.tolist())
        windows.append(
            Window(
                row.kind,
                row.quantile_bin,
                row.rank,
                [(text, float(value)) for text, value in zip(texts, activations, strict=True)],
                row.max_activation,
            )
        )
    return windows


def _histogram(windows: list[Window], bins: int = 20) -> tuple[list[int], list[float]]:
    values = np.array([value for window in windows for _, value in window.tokens if value > 0])
    if values.size == 0:
        return [], []
    counts, edges = np.histogram(values, bins=bins)
    return counts.tolist(), edges.tolist()


def _explanations(
    session: Session, campaign_id: int | None, latent_id: int
) -> list[tuple[str, str]]:
    if campaign_id is None:
        return []
    return [
        (explainer, text)
        for _, explainer, text in latest_explanations(
            session, campaign_id, Explanation.latent_id == latent_id
        )
    ]


def _score_lines(session: Session, campaign_id: int | None, latent_id: int) -> list[ScoreLine]:
    if campaign_id is None:
        return []
    lines = latest_scores(session, campaign_id, [latent_id])
    sources = {line.source_latent_id for line in lines} - {latent_id}
    where = {
        latent: f"seed {seed} latent {index}"
        for latent, seed, index in session.execute(
            select(Latent.id, Sae.seed, Latent.index)
            .join(Sae, Sae.id == Latent.sae_id)
            .where(Latent.id.in_(sources))
        )
    }
    out = [
        ScoreLine(
            line.explainer,
            line.score.scorer,
            line.score.control,
            "own" if line.source_latent_id == latent_id else str(where[line.source_latent_id]),
            line.score.balanced_accuracy,
            line.score.f1,
            line.score.auc,
            line.score.n_examples,
            line.score.n_failed,
        )
        for line in lines
    ]
    return sorted(out, key=lambda line: (line.explainer, line.scorer, line.control, line.source))


def latent_page(
    cache: Cache,
    session: Session,
    run: Run,
    group: list[Sae],
    seed: int,
    index: int,
    campaign: Campaign | None,
    tokens: Callable[[list[int]], list[str]],
    partner_contexts: int,
) -> LatentPage:
    by_seed = {sae.seed: sae for sae in group}
    if seed not in by_seed:
        raise NotFound(f"no seed {seed} at hookpoint {group[0].hookpoint} of run {run.name!r}")
    sae = by_seed[seed]
    if not 0 <= index < sae.n_latents:
        raise NotFound(
            f"latent {index} does not exist: seed {seed} has latents 0 to {sae.n_latents - 1}"
        )
    table = sae_table(cache, session, sae, group)
    latent_id = int(table.latent_id[index])
    campaign_id = campaign.id if campaign is not None else None
    windows = _windows(session, latent_id, tokens, None)
    partners = []
    for other_seed, pair in sorted(table.pairs.items()):
        decoder = int(pair.partner_decoder[index])
        encoder = int(pair.partner_encoder[index])
        partner = PartnerView(
            seed=other_seed,
            decoder_partner=decoder if decoder >= 0 else None,
            cos_decoder=_finite(pair.cos_decoder[index]),
            encoder_partner=encoder if encoder >= 0 else None,
            cos_encoder=_finite(pair.cos_encoder[index]),
            shared=bool(pair.shared[index]),
            agree=bool(pair.agree[index]),
            explanations=[],
            windows=[],
        )
        if partner.decoder_partner is not None:
            other = sae_table(cache, session, by_seed[other_seed], group)
            other_id = int(other.latent_id[partner.decoder_partner])
            partner.explanations = _explanations(session, campaign_id, other_id)
            partner.windows = _windows(session, other_id, tokens, partner_contexts)
        partners.append(partner)
    return LatentPage(
        run=run.name,
        hookpoint=sae.hookpoint,
        seed=seed,
        index=index,
        n_latents=sae.n_latents,
        firing_count=None
        if math.isnan(table.firing_count[index])
        else int(table.firing_count[index]),
        firing_frequency=_finite(table.firing_frequency[index]),
        max_activation=_finite(table.max_activation[index]),
        presence=int(table.presence[index]) if table.presence is not None else None,
        campaign=describe(campaign) if campaign is not None else None,
        explanations=_explanations(session, campaign_id, latent_id),
        scores=_score_lines(session, campaign_id, latent_id),
        windows=windows,
        histogram=_histogram(windows),
        partners=partners,
    )


# ---------------------------------------------------------------------------------------------
# The run page


@dataclass
class PairRow:
    seed_a: int
    seed_b: int
    n_latents: int
    shared: int
    decoder_only: int
    agree: int
    mean_cos_decoder: float | None
    mean_cos_encoder: float | None


@dataclass
class RunSummary:
    tables: list[SaeTable]
    pairs: list[PairRow]
    presence: dict[int, list[int]]  # seed -> latents present in exactly m seeds, m = 1..S
    alone: dict[int, list[float]]  # seed -> fraction not shared with its first n other seeds


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def run_summary(cache: Cache, session: Session, group: list[Sae]) -> RunSummary:
    tables = [sae_table(cache, session, sae, group) for sae in group]
    pairs = []
    for table in tables:
        for other, pair in sorted(table.pairs.items()):
            if other > table.seed:
                pairs.append(
                    PairRow(
                        table.seed,
                        other,
                        table.n_latents,
                        int(pair.shared.sum()),
                        int(pair.decoder_only.sum()),
                        int(pair.agree.sum()),
                        _mean(pair.cos_decoder),
                        _mean(pair.cos_encoder),
                    )
                )
    presence = {
        table.seed: np.bincount(table.presence, minlength=len(group) + 1)[1:].tolist()
        for table in tables
        if table.presence is not None
    }
    alone = {}
    for table in tables:
        if table.presence is None:
            continue
        alone_mask = np.ones(table.n_latents, dtype=bool)
        fractions = []
        for _, pair in sorted(table.pairs.items()):
            alone_mask &= ~pair.shared
            fractions.append(float(alone_mask.mean()))
        alone[table.seed] = fractions
    return RunSummary(tables, pairs, presence, alone)


def sample(n: int, limit: int) -> np.ndarray:
    """At most `limit` of range(n), the same ones on every request (seeded)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


# ---------------------------------------------------------------------------------------------
# The compare view


@dataclass
class CompareSide:
    seed: int
    index: int
    explanations: list[tuple[str, str]]
    windows: list[Window]


@dataclass
class ComparePage:
    seed_a: int
    seed_b: int
    step: int
    n_steps: int
    cos_decoder: float | None
    cos_encoder: float | None
    shared: bool
    agree: bool
    sides: list[CompareSide]
    neighbours: list[tuple[int, int, int, float]]  # (step, index in A, index in B, cosine)


def compare_page(
    cache: Cache,
    session: Session,
    group: list[Sae],
    seed_a: int,
    seed_b: int,
    step: int,
    campaign_id: int | None,
    tokens: Callable[[list[int]], list[str]],
    n_contexts: int,
) -> ComparePage:
    """Step `step` of seed A's latents matched into seed B, by decoder cosine, highest first."""
    by_seed = {sae.seed: sae for sae in group}
    for seed in (seed_a, seed_b):
        if seed not in by_seed:
            raise NotFound(f"no seed {seed} at this hookpoint")
    table = sae_table(cache, session, by_seed[seed_a], group)
    pair = table.pairs.get(seed_b)
    if pair is None:
        raise NotFound(f"seeds {seed_a} and {seed_b} are not matched: run `autointerp match`")

    def by_cosine() -> np.ndarray:
        matched = np.flatnonzero(pair.partner_decoder >= 0)
        cosine = np.where(np.isnan(pair.cos_decoder[matched]), -np.inf, pair.cos_decoder[matched])
        return matched[np.argsort(-cosine, kind="stable")]

    key = ("order", seed_b, *sae_key(session, by_seed[seed_a]))
    order = cache.get(key, by_cosine)
    if not len(order):
        raise NotFound(f"no latent of seed {seed_a} has a partner in seed {seed_b}")
    step = min(max(step, 0), len(order) - 1)
    index = int(order[step])
    partner = int(pair.partner_decoder[index])
    other = sae_table(cache, session, by_seed[seed_b], group)
    sides = [
        CompareSide(
            seed,
            latent,
            _explanations(session, campaign_id, int(source.latent_id[latent])),
            _windows(session, int(source.latent_id[latent]), tokens, n_contexts),
        )
        for seed, latent, source in ((seed_a, index, table), (seed_b, partner, other))
    ]
    window = range(max(step - 5, 0), min(step + 6, len(order)))
    neighbours = [
        (
            at,
            int(order[at]),
            int(pair.partner_decoder[order[at]]),
            float(pair.cos_decoder[order[at]]),
        )
        for at in window
    ]
    return ComparePage(
        seed_a,
        seed_b,
        step,
        len(order),
        _finite(pair.cos_decoder[index]),
        _finite(pair.cos_encoder[index]),
        bool(pair.shared[index]),
        bool(pair.agree[index]),
        sides,
        neighbours,
    )
