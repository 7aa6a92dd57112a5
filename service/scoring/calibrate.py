"""`autointerp calibrate`: does this LLM (and each scorer) tell a right explanation from a
wrong one? Answered in minutes on planted latents, before any GPU hour is spent.

Each planted latent fires by a known rule on windows of the corpus (`planted`). Every scorer
scores, on the latent's held-out windows, the RIGHT explanation (the rule's own description),
a WRONG one (the next rule's description) and each explainer's explanation of the latent.
An explanation-free scorer (intruder) gets a RIGHT question (the rule's windows, with the
next rule's as intruders) and a WRONG one (windows of the other rules, one rule after
another, so that nothing sets the intruder apart). A
scorer discriminates when its right scores beat its wrong ones: per scorer we give the mean
of each, and the AUC of right vs wrong over the planted latents (the chance that a right
explanation outscores a wrong one). A scorer is informative when that AUC reaches `min_auc`
and the mean gap `min_gap`; numbers from a scorer that is not should not be trusted. Every
score and the config are stored (tables `calibration`, `calibration_score`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sae.errors import UserError
from sae.subject_model import load_tokenizer
from service.cache.windows import ExampleSplit, Window
from service.config import CalibrationConfig, LLMConfig
from service.config.score import NO_EXPLAINER
from service.explainers import create_explainers
from service.llm.base import LLMClient, create_client
from service.progress import count_progress
from service.scorers import ScoreResult, create_scorers, primary_metric
from service.scorers.metrics import roc_auc
from service.scoring.pipeline import latent_seed, needs_llm, split_for
from service.scoring.planted import RULES, plant, to_latent_examples
from service.store.engine import Store, open_store
from service.store.models import Calibration, CalibrationScore

RIGHT = "right"
WRONG = "wrong"


def rules_of(config: CalibrationConfig) -> list[str]:
    """The planted rules the config names (all of them by default); a UserError for an
    unknown one or fewer than two (each rule's wrong explanation is another rule's)."""
    rules = config.rules if config.rules is not None else sorted(RULES)
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown:
        raise UserError(f"unknown rule {unknown[0]!r}; use any of: {', '.join(sorted(RULES))}")
    if len(rules) < 2:
        raise UserError("calibration needs at least two rules: each is the other's wrong answer")
    return rules


def explained_by(config: CalibrationConfig) -> list[str]:
    """The explainers whose explanations are scored (not `none`, which writes none)."""
    return [name for name in config.score.explainers if name != NO_EXPLAINER]


@dataclass
class CalibrationEntry:
    """One scorer's score of one explanation (`kind`: right, wrong or an explainer's name)."""

    rule: str
    scorer: str
    kind: str
    explanation: str
    metric: str
    value: float | None
    n_examples: int
    n_failed: int


@dataclass
class Discrimination:
    """How well one scorer tells right explanations from wrong ones over the planted rules."""

    scorer: str
    metric: str
    n_rules: int
    right_mean: float | None
    wrong_mean: float | None
    explainer_means: dict[str, float | None]
    auc: float | None
    informative: bool
    unparsed: float | None = None


def _entry(rule: str, kind: str, explanation: str, result: ScoreResult) -> CalibrationEntry:
    metric = primary_metric(result.scorer)
    return CalibrationEntry(
        rule,
        result.scorer,
        kind,
        explanation,
        metric,
        getattr(result, metric),
        result.n_examples,
        result.n_failed,
    )


async def calibrate(
    config: CalibrationConfig,
    llm: LLMClient | None,
    home: Path,
    on_rule: Callable[[str], None] | None = None,
) -> list[CalibrationEntry]:
    """Plant each rule, explain it, score right, wrong and explained explanations with every
    scorer; `on_rule` is told of each rule when it is done."""
    from sae.data import load_chunks

    rules = rules_of(config)
    explainers = create_explainers(config.score)
    scorers = create_scorers(config.score)
    tokenizer: Any = load_tokenizer(config.subject_model, home)
    windows = load_chunks(
        config.dataset, tokenizer, chunk_len=config.chunk_len, max_tokens=config.max_tokens
    ).numpy()
    splits = []
    for index, rule in enumerate(rules):
        planted = plant(RULES[rule], windows, tokenizer, seed=config.seed + index)
        split = split_for(to_latent_examples(planted, tokenizer, latent_id=index), config.score)
        if not split.positives or not split.negatives:
            raise UserError(
                f"rule {rule!r} found too few windows in {config.dataset!r}; "
                "raise --max-tokens or drop the rule"
            )
        splits.append(split)
    entries: list[CalibrationEntry] = []
    for index, rule in enumerate(rules):
        split = splits[index]
        following = splits[(index + 1) % len(rules)]
        split.intruders = following.positives
        wrong = RULES[rules[(index + 1) % len(rules)]].explanation
        candidates = [(RIGHT, RULES[rule].explanation), (WRONG, wrong)]
        explained = await asyncio.gather(*(e.explain(split, llm) for e in explainers))
        candidates += [
            (e.explainer, e.text) for e in explained if e.parsed and e.explainer != NO_EXPLAINER
        ]
        seed = latent_seed(config.score, index)
        jobs = [
            (kind, text, s, split)
            for kind, text in candidates
            for s in scorers
            if s.needs_explanation
        ]
        # An explanation-free scorer's right question shows the rule's windows, its wrong one
        # windows of every other rule in turn, which share nothing an intruder could lack.
        mixed = ExampleSplit(
            split.explain, mixed_positives(splits, index), split.negatives, split.intruders
        )
        jobs += [
            (kind, "", s, question)
            for kind, question in ((RIGHT, split), (WRONG, mixed))
            for s in scorers
            if not s.needs_explanation
        ]
        results = await asyncio.gather(*(s.score(text, q, llm, seed) for _, text, s, q in jobs))
        entries += [
            _entry(rule, kind, text, result)
            for (kind, text, _, _), result in zip(jobs, results, strict=True)
        ]
        if on_rule is not None:
            on_rule(rule)
    return entries


def mixed_positives(splits: list[ExampleSplit], index: int) -> list[Window]:
    """Held-out positives of every rule but the `index`th and the next (whose windows are
    the intruders), taken in turn, as many as the `index`th has."""
    others = [
        s.positives for i, s in enumerate(splits) if i not in (index, (index + 1) % len(splits))
    ]
    if not others:
        return []
    size = len(splits[index].positives)
    return [
        others[i % len(others)][i // len(others)]
        for i in range(size)
        if i // len(others) < len(others[i % len(others)])
    ]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def discrimination(
    entries: list[CalibrationEntry], config: CalibrationConfig
) -> list[Discrimination]:
    """Per scorer: mean right and wrong scores, each explainer's mean, AUC right vs wrong."""
    rows = []
    for scorer in dict.fromkeys(entry.scorer for entry in entries):
        mine = [e for e in entries if e.scorer == scorer and e.value is not None]

        def values(kind: str, mine: list[CalibrationEntry] = mine) -> list[float]:
            return [float(e.value) for e in mine if e.kind == kind and e.value is not None]

        right, wrong = values(RIGHT), values(WRONG)
        auc = roc_auc([True] * len(right) + [False] * len(wrong), right + wrong)
        right_mean, wrong_mean = _mean(right), _mean(wrong)
        informative = (
            auc is not None
            and right_mean is not None
            and wrong_mean is not None
            and auc >= config.min_auc
            and right_mean - wrong_mean >= config.min_gap
        )
        asked = [e for e in entries if e.scorer == scorer]
        n_asked = sum(e.n_examples for e in asked)
        rows.append(
            Discrimination(
                scorer=scorer,
                metric=next(e.metric for e in entries if e.scorer == scorer),
                n_rules=len({e.rule for e in mine}),
                right_mean=right_mean,
                wrong_mean=wrong_mean,
                explainer_means={name: _mean(values(name)) for name in explained_by(config)},
                auc=auc,
                informative=informative,
                unparsed=sum(e.n_failed for e in asked) / n_asked if n_asked else None,
            )
        )
    return rows


