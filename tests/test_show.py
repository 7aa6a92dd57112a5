"""`autointerp show SAE LATENT` on a generated study in real stores, with the real SmolLM2
tokenizer decoding the stored windows."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from report_fixtures import N_LATENTS, explanation_text, populate
from rich.console import Console
from sqlalchemy import select

from sae.errors import UserError
from service.report.show import highlight, render_latent, show_latent
from service.store.engine import Store, open_store, upgrade
from service.store.models import Example, Latent, Run, Sae
from service.store.runs import register_sae
from service.store.windows import encode_window, version_for_added_windows

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
CONTEXT = "def area(radius):\n    return 3.14 * radius ** 2"


def add_context(store: Store, tokenizer: Any, seed: int, index: int) -> list[str]:
    """Store one top window for the latent that fires on the token ' return' only."""
    ids = tokenizer(CONTEXT)["input_ids"]
    pieces = [tokenizer.decode([token]) for token in ids]
    activations = np.array([2.5 if piece == " return" else 0.0 for piece in pieces])
    assert activations.max() > 0
    token_bytes, activation_bytes = encode_window(ids, activations)
    with store.session() as session, session.begin():
        latent_id = (
            session.query(Latent.id)
            .join(Sae)
            .filter(Sae.seed == seed, Latent.index == index)
            .scalar()
        )
        session.add(
            Example(
                latent_id=latent_id,
                cache_version_id=version_for_added_windows(session, latent_id),
                kind="top",
                rank=0,
                token_ids=token_bytes,
                activations=activation_bytes,
                max_activation=2.5,
            )
        )
    return pieces


def test_show_an_existing_latent(store: Store, tokenizer: Any):
    populate(store)
    add_context(store, tokenizer, seed=0, index=3)
    asked: list[str] = []

    def load(model: str) -> Any:
        asked.append(model)
        return tokenizer

    view = show_latent(store, "study:0", 3, load)
    assert asked == ["smollm2"]
    assert view.explanations == {"llm": explanation_text(0, 3)}
    assert {(s.score.scorer, s.score.control) for s in view.scores} == {
        ("detection", "own"),
        ("detection", "shuffled"),
        ("fuzzing", "own"),
        ("fuzzing", "shuffled"),
    }
    # Seed 1 is stored 0 -> 1; seed 2 is stored 2 -> 0 and read backwards.
    assert [p.seed for p in view.partners] == [1, 2]
    for partner in view.partners:
        assert partner.decoder_partner == 3 and partner.shared and partner.agree
        assert partner.cos_decoder is not None and partner.cos_decoder > 0.7
        assert partner.explanations["llm"] == explanation_text(partner.seed, 3)
    (context,) = view.contexts
    assert "".join(context.tokens) == CONTEXT
    marked = highlight(context)
    styled = [marked.plain[span.start : span.end] for span in marked.spans]
    assert styled == [" return"]

    console = Console(record=True, width=200)
    for part in render_latent(view):
        console.print(part)
    text = console.export_text()
    assert "study / model.layers.6.mlp / seed 0 / latent 3" in text
    assert explanation_text(0, 3) in text and "partners in other seeds" in text
    assert "3.14 * radius" in text


def test_show_a_seed_specific_latent_without_contexts(store: Store):
    populate(store, scored=False)
    view = show_latent(store, "study:model.layers.6.mlp:2", 35, lambda model: None)
    assert view.explanations == {} and view.scores == [] and view.contexts == []
    assert all(not partner.shared for partner in view.partners)
    # Latents 30-39 have different decoder and encoder partners.
    assert all(not partner.agree for partner in view.partners)


@pytest.mark.parametrize(
    ("sae", "index", "fragment"),
    [
        ("study", 0, "name it RUN:SEED"),
        ("nope:0", 0, "no run named 'nope'"),
        ("study:9", 0, "has no seed-9 SAE"),
        ("study:other.hook:0", 0, "has no seed-0 SAE at other.hook"),
        ("study:0", N_LATENTS, f"latents 0 to {N_LATENTS - 1}"),
        ("study:0", -1, "does not exist"),
    ],
)
def test_show_errors(store: Store, sae: str, index: int, fragment: str):
    populate(store, scored=False)
    with pytest.raises(UserError, match=fragment):
        show_latent(store, sae, index, lambda model: None)


def test_show_cli(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    populate(store)
    store.dispose()
    env = {**os.environ, "AUTOINTERP_DB": url, "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [AUTOINTERP, "show", *args], capture_output=True, text=True, timeout=300, env=env
        )

    shown = cli("study:1", "4")
    assert shown.returncode == 0, shown.stderr
    assert explanation_text(1, 4) in shown.stdout
    missing = cli("study:1", str(N_LATENTS))
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: latent 40 does not exist"), lines


def test_show_asks_for_the_hookpoint_when_a_seed_has_several(store: Store):
    populate(store, scored=False)
    with store.session() as session, session.begin():
        run = session.scalars(select(Run).where(Run.name == "study")).one()
        register_sae(session, run, 0, n_latents=8, d_in=16, hookpoint="model.layers.9.mlp")
    with pytest.raises(UserError, match="name one as study:HOOKPOINT:0"):
        show_latent(store, "study:0", 1, lambda model: None)
    view = show_latent(store, "study:model.layers.9.mlp:0", 1, lambda model: None)
    assert view.hookpoint == "model.layers.9.mlp" and view.partners == []
