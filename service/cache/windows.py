"""A latent's example windows as the explainer and the scorers see them, and how they are
split, rendered into prompts and read from the store.

A `Window` is a run of token strings with the latent's activation on each, of kind `top`
(the highest-activating windows), `quantile` (sampled across activation quantiles) or
`random` (context where the latent may not fire at all). `split_examples` decides which
windows the explainer sees and which are held out for scoring; a held-out window is never
one the explainer saw, not even as a copy under another kind.

How a window is written into a prompt is `service.llm.prompts.render_window`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sae.token_text import token_strings
from service.store.models import Example, Latent, Run, Sae
from service.store.windows import decode_window, latent_windows


@dataclass(frozen=True)
class Window:
    """Token strings with the latent's activation on each, and where the window came from."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    kind: str
    quantile_bin: int | None = None
    example_id: int | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def active(self, fraction: float = 0.0) -> list[bool]:
        """Which tokens fire: activation above `fraction` of the window's maximum (and > 0)."""
        threshold = max(self.max_activation * fraction, 0.0)
        return [value > threshold for value in self.activations]


@dataclass
class LatentExamples:
    """Every stored window of one latent."""

    latent_id: int | None
    windows: list[Window]


@dataclass
class ExampleSplit:
    """Windows shown to the explainer, and the disjoint held-out sets the scorers use;
    `intruders`: activating windows of another latent (the intruder scorer's)."""

    explain: list[Window]
    positives: list[Window]
    negatives: list[Window]
    intruders: list[Window] = field(default_factory=list)


def _spread(windows: list[Window], n: int, rng: random.Random) -> list[Window]:
    """Up to n windows spread evenly over quantile bins (round robin, shuffled within bins)."""
    bins: dict[int | None, list[Window]] = {}
    for window in windows:
        bins.setdefault(window.quantile_bin, []).append(window)
    for members in bins.values():
        rng.shuffle(members)
    order = sorted(bins, key=lambda key: (key is None, key or 0))
    chosen: list[Window] = []
    while len(chosen) < n and any(bins.values()):
        for key in order:
            if bins[key] and len(chosen) < n:
                chosen.append(bins[key].pop())
    return chosen


def split_examples(
    examples: LatentExamples,
    *,
    n_explain_top: int,
    n_explain_quantile: int,
    n_positive: int,
    n_negative: int,
    seed: int = 0,
) -> ExampleSplit:
    """Choose the explainer's windows and the held-out scoring sets, reproducibly.

    The explainer sees the `n_explain_top` highest top windows and `n_explain_quantile`
    quantile windows spread over the bins. Positives are held-out activating windows (other
    quantile windows first, then remaining top windows), spread over bins; negatives are
    random windows on which the latent is verified not to fire.
    """
    rng = random.Random(seed)
    top = sorted(
        (w for w in examples.windows if w.kind == "top" and w.max_activation > 0),
        key=lambda w: -w.max_activation,
    )
    quantile = [w for w in examples.windows if w.kind == "quantile" and w.max_activation > 0]
    explain = top[:n_explain_top] + _spread(quantile, n_explain_quantile, rng)
    seen = {w.tokens for w in explain}
    held_quantile = [w for w in quantile if w.tokens not in seen]
    positives = _spread(held_quantile, n_positive, rng)
    if len(positives) < n_positive:
        taken = seen | {w.tokens for w in positives}
        spare = [w for w in top[n_explain_top:] if w.tokens not in taken]
        positives += spare[: n_positive - len(positives)]
    seen |= {w.tokens for w in positives}
    candidates = [
        w
        for w in examples.windows
        if w.kind == "random" and w.max_activation <= 0 and w.tokens not in seen
    ]
    rng.shuffle(candidates)
    negatives: list[Window] = []
    for window in candidates:
        if len(negatives) == n_negative:
            break
        if window.tokens not in seen:
            negatives.append(window)
            seen.add(window.tokens)
    return ExampleSplit(explain, positives, negatives)


def load_latent_examples(
    session: Session, latent_id: int, tokenizer: Any, cache_version_id: int | None = None
) -> LatentExamples:
    """A latent's stored windows of one cache version (by default its run's newest complete
    one), decoded with the subject model's tokenizer."""
    rows = session.scalars(
        latent_windows(latent_id, cache_version_id).order_by(
            Example.kind, Example.quantile_bin, Example.rank
        )
    ).all()
    windows = []
    for row in rows:
        token_ids, activations = decode_window(row.token_ids, row.activations)
        windows.append(
            Window(
                tokens=tuple(token_strings(tokenizer, token_ids.tolist())),
                activations=tuple(float(value) for value in activations),
                kind=row.kind,
                quantile_bin=row.quantile_bin,
                example_id=row.id,
            )
        )
    return LatentExamples(latent_id, windows)


def subject_model_of(session: Session, latent_id: int) -> str:
    """The subject model of the run a latent belongs to (whose tokenizer wrote its windows)."""
    model = session.scalar(
        select(Run.subject_model)
        .join(Sae, Sae.run_id == Run.id)
        .join(Latent, Latent.sae_id == Sae.id)
        .where(Latent.id == latent_id)
    )
    if model is None:
        raise LookupError(f"latent {latent_id} is not in the store")
    return model
