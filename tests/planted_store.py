"""Planted latents' windows (`service.planted`) written to a store as `example` rows, for the
tests that queue and score them."""

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from service.store.models import Example
from service.store.results import encode_window


def add_planted_windows(session: Session, latent_id: int, windows: Iterable[Any]) -> None:
    """One `example` row per planted window of latent `latent_id`."""
    for window in windows:
        token_bytes, activation_bytes = encode_window(window.token_ids, window.activations)
        session.add(
            Example(
                latent_id=latent_id,
                kind=window.kind,
                quantile_bin=window.quantile_bin,
                rank=window.rank,
                token_ids=token_bytes,
                activations=activation_bytes,
                max_activation=max(window.activations),
            )
        )
