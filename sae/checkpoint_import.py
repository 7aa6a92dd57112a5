"""SAEs this tool did not train: finding one checkpoint folder per seed and checking each
against the subject model before anything is recorded.

`ImportConfig` names the subject model, the hookpoint, the dataset later stages read, and
the checkpoint folders: one folder per seed, or one folder in sparsify's multi-seed layout
(`FOLDER/seed<N>/`, or `FOLDER/<hookpoint>/seed<N>/` as `sparsify` and `autointerp train`
write it). Each checkpoint is sparsify's (`cfg.json` + `sae.safetensors`, activation topk
or groupmax), SAELens's (`cfg.json` + `sae_weights.safetensors`; standard, topk, jumprelu)
or this tool's own (sparsify layout with an `architecture` key).

A folder that is half written (one of the two files missing, a leftover temporary file, a
truncated tensor file), an architecture no module of `sae.architectures` reads, a setting
whose effect the stored weights do not carry, or a `d_in` that is not the hookpoint's width
is refused in one line, before the store is touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from sae.architectures import architecture_of
from sae.architectures.base import checkpoint_k
from sae.checkpoint import CONFIG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SaeWeights, load_sae
from sae.errors import UserError

SEED_FOLDER = re.compile(r"seed(\d+)$")
# Architectures whose per-token selection is a fixed number of latents.
K_ARCHITECTURES = ("topk", "batchtopk", "groupmax")
# Settings (key: allowed values) under which the saved tensors alone do not give the latents
# of this hookpoint's output: SAELens's decoder-norm rescaling and reshaped inputs, and
# sparsify's transcoders (which read one module and reconstruct another).
UNSUPPORTED_SETTINGS = {
    "rescale_acts_by_decoder_norm": (False, None),
    "reshape_activations": ("none", None),
    "transcode": (False, None),
}


class ImportConfig(BaseModel):
    """SAEs trained elsewhere, recorded as a run; saved with the run as its config."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="smollm2", description="subject model the SAEs read: embedded name, folder or HF id"
    )
    hookpoint: str = Field(
        default="model.layers.6.mlp", description="module whose output the SAEs encode"
    )
    dataset: str = Field(
        default="embedded", description="embedded, a .txt/.jsonl path or HF dataset (for cache)"
    )
    folders: list[str] = Field(
        default_factory=list,
        description="one checkpoint folder per seed, or one folder holding seed<N>/ folders",
    )
    seeds: list[int] | None = Field(
        default=None,
        description="seed of each folder, in order (default: from seed<N> names, else 0, 1, ...)",
    )

    @model_validator(mode="after")
    def _check(self) -> ImportConfig:
        if not self.folders:
            raise UserError("no checkpoint folders given: pass one folder per seed")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds {self.seeds} repeat a seed: list each seed once")
        return self


@dataclass(frozen=True)
class ImportedSae:
    """One checkpoint that passed every check."""

    seed: int
    folder: Path
    layout: str  # "sparsify" or "saelens"
    architecture: str
    n_latents: int
    d_in: int
    k: int | None


def _seed_subfolders(folder: Path, hookpoint: str) -> dict[int, Path]:
    # sparsify names hookpoints inside the base model (`h.1.mlp` for `transformer.h.1.mlp`).
    parts = hookpoint.split(".")
    names = [".".join(parts[start:]) for start in range(len(parts))]
    for root in [folder / name for name in names] + [folder]:
        if not root.is_dir():
            continue
        found = {}
        for child in sorted(root.iterdir()):
            name = SEED_FOLDER.fullmatch(child.name)
            if name and child.is_dir():
                found[int(name.group(1))] = child
        if found:
            return found
    return {}