def store_calibration(
    store: Store, config: CalibrationConfig, llm_model: str | None, entries: list[CalibrationEntry]
) -> int:
    """Write the calibration and its scores in one transaction; returns its id."""
    with store.session() as session, session.begin():
        row = Calibration(
            llm_model=llm_model, subject_model=config.subject_model, config=config.model_dump()
        )
        session.add(row)
        session.flush()
        session.add_all(
            CalibrationScore(
                calibration_id=row.id,
                rule=e.rule,
                scorer=e.scorer,
                kind=e.kind,
                explanation=e.explanation,
                metric=e.metric,
                value=e.value,
                n_examples=e.n_examples,
                n_failed=e.n_failed,
            )
            for e in entries
        )
        return int(row.id)


async def _calibrate_with(
    config: CalibrationConfig,
    llm_config: LLMConfig | None,
    home: Path,
    console: Console | None,
) -> list[CalibrationEntry]:
    llm = create_client(llm_config, home) if llm_config is not None else None
    progress = count_progress("[bold]calibrating", "{task.fields[rule]}", console=console)
    task = progress.add_task("calibrate", total=len(rules_of(config)), rule="")
    try:
        if llm is not None:
            await llm.check()
        with progress:
            return await calibrate(
                config, llm, home, lambda rule: progress.update(task, advance=1, rule=rule)
            )
    finally:
        if llm is not None:
            await llm.aclose()


def run_calibration(
    db_url: str,
    home: Path,
    config: CalibrationConfig,
    llm_config: LLMConfig,
    console: Console | None = None,
) -> tuple[int, list[CalibrationEntry]]:
    """The `autointerp calibrate` command: calibrate (with an LLM only when an explainer or
    scorer needs one) and store the results; returns the calibration's id and its scores."""
    store = open_store(db_url)
    try:
        used = llm_config if needs_llm(config.score) else None
        entries = asyncio.run(_calibrate_with(config, used, home, console))
        return store_calibration(store, config, used.model if used else None, entries), entries
    finally:
        store.dispose()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def discrimination_table(rows: list[Discrimination], config: CalibrationConfig) -> Table:
    """Each scorer's discrimination of right vs wrong explanations, with its verdict."""
    table = Table(
        "scorer",
        "metric",
        "rules",
        "right",
        "wrong",
        *explained_by(config),
        "AUC",
        "unparsed",
        "verdict",
        title="calibration on planted latents: does each scorer tell right from wrong?",
        caption="mean score of the rule's own explanation (right), of another rule's (wrong) and "
        "of each explainer's; AUC: a right explanation outscores a wrong one; unparsed: answers "
        "the scorer could not read",
    )
    for row in rows:
        verdict = "[green]informative" if row.informative else "[red]uninformative"
        table.add_row(
            row.scorer,
            row.metric,
            str(row.n_rules),
            _number(row.right_mean),
            _number(row.wrong_mean),
            *(_number(row.explainer_means[name]) for name in explained_by(config)),
            _number(row.auc),
            "-" if row.unparsed is None else f"{row.unparsed:.0%}",
            verdict,
        )
    return table
