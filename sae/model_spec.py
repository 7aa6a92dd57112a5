"""Subject model names as runs record them, including the random-model control.

A name is an embedded model, a folder or a Hugging Face id. `NAME@random:SEED` is the same
architecture with every weight re-initialised from the model's own config under
`torch.manual_seed(SEED)` (same tokenizer): the baseline that says how much of a latent's
"interpretability" the SAE and the scoring find in a model that learnt nothing (Heap et al.,
2025). The spec is what a run records as its subject model, so every stage that reloads the
model for a run gets the same re-initialised weights. Parsed here and nowhere else; this
module imports nothing heavy, so the report can describe a model without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sae.errors import UserError

RANDOM_MARK = "@random"
_RANDOM_SPEC = re.compile(r"(?P<name>.+)@random:(?P<seed>[0-9]+)")
# torch.manual_seed takes any seed below 2**64.
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ModelSpec:
    """A subject model: the model whose config and tokenizer are used, and for the
    random-model control the seed its weights were re-initialised with (None: its own
    trained weights)."""

    name: str
    init_seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.init_seed is not None

    def __str__(self) -> str:
        return self.name if self.init_seed is None else f"{self.name}{RANDOM_MARK}:{self.init_seed}"

    def describe(self) -> str:
        """The model as a reader should see it: says plainly when its weights are random."""
        if self.init_seed is None:
            return self.name
        return f"{self.name}, weights re-initialised (seed {self.init_seed}), not trained"


def parse_model_spec(spec: str) -> ModelSpec:
    """`NAME` or `NAME@random:SEED`; a UserError for anything else that names `@random`."""
    if RANDOM_MARK not in spec:
        return ModelSpec(spec)
    found = _RANDOM_SPEC.fullmatch(spec)
    if found is None or RANDOM_MARK in found["name"] or int(found["seed"]) > _MAX_SEED:
        raise UserError(
            f"bad model spec {spec!r}: a re-initialised model is written NAME@random:SEED "
            "with one seed from 0 to 2**64-1, e.g. smollm2@random:1234"
        )
    return ModelSpec(found["name"], int(found["seed"]))


def random_model_spec(name: str, seed: int) -> str:
    """The spec of `name` with its weights re-initialised under `seed`."""
    base = parse_model_spec(name)
    if base.is_random:
        raise UserError(
            f"model {name!r} is already re-initialised: a random-model control needs the "
            "trained model's name"
        )
    if not 0 <= seed <= _MAX_SEED:
        raise UserError(f"random-model seed {seed} is out of range: use 0 to 2**64-1")
    return str(ModelSpec(base.name, seed))


def describe_model(spec: str) -> str:
    """`describe()` of a recorded subject model; a spec that does not parse is shown as is."""
    try:
        return parse_model_spec(spec).describe()
    except UserError:
        return spec
