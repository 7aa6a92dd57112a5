"""A generated study written straight into a store, for the report and `show` tests.

Three seeds of a 40-latent SAE at one hookpoint. Latents 0-19 are shared by every pair of
seeds (both cosines above 0.7, same partner), 20-39 are seed-specific. Pairs are stored one
direction each, with one pair stored backwards (2 into 0), so the report must invert it.
The 'llm' explainer writes the same explanation for a shared latent in every seed and a
different one per seed for a seed-specific latent. 'detection' separates own from shuffled
explanations and rates shared latents higher; 'fuzzing' cannot tell own from shuffled (it
must come out uninformative). Latents 36-39 have no scores. Everything scored belongs to
one campaign (`CAMPAIGN_CONFIG`); an older campaign holds a stale explanation and a higher
score of every latent, which no report or `show` may mix in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.store.campaigns import CampaignLLM, get_or_create_campaign
from service.store.engine import Store
from service.store.matches import store_match_pair
from service.store.models import Explanation, Score
from service.store.runs import latent_ids, register_run, register_sae, store_latent_stats

N_LATENTS = 40
N_SHARED = 20
SEEDS = (0, 1, 2)
UNSCORED = range(36, 40)
CAMPAIGN_CONFIG = {"explainers": ["llm"], "scorers": ["detection", "fuzzing"]}
OLD_CAMPAIGN_CONFIG = {"explainers": ["llm"], "scorers": ["detection"], "seed": 9}
# Seed-specific latents that nevertheless score well on detection.
GOOD_SPECIFIC = (20, 21)
WORDS = [
    "return", "class", "import", "digits", "quotes", "comma", "brackets", "the", "while",
    "lambda", "yield", "colon", "print", "string", "newline", "capitals", "equals", "plus",
    "tuple", "assert",
]  # fmt: skip
TOPICS = [
    "cooking recipes", "football results", "weather in spring", "medieval castles",
    "jazz musicians", "tax forms", "volcano eruptions", "train timetables", "knitting",
    "chess openings", "ocean currents", "poetry meters", "garden insects",
]  # fmt: skip


@dataclass
class Study:
    """What was written, for tests to compare the report against."""

    run: str
    own: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=dict)
    shuffled: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=dict)
    firing_count: dict[int, np.ndarray] = field(default_factory=dict)
    cross_seed: list[float] = field(default_factory=list)
    campaign_id: int | None = None


def explanation_text(seed: int, index: int) -> str:
    if index < N_SHARED:
        return f"the word '{WORDS[index]}' in Python code"
    return f"text about {TOPICS[(3 * index + 5 * seed) % len(TOPICS)]}"


def _match_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = np.arange(N_LATENTS)
    shared = index < N_SHARED
    encoder_partner = index.copy()
    # Latents 30-39 get a different encoder partner (a rotation within them).
    encoder_partner[30:] = 30 + (index[30:] - 30 + 1) % 10
    cos_decoder = np.where(shared, rng.uniform(0.8, 0.95, N_LATENTS), rng.uniform(0.2, 0.6, 40))
    cos_encoder = np.where(shared, rng.uniform(0.75, 0.9, N_LATENTS), rng.uniform(0.1, 0.5, 40))
    return {
        "partner_decoder": index,
        "cos_decoder": cos_decoder,
        "partner_encoder": encoder_partner,
        "cos_encoder": cos_encoder,
    }


def populate(
    store: Store,
    run_name: str = "study",
    scored: bool = True,
    matched: bool = True,
    subject_model: str = "smollm2",
    detection_offset: float = 0.0,
) -> Study:
    """Write the generated study; `scored=False` stops after matchings and statistics.
    `subject_model` and `detection_offset` (added to every own detection score) make it a
    random-model control: the same draws, shifted."""
    rng = np.random.default_rng(7)
    study = Study(run_name)
    with store.session() as session, session.begin():
        run = register_run(
            session,
            run_name,
            subject_model=subject_model,
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=N_LATENTS,
            k=4,
            seeds=list(SEEDS),
        )
        saes = {
            seed: register_sae(session, run, seed, n_latents=N_LATENTS, d_in=16) for seed in SEEDS
        }
        for seed, sae in saes.items():
            counts = np.where(
                np.arange(N_LATENTS) < N_SHARED,
                rng.integers(400, 1000, N_LATENTS),
                rng.integers(1, 300, N_LATENTS),
            )
            study.firing_count[seed] = counts
            store_latent_stats(session, sae, counts, 10_000, rng.uniform(1, 5, N_LATENTS))
        if matched:
            for a, b in ((0, 1), (1, 2), (2, 0)):
                store_match_pair(session, saes[a], saes[b], solver="scipy", **_match_arrays(rng))
        if not scored:
            return study
        ids = {seed: latent_ids(session, sae) for seed, sae in saes.items()}
        llm = CampaignLLM("openai", "m")
        old = get_or_create_campaign(session, OLD_CAMPAIGN_CONFIG, llm)
        campaign = get_or_create_campaign(session, CAMPAIGN_CONFIG, llm)
        study.campaign_id = campaign.id
        explanations: dict[tuple[int, int], Explanation] = {}
        stale: dict[tuple[int, int], Explanation] = {}
        for seed in SEEDS:
            for index in range(N_LATENTS):
                latent_id = int(ids[seed][index])
                # The older campaign's explanation, which the report must ignore.
                stale[(seed, index)] = Explanation(
                    latent_id=latent_id,
                    campaign_id=old.id,
                    explainer="llm",
                    model="m",
                    text="stale explanation",
                )
                row = Explanation(
                    latent_id=latent_id,
                    campaign_id=campaign.id,
                    explainer="llm",
                    model="m",
                    text=explanation_text(seed, index),
                )
                session.add_all([stale[(seed, index)], row])
                explanations[(seed, index)] = row
        session.flush()
        shared = np.arange(N_LATENTS) < N_SHARED
        for scorer in ("detection", "fuzzing"):
            study.own[("llm", scorer)] = {}
            study.shuffled[("llm", scorer)] = {}
        for seed in SEEDS:
            detection = np.where(
                shared, rng.uniform(0.82, 0.95, N_LATENTS), rng.uniform(0.55, 0.75, N_LATENTS)
            )
            detection[list(GOOD_SPECIFIC)] = 0.9
            detection += detection_offset
            fuzzing = rng.uniform(0.4, 0.6, N_LATENTS)
            values = {
                "detection": (detection, rng.uniform(0.45, 0.55, N_LATENTS)),
                "fuzzing": (fuzzing, rng.uniform(0.4, 0.6, N_LATENTS)),
            }  # fmt: skip
            for scorer, (own, shuffled) in values.items():
                own = own.copy()
                shuffled = shuffled.copy()
                own[list(UNSCORED)] = np.nan
                shuffled[list(UNSCORED)] = np.nan
                study.own[("llm", scorer)][seed] = own
                study.shuffled[("llm", scorer)][seed] = shuffled
                for index in range(N_LATENTS):
                    if index in UNSCORED:
                        continue
                    latent_id = int(ids[seed][index])
                    other = (index + 7) % N_LATENTS
                    for control, value, explanation, in_campaign in (
                        ("own", 0.99, stale[(seed, index)], old.id),  # another campaign
                        ("own", 0.1, explanations[(seed, index)], campaign.id),  # superseded
                        ("own", own[index], explanations[(seed, index)], campaign.id),
                        ("shuffled", shuffled[index], explanations[(seed, other)], campaign.id),
                    ):
                        session.add(
                            Score(
                                latent_id=latent_id,
                                campaign_id=in_campaign,
                                explanation_id=explanation.id,
                                scorer=scorer,
                                control=control,
                                balanced_accuracy=float(value),
                                f1=None,
                                auc=None,
                                n_examples=20,
                                n_parsed=19,
                                n_failed=1,
                            )
                        )
        # Cross-seed: seed 0's explanation of its partner, scored on seed 1's latent (and
        # for latent 0, seed 2's too: one latent, two cross-seed scores).
        for source, index in [(0, index) for index in range(10)] + [(2, 0)]:
            value = float(study.own[("llm", "detection")][1][index] - 0.05)
            study.cross_seed.append(value)
            session.add(
                Score(
                    latent_id=int(ids[1][index]),
                    campaign_id=campaign.id,
                    explanation_id=explanations[(source, index)].id,
                    scorer="detection",
                    control="cross_seed",
                    balanced_accuracy=value,
                    n_examples=20,
                    n_parsed=20,
                    n_failed=0,
                )
            )
    return study
