"""Cross-seed scoring on both store backends: which partner a latent is scored with (decoder
matching, either storage direction, the next seeds in cyclic order, partners skipped when
unmatched, unstored or dead), and the whole path on planted latents with the token baseline
and the real MiniLM: partners' explanations stored under the partners, scores under the
scored latent as `cross_seed`, and the report's cross-seed section split into shared and
seed-specific latents.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from planted_store import add_planted_windows, queue_jobs
from rich.console import Console
from sqlalchemy import select

from service.config import LLMConfig, ReportConfig, ScoreConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.report.data import load_run_data
from service.report.html import render_html
from service.report.report import build_report
from service.report.terminal import headline
from service.scorers.embedder import load_embedder
from service.scoring.controls import cross_seed_partners
from service.scoring.planted import RULES, plant
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store
from service.store.matches import read_pair, store_match_pair
from service.store.models import Example, Explanation, Job, Run, Sae, Score
from service.store.runs import latent_ids, register_run, register_sae
from service.store.windows import encode_window, version_for_added_windows

HOOKPOINT = "model.layers.6.mlp"


def new_run(session: Any, name: str, seeds: list[int], n_latents: int, d_in: int) -> Run:
    return register_run(
        session,
        name,
        subject_model="smollm2",
        hookpoint=HOOKPOINT,
        dataset="embedded",
        architecture="topk",
        n_latents=n_latents,
        k=2,
        seeds=seeds,
    )


def match(session: Any, sae_a: Sae, sae_b: Sae, decoder: list[int], encoder: list[int]) -> None:
    """A stored matching of A into B with decoder cosine 0.9 where matched."""
    cosine = [0.9 if partner >= 0 else 0.0 for partner in decoder]
    store_match_pair(
        session,
        sae_a,
        sae_b,
        partner_decoder=decoder,
        cos_decoder=cosine,
        partner_encoder=encoder,
        cos_encoder=cosine,
        solver="scipy",
    )


def test_partners_follow_the_decoder_matching_in_cyclic_seed_order(store: Store):
    dead = (1, 0)  # seed 1's latent 0 has no activating window
    with store.session() as session, session.begin():
        run = new_run(session, "partners", [0, 1, 2], n_latents=4, d_in=16)
        # Registered out of seed order: partners go by seed, not by id.
        saes = {seed: register_sae(session, run, seed, n_latents=4, d_in=16) for seed in (2, 0, 1)}
        elsewhere = register_sae(session, run, 1, n_latents=4, d_in=16, hookpoint="other.layer")
        ids = {seed: latent_ids(session, sae) for seed, sae in saes.items()}
        for seed, seed_ids in ids.items():
            for index, latent_id in enumerate(seed_ids.tolist()):
                tokens, activations = encode_window([1, 2], [0.0, 1.0])
                session.add(
                    Example(
                        latent_id=latent_id,
                        cache_version_id=version_for_added_windows(session, latent_id),
                        kind="top",
                        rank=0,
                        token_ids=tokens,
                        activations=activations,
                        max_activation=0.0 if (seed, index) == dead else 1.0,
                    )
                )
        # 0 into 1: latent 1's decoder partner is 2, its encoder partner 0; latent 3 unmatched.
        match(session, saes[0], saes[1], decoder=[1, 2, 0, -1], encoder=[1, 0, 2, 3])
        # 2 into 1 only: seed 1 reads it backwards. Seeds 0 and 2 have no stored matching.
        match(session, saes[2], saes[1], decoder=[2, 3, 0, 1], encoder=[0, 1, 2, 3])
        # A seed-1 SAE at another hookpoint is no partner, matched or not.
        match(session, saes[0], elsewhere, decoder=[0, 1, 2, 3], encoder=[0, 1, 2, 3])

    with store.read_session() as session:

        def partners(seed: int, index: int, n_seeds: int = 1) -> list[int]:
            return cross_seed_partners(session, int(ids[seed][index]), n_seeds)

        def latent(seed: int, index: int) -> int:
            return int(ids[seed][index])

        def decoder_partner(seed_a: int, seed_b: int, index: int) -> int | None:
            a, b = (session.get(Sae, saes[seed].id) for seed in (seed_a, seed_b))
            pair = read_pair(session, a, b, [index])
            return None if pair is None else int(pair.partner_decoder[0])

        # Forward: the decoder partner, not the encoder one.
        assert partners(0, 0) == [latent(1, 1)]
        assert partners(0, 1) == [latent(1, 2)]
        assert decoder_partner(0, 1, 1) == 2
        assert partners(0, 3) == []  # unmatched
        assert partners(0, 2) == []  # its partner (seed 1, latent 0) is dead
        # Backward: seed 1's latent j is the latent of seed 2 whose decoder partner is j.
        assert partners(1, 0) == [latent(2, 2)]
        assert partners(1, 3) == [latent(2, 1)]
        assert decoder_partner(1, 2, 3) == 1
        # Seed 2 wraps around to seed 0, whose matching with it is not stored.
        assert partners(2, 0) == []
        assert decoder_partner(2, 0, 0) is None
        # Two seeds: seed 0 (skipped, nothing stored), then seed 1.
        assert partners(2, 0, n_seeds=2) == [latent(1, 2)]
        assert partners(0, 0, n_seeds=5) == [latent(1, 1)]
        assert partners(0, 0, n_seeds=0) == []


# The two rules whose token-baseline explanations MiniLM tells apart best (AUC about 0.9 with
# the right one, 0.2-0.4 with the other).
RULE_ORDER = ["return", "class"] * 4
N_SHARED = 4
# Seed 0's latents matched into seed 1: the first N_SHARED onto the latent of the same rule
# (shared), the rest onto a latent of the other rule (seed-specific).
PARTNERS = [0, 1, 2, 3, 5, 4, 7, 6]
CONFIG = ScoreConfig(
    explainers=["token_baseline"],
    scorers=["embedding"],
    n_explain_top=10,
    n_explain_quantile=5,
    n_positive=15,
    n_negative=15,
    cross_seed=1,
)


def store_two_planted_seeds(
    store: Store, tokenizer: Any, windows: np.ndarray
) -> dict[int, list[int]]:
    """Two seeds' SAEs whose latents fire by planted rules, matched 0 into 1 by PARTNERS."""
    n_latents = len(RULE_ORDER)
    shared = np.arange(n_latents) < N_SHARED
    with store.session() as session, session.begin():
        run = new_run(session, "planted", [0, 1], n_latents=n_latents, d_in=576)
        saes = {
            seed: register_sae(session, run, seed, n_latents=n_latents, d_in=576) for seed in (0, 1)
        }
        ids = {seed: [int(i) for i in latent_ids(session, sae)] for seed, sae in saes.items()}
        for seed, seed_ids in ids.items():
            for index, (latent_id, rule) in enumerate(zip(seed_ids, RULE_ORDER, strict=True)):
                planted = plant(RULES[rule], windows, tokenizer, seed=100 * seed + index)
                add_planted_windows(session, latent_id, planted)
        cosine = np.where(shared, 0.9, 0.3)
        store_match_pair(
            session,
            saes[0],
            saes[1],
            partner_decoder=PARTNERS,
            cos_decoder=cosine,
            partner_encoder=PARTNERS,
            cos_encoder=cosine,
            solver="scipy",
        )
    return ids


