"""Hard negatives: windows where the latent's nearest neighbours in its SAE fire and it does not.

Random non-firing windows make every scorer easy: most share nothing with the latent's
windows. A hard negative is an activating window of a latent close to this one, so an
explanation must say what sets the latent apart from its neighbours, not only what its
neighbourhood is about.

Neighbours: the latents of the same SAE whose decoder directions are closest to its own
(cosine), from the SAE checkpoint (`sae.path`). Where the checkpoint is not at hand (a store
copied without its weights), the latents that co-fire with it most instead: those sharing
the most stored activating windows with it.

Windows: the neighbours' stored activating windows (top and quantile, nearest neighbour
first) that are none of the latent's own stored activating windows. The store keeps a
latent's activations on its own windows only, so "it does not fire" is what the store
knows: the window is neither among its top windows (which hold every window it fires on
more strongly than the weakest of them) nor among its sampled firing windows. They are
scored as negatives, with zero activation.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from sae.checkpoint import load_sae
from service.cache.windows import ExampleSplit, LatentExamples, Window, load_latent_examples
from service.store.models import Example, Latent, Sae
from service.store.windows import latent_windows

FIRING_KINDS = ("top", "quantile")
HARD_KIND = "hard"


class Decoders:
    """Each SAE's decoder rows scaled to unit length, loaded once per process (thread-safe);
    None for an SAE whose checkpoint cannot be read."""

    def __init__(self) -> None:
        self._rows: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def of(self, sae: Sae) -> np.ndarray | None:
        with self._lock:
            if sae.id not in self._rows:
                self._rows[sae.id] = _unit_rows(sae.path)
            return self._rows[sae.id]


def _unit_rows(path: str | None) -> np.ndarray | None:
    if path is None or not Path(path).exists():
        return None
    rows = load_sae(Path(path)).W_dec.detach().float().numpy()
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def decoder_neighbours(unit_rows: np.ndarray, index: int, n: int) -> list[int]:
    """Indices of the `n` latents whose decoder rows have the highest cosine with row
    `index` (itself excluded), closest first; ties by index."""
    cosine = unit_rows @ unit_rows[index]
    cosine[index] = -np.inf
    order = np.lexsort((np.arange(len(cosine)), -cosine))
    return [int(i) for i in order[:n]]


def _firing(query: Any) -> Any:
    return query.where(Example.kind.in_(FIRING_KINDS), Example.max_activation > 0)


def cofiring_neighbours(session: Session, latent: Latent, n: int) -> list[int]:
    """Ids of the `n` latents of the same SAE sharing the most stored activating windows
    (same tokens) with `latent`, most first; ties by id."""
    mine = _firing(latent_windows(latent.id).with_only_columns(Example.token_ids))
    other = aliased(Example)
    shared = func.count().label("shared")
    rows = session.execute(
        select(other.latent_id, shared)
        .join(Latent, Latent.id == other.latent_id)
        .where(
            Latent.sae_id == latent.sae_id,
            other.latent_id != latent.id,
            other.kind.in_(FIRING_KINDS),
            other.max_activation > 0,
            other.token_ids.in_(mine.scalar_subquery()),
        )
        .group_by(other.latent_id)
        .order_by(shared.desc(), other.latent_id)
        .limit(n)
    ).all()
    return [int(row[0]) for row in rows]


def nearest_neighbours(session: Session, latent_id: int, n: int, decoders: Decoders) -> list[int]:
    """Ids of the latent's `n` nearest neighbours in its SAE: by decoder cosine where the
    checkpoint can be read, else by co-firing."""
    latent = session.get(Latent, latent_id)
    if latent is None:
        raise LookupError(f"latent {latent_id} is not in the store")
    sae = session.get(Sae, latent.sae_id)
    assert sae is not None  # a latent's SAE outlives it
    rows = decoders.of(sae)
    if rows is None:
        return cofiring_neighbours(session, latent, n)
    indices = decoder_neighbours(rows, latent.index, n)
    ids = dict(
        session.execute(
            select(Latent.index, Latent.id).where(
                Latent.sae_id == sae.id, Latent.index.in_(indices)
            )
        ).all()
    )
    return [int(ids[i]) for i in indices if i in ids]


def hard_negatives(examples: LatentExamples, neighbours: list[LatentExamples]) -> list[Window]:
    """The neighbours' activating windows that are none of the latent's activating windows,
    nearest neighbour first, each once, with zero activation (they are negatives)."""
    taken = {w.tokens for w in examples.windows if w.max_activation > 0}
    windows = []
    for neighbour in neighbours:
        for window in neighbour.windows:
            fires = window.kind in FIRING_KINDS and window.max_activation > 0
            if fires and window.tokens not in taken:
                taken.add(window.tokens)
                zeros = (0.0,) * len(window.tokens)
                windows.append(Window(window.tokens, zeros, HARD_KIND, None, window.example_id))
    return windows


def load_hard_negatives(
    session: Session,
    examples: LatentExamples,
    n_neighbours: int,
    tokenizer: Any,
    decoders: Decoders,
) -> list[Window]:
    """Hard negatives of the latent `examples` belongs to, read from the store."""
    assert examples.latent_id is not None
    ids = nearest_neighbours(session, examples.latent_id, n_neighbours, decoders)
    return hard_negatives(examples, [load_latent_examples(session, i, tokenizer) for i in ids])


def hard_split(split: ExampleSplit, candidates: list[Window], n: int, seed: int) -> ExampleSplit:
    """`split` with its negatives replaced by up to `n` of `candidates` drawn with `seed`,
    none of them a window the explainer saw or a held-out positive."""
    seen = {w.tokens for w in split.explain + split.positives}
    usable = [w for w in candidates if w.tokens not in seen]
    chosen = random.Random(seed).sample(usable, min(n, len(usable)))
    return ExampleSplit(split.explain, split.positives, chosen, split.intruders)