def seed_folders(config: ImportConfig) -> dict[int, Path]:
    """Seed -> checkpoint folder, as the config gives them (see the module docstring)."""
    folders = [Path(folder).expanduser() for folder in config.folders]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"checkpoint folder {folder} does not exist: check the path")
    is_checkpoint = [
        (folder / CONFIG).exists()
        or (folder / SPARSIFY_WEIGHTS).exists()
        or (folder / SAELENS_WEIGHTS).exists()
        for folder in folders
    ]
    if len(folders) == 1 and not is_checkpoint[0]:
        found = _seed_subfolders(folders[0], config.hookpoint)
        if not found:
            raise UserError(
                f"{folders[0]} is neither a checkpoint folder (cfg.json + weights) nor a "
                f"folder of seed<N>/ checkpoints (also looked in {folders[0] / config.hookpoint})"
                ": pass one checkpoint folder per seed"
            )
        if config.seeds is not None:
            missing = sorted(set(config.seeds) - set(found))
            if missing:
                raise UserError(
                    f"{folders[0]} has no seed{missing[0]}/ folder (has seeds "
                    f"{', '.join(map(str, found))}): fix --seeds"
                )
            found = {seed: found[seed] for seed in config.seeds}
        return found
    if config.seeds is not None:
        if len(config.seeds) != len(folders):
            raise UserError(
                f"{len(config.seeds)} seeds for {len(folders)} folders: give one seed per folder"
            )
        seeds = list(config.seeds)
    else:
        named = [SEED_FOLDER.search(folder.name) for folder in folders]
        if all(named) and len({match.group(1) for match in named if match}) == len(folders):
            seeds = [int(match.group(1)) for match in named if match]
        else:
            seeds = list(range(len(folders)))
    return dict(zip(seeds, folders, strict=True))


def _check_complete(folder: Path) -> None:
    leftovers = sorted(p.name for p in folder.glob(".*.tmp"))
    if leftovers:
        raise UserError(
            f"{folder} is half written (temporary file {leftovers[0]} left by an interrupted "
            "save): finish or redo the save"
        )
    has_config = (folder / CONFIG).is_file()
    weights = [name for name in (SPARSIFY_WEIGHTS, SAELENS_WEIGHTS) if (folder / name).is_file()]
    if has_config and not weights:
        raise UserError(
            f"{folder} is half written: it has {CONFIG} but neither {SPARSIFY_WEIGHTS} nor "
            f"{SAELENS_WEIGHTS}; finish or redo the save"
        )
    if weights and not has_config:
        raise UserError(
            f"{folder} is half written: it has {weights[0]} but no {CONFIG}; finish or redo "
            "the save"
        )


def _check_settings(weights: SaeWeights, folder: Path) -> None:
    for key, allowed in UNSUPPORTED_SETTINGS.items():
        value = weights.cfg.get(key)
        if value not in allowed:
            raise UserError(
                f"{folder / CONFIG} sets {key}={value!r}, which this tool cannot encode with: "
                "import SAEs without it"
            )


def inspect_checkpoint(folder: Path, seed: int) -> ImportedSae:
    """Load one checkpoint and check that every later stage can use it."""
    _check_complete(folder)
    weights = load_sae(folder)
    architecture = architecture_of(weights.cfg)
    _check_settings(weights, folder)
    if architecture in ("jumprelu", "batchtopk") and weights.threshold is None:
        raise UserError(
            f"{folder} is a {architecture} SAE without its threshold tensor: re-save it with it"
        )
    k = checkpoint_k(weights.cfg) if architecture in K_ARCHITECTURES else None
    layout = "sparsify" if (folder / SPARSIFY_WEIGHTS).is_file() else "saelens"
    return ImportedSae(
        seed=seed,
        folder=folder.resolve(),
        layout=layout,
        architecture=architecture,
        n_latents=weights.n_latents,
        d_in=weights.d_in,
        k=k,
    )


def inspect_checkpoints(config: ImportConfig) -> list[ImportedSae]:
    """Every seed's checkpoint, checked, in seed order; they must share architecture and size."""
    folders = sorted(seed_folders(config).items())
    saes = [inspect_checkpoint(folder, seed) for seed, folder in folders]
    first = saes[0]
    for sae in saes[1:]:
        if (sae.architecture, sae.n_latents, sae.d_in) != (
            first.architecture,
            first.n_latents,
            first.d_in,
        ):
            raise UserError(
                f"seed {sae.seed} ({sae.folder}) is a {sae.architecture} SAE of {sae.n_latents} "
                f"latents on d_in {sae.d_in}, seed {first.seed} a {first.architecture} of "
                f"{first.n_latents} on {first.d_in}: a run's seeds must be the same SAE"
            )
    return saes


def check_widths(saes: Sequence[ImportedSae], model: nn.Module, hookpoint: str) -> int:
    """The hookpoint's width; a UserError when any SAE's d_in differs from it."""
    # Imported here: transformers takes seconds to import, and every `autointerp` command
    # imports this module for `ImportConfig`.
    from sae.subject_model import hookpoint_width

    width = hookpoint_width(model, hookpoint)
    for sae in saes:
        if sae.d_in != width:
            raise UserError(
                f"{sae.folder} has d_in {sae.d_in} but {hookpoint} outputs width {width}: "
                "name the hookpoint (and model) these SAEs were trained on"
            )
    return width
