"""`autointerp show SAE LATENT`: one latent on the terminal.

Its firing statistics, its explanation per explainer and its scores in one campaign (the
newest with scores for the run unless `--campaign` names one), its partner in each
other seed of the same hookpoint (decoder and encoder partners with their cosines, whether it
is shared, and the partner's explanation), and its top contexts with the firing tokens
highlighted by activation.

An SAE is named `RUN:SEED`, or `RUN:HOOKPOINT:SEED` when the run has SAEs at several
hookpoints. Matchings are read with `service.store.matches.read_pair` (either direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session

from sae.errors import UserError
from sae.token_text import token_strings
from service.store.campaigns import campaign_for_run, describe
from service.store.engine import Store
from service.store.matches import read_pair
from service.store.models import Example, Explanation, Latent, Run, Sae
from service.store.runs import get_run
from service.store.scores import LatestScore, latest_explanations, latest_scores
from service.store.windows import decode_window, latent_windows

DEFAULT_CONTEXTS = 5
# Background colours from weak to strong activation (fraction of the latent's maximum).
HIGHLIGHTS = ((0.66, "on #d7301f"), (0.33, "on #fc8d59"), (0.0, "on #fdcc8a"))


@dataclass
class Partner:
    """This latent's match in another seed's SAE."""

    seed: int
    hookpoint: str
    decoder_partner: int | None
    cos_decoder: float | None
    encoder_partner: int | None
    cos_encoder: float | None
    threshold: float
    explanations: dict[str, str] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return (
            self.cos_decoder is not None
            and self.cos_encoder is not None
            and self.cos_decoder > self.threshold
            and self.cos_encoder > self.threshold
        )

    @property
    def agree(self) -> bool:
        return self.decoder_partner is not None and self.decoder_partner == self.encoder_partner


@dataclass
class Context:
    kind: str
    rank: int
    tokens: list[str]
    activations: list[float]

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


@dataclass
class LatentView:
    run: str
    hookpoint: str
    seed: int
    index: int
    n_latents: int
    firing_count: int | None
    firing_frequency: float | None
    max_activation: float | None
    explanations: dict[str, str]
    scores: list[LatestScore]
    partners: list[Partner]
    contexts: list[Context]
    campaign: str | None = None


def resolve_sae(session: Session, spec: str) -> Sae:
    """The SAE named `RUN:SEED` or `RUN:HOOKPOINT:SEED`; a UserError naming what exists."""
    head, sep, seed_text = spec.rpartition(":")
    if not sep or not head or not seed_text.lstrip("-").isdigit():
        raise UserError(f"cannot read SAE {spec!r}: name it RUN:SEED or RUN:HOOKPOINT:SEED")
    seed = int(seed_text)
    run_name, hookpoint = head, None
    if session.scalar(select(Run.id).where(Run.name == head)) is None and ":" in head:
        run_name, _, hookpoint = head.rpartition(":")
    run = get_run(session, run_name)
    query = select(Sae).where(Sae.run_id == run.id, Sae.seed == seed)
    if hookpoint is not None:
        query = query.where(Sae.hookpoint == hookpoint)
    saes = session.scalars(query.order_by(Sae.hookpoint)).all()
    if len(saes) == 1:
        return saes[0]
    if len(saes) > 1:
        hookpoints = ", ".join(sae.hookpoint for sae in saes)
        raise UserError(
            f"run {run.name!r} has seed-{seed} SAEs at several hookpoints ({hookpoints}); "
            f"name one as {run.name}:HOOKPOINT:{seed}"
        )
    existing = session.execute(
        select(Sae.hookpoint, Sae.seed).where(Sae.run_id == run.id).order_by(Sae.seed)
    ).all()
    listing = ", ".join(f"{run.name}:{h}:{s}" for h, s in existing) or "none yet"
    where = f" at {hookpoint}" if hookpoint else ""
    raise UserError(f"run {run.name!r} has no seed-{seed} SAE{where} (SAEs: {listing})")


def _latest_explanations(
    session: Session, campaign_id: int | None, latent_id: int
) -> dict[str, str]:
    if campaign_id is None:
        return {}
    rows = latest_explanations(session, campaign_id, Explanation.latent_id == latent_id)
    return {explainer: text for _, explainer, text in rows}


def _scores(session: Session, campaign_id: int | None, latent_id: int) -> list[LatestScore]:
    if campaign_id is None:
        return []
    return sorted(
        latest_scores(session, campaign_id, [latent_id]),
        key=lambda line: (line.explainer, line.score.scorer, line.score.control),
    )


def _partner_explanations(
    session: Session, campaign_id: int | None, sae_id: int, index: int | None
) -> dict[str, str]:
    if index is None:
        return {}
    latent_id = session.scalar(
        select(Latent.id).where(Latent.sae_id == sae_id, Latent.index == index)
    )
    return _latest_explanations(session, campaign_id, latent_id) if latent_id is not None else {}


def _partners(session: Session, campaign_id: int | None, sae: Sae, index: int) -> list[Partner]:
    others = session.scalars(
        select(Sae)
        .where(Sae.run_id == sae.run_id, Sae.hookpoint == sae.hookpoint, Sae.id != sae.id)
        .order_by(Sae.seed)
    ).all()
    partners = []
    for other in others:
        pair = read_pair(session, sae, other, [index])
        if pair is None:
            continue
        decoder, encoder = int(pair.partner_decoder[0]), int(pair.partner_encoder[0])
        partner = Partner(
            other.seed,
            other.hookpoint,
            decoder if decoder >= 0 else None,
            _finite(pair.cos_decoder[0]),
            encoder if encoder >= 0 else None,
            _finite(pair.cos_encoder[0]),
            pair.threshold,
        )
        partner.explanations = _partner_explanations(
            session, campaign_id, other.id, partner.decoder_partner
        )
        partners.append(partner)
    return partners


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _contexts(
    session: Session, latent_id: int, tokenizer: Callable[[], Any], n_contexts: int
) -> list[Context]:
    rows = session.scalars(
        latent_windows(latent_id)
        .where(Example.kind == "top")
        .order_by(Example.rank)
        .limit(n_contexts)
    ).all()
    if not rows:
        return []
    loaded = tokenizer()
    contexts = []
    for row in rows:
        token_ids, activations = decode_window(row.token_ids, row.activations)
        contexts.append(
            Context(
                row.kind,
                row.rank,
                token_strings(loaded, token_ids.tolist()),
                [float(value) for value in activations],
            )
        )
    return contexts


def show_latent(
    store: Store,
    sae_spec: str,
    index: int,
    tokenizer: Callable[[str], Any],
    n_contexts: int = DEFAULT_CONTEXTS,
    campaign_id: int | None = None,
) -> LatentView:
    """Everything `show` prints about latent `index` of the SAE `sae_spec`, with the
    explanations and scores of campaign `campaign_id` (None: the newest with scores for the
    run). `tokenizer` maps the run's subject model to its tokenizer; it is called only when
    there are contexts."""
    with store.read_session() as session:
        sae = resolve_sae(session, sae_spec)
        run = session.get(Run, sae.run_id)
        assert run is not None
        if not 0 <= index < sae.n_latents:
            raise UserError(
                f"latent {index} does not exist: SAE {sae_spec} has latents 0 to "
                f"{sae.n_latents - 1}"
            )
        latent = session.scalar(
            select(Latent).where(Latent.sae_id == sae.id, Latent.index == index)
        )
        if latent is None:
            raise UserError(
                f"latent {index} of SAE {sae_spec} is not in the store; register the SAE again"
            )
        subject_model = run.subject_model
        campaign = campaign_for_run(session, campaign_id, run.id)
        chosen = campaign.id if campaign is not None else None
        return LatentView(
            run=run.name,
            hookpoint=sae.hookpoint,
            seed=sae.seed,
            index=index,
            n_latents=sae.n_latents,
            firing_count=latent.firing_count,
            firing_frequency=latent.firing_frequency,
            max_activation=latent.max_activation,
            explanations=_latest_explanations(session, chosen, latent.id),
            scores=_scores(session, chosen, latent.id),
            partners=_partners(session, chosen, sae, index),
            contexts=_contexts(session, latent.id, lambda: tokenizer(subject_model), n_contexts),
            campaign=describe(campaign) if campaign is not None else None,
        )


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def highlight(context: Context) -> Text:
    """The context's text with each firing token's background shaded by its activation."""
    text = Text()
    peak = context.max_activation
    for raw, activation in zip(context.tokens, context.activations, strict=True):
        # A window shown on one line: newlines become a visible mark.
        token = raw.replace("\n", "\u21b5")
        if activation > 0 and peak > 0:
            style = next(s for level, s in HIGHLIGHTS if activation / peak >= level)
            text.append(token, style=f"bold black {style}")
        else:
            text.append(token)
    return text


def render_latent(view: LatentView) -> list[RenderableType]:
    """The rich renderables `autointerp show` prints, in order."""
    title = f"{view.run} / {view.hookpoint} / seed {view.seed} / latent {view.index}"
    facts = Table("measure", "value")
    facts.add_row("latents in SAE", f"{view.n_latents:,}")
    facts.add_row("firing count", "-" if view.firing_count is None else f"{view.firing_count:,}")
    facts.add_row("firing frequency", _number(view.firing_frequency, 6))
    facts.add_row("max activation", _number(view.max_activation))
    parts: list[RenderableType] = [Text(title, style="bold"), facts]
    if view.campaign is not None:
        parts.append(Text(f"explanations and scores of {view.campaign}"))
    explanations = Table("explainer", "explanation", title="explanations")
    for explainer, explanation in view.explanations.items():
        explanations.add_row(explainer, explanation)
    parts.append(explanations if view.explanations else Text("no explanation yet", style="yellow"))
    if view.scores:
        scores = Table(
            "explainer", "scorer", "control", "balanced acc.", "F1", "AUC", "parsed", title="scores"
        )
        for line in view.scores:
            score = line.score
            scores.add_row(
                line.explainer,
                score.scorer,
                score.control,
                _number(score.balanced_accuracy),
                _number(score.f1),
                _number(score.auc),
                f"{score.n_parsed}/{score.n_examples}",
            )
        parts.append(scores)
    else:
        parts.append(Text("no scores yet", style="yellow"))
    if view.partners:
        partners = Table(
            "seed",
            "decoder partner",
            "decoder cos",
            "encoder partner",
            "encoder cos",
            "shared",
            "same partner",
            "partner's explanation",
            title="partners in other seeds",
        )
        for partner in view.partners:
            partners.add_row(
                str(partner.seed),
                "-" if partner.decoder_partner is None else str(partner.decoder_partner),
                _number(partner.cos_decoder),
                "-" if partner.encoder_partner is None else str(partner.encoder_partner),
                _number(partner.cos_encoder),
                "yes" if partner.shared else "no",
                "yes" if partner.agree else "no",
                "; ".join(f"{k}: {v}" for k, v in partner.explanations.items()) or "-",
            )
        parts.append(partners)
    else:
        parts.append(Text("no matchings against other seeds stored", style="yellow"))
    if view.contexts:
        lines = [
            Text.assemble(
                (f"#{context.rank} (max {context.max_activation:.2f}) ", "dim"), highlight(context)
            )
            for context in view.contexts
        ]
        parts.append(Text("top contexts", style="bold"))
        parts.append(Group(*lines))
    else:
        parts.append(Text("no example windows yet", style="yellow"))
    return parts