def test_cross_seed_scores_are_stored_and_reported_by_shared_status(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    ids = store_two_planted_seeds(store, tokenizer, corpus_windows)
    # Seed 0's latents only: seed 1's explanations come from cross-seed scoring alone.
    with store.session() as session, session.begin():
        queue_jobs(session, ids[0], "explain", CONFIG.model_dump())
    # Nothing here needs an LLM: a client to a closed port proves no request is made.
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    stats = asyncio.run(ScoreWorkers(store, llm, home, workers=2, poll_seconds=0.1).run())
    assert (stats.completed, stats.failed, stats.requests) == (len(ids[0]), 0, 0)

    partner_of = {ids[0][index]: ids[1][partner] for index, partner in enumerate(PARTNERS)}
    with store.read_session() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        explanations = {e.id: e for e in session.scalars(select(Explanation))}
        cross = session.scalars(select(Score).where(Score.control == "cross_seed")).all()
        assert sorted(score.latent_id for score in cross) == sorted(ids[0])
        for score in cross:
            source = explanations[score.explanation_id]
            # The partner's explanation, stored under the partner, written by this job.
            assert source.latent_id == partner_of[score.latent_id]
            assert jobs[score.job_id].latent_id == score.latent_id == jobs[source.job_id].latent_id
            assert source.explainer == "token_baseline" and source.text.startswith("tokens ")
            assert score.scorer == "embedding" and score.n_examples == 30 and score.auc is not None
        # Every seed-1 latent is explained, though no seed-1 job ran.
        explained_latents = {e.latent_id for e in explanations.values()}
        assert set(ids[1]) <= explained_latents
        controls = {score.control for score in session.scalars(select(Score))}
        assert controls == {"own", "shuffled", "cross_seed"}
        # Seed-0 latents are explained once each, though also used as shuffled controls: the
        # campaign's explanation is reused.
        seed_0_rows = [e for e in explanations.values() if e.latent_id in set(ids[0])]
        assert len(seed_0_rows) == len(ids[0])

    data = load_run_data(store, "planted")
    # One explanation per latent and explainer, whichever job wrote it.
    assert len(data.explanations["token_baseline"]) == 2 * len(RULE_ORDER)
    embedder = load_embedder()
    report = build_report(data, ReportConfig(n_resamples=300), embedder.embed)
    (group,) = report.hookpoints
    (section,) = group.cross_seed
    assert (section.explainer, section.scorer) == ("token_baseline", "embedding")
    assert section.cross_seed.n == section.own.n == len(ids[0])
    by_sharing = section.cross_seed_shared_vs_specific
    gap_by_sharing = section.gap_shared_vs_specific
    assert by_sharing is not None and gap_by_sharing is not None
    assert by_sharing.shared.n == N_SHARED
    assert by_sharing.seed_specific.n == len(RULE_ORDER) - N_SHARED
    # A shared latent's partner fires by the same rule: its explanation transfers; a
    # seed-specific latent's partner fires by another rule: its explanation does not.
    assert by_sharing.shared.mean is not None and by_sharing.seed_specific.mean is not None
    assert by_sharing.shared.mean >= 0.8
    assert by_sharing.shared.mean - by_sharing.seed_specific.mean >= 0.3
    assert gap_by_sharing.shared.mean is not None and gap_by_sharing.seed_specific.mean is not None
    assert gap_by_sharing.shared.mean < gap_by_sharing.seed_specific.mean
    # Explanation agreement finds every matched pair through the partners' explanations.
    (agreement,) = group.agreement
    assert agreement.matched.n == len(RULE_ORDER)
    assert agreement.matched_shared.n == N_SHARED

    page = render_html(report, {})
    assert "Cross-seed scoring of shared vs seed-specific latents" in page
    assert f"<td>{by_sharing.shared.mean:.3f}</td>" in page
    console = Console(record=True, width=250)
    for part in headline(report):
        console.print(part)
    text = console.export_text()
    assert "scored on the latent" in text and "token_baseline / embedding" in text
