"""Latent matching between two SAEs, as Paulo & Belrose (2025) define it.

Rows of `W_dec` are L2-normalised, and separately rows of the encoder weight; each set gets its
own maximum-cosine assignment (`sae.matching.solvers`). A latent of SAE A is *shared* with SAE
B when its decoder match and its encoder match both have cosine strictly above the threshold
(0.7). Also reported: the decoder-only criterion, how often the two assignments pick the same
partner, mean matched cosines, and the solver's proven gap bound.

A row that cannot be normalised (all zeros, or not finite) takes no part in the assignment:
its latent is unmatched (partner -1, cosine NaN), never shared, and counted.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from sae.checkpoint import SaeWeights, load_sae, write_atomically
from sae.errors import UserError
from sae.matching.solvers import (
    PROVEN_GAP,
    WIDEN_ROUNDS,
    Assignment,
    Progress,
    assign_exact,
    assign_sparse,
)

Solver = Literal["auto", "exact", "sparse"]


class MatchConfig(BaseModel):
    """How two SAEs are matched; saved beside any stored result."""

    threshold: float = Field(
        default=0.7, ge=-1.0, le=1.0, description="a latent is shared when both cosines are > this"
    )
    solver: Solver = Field(
        default="auto",
        description="auto (sparse where its bound proves the optimum, else exact if it fits), "
        "exact (dense) or sparse (candidate graph with a proven gap bound)",
    )
    exact_max_latents: int = Field(
        default=16384,
        ge=1,
        description="auto falls back to the exact solver up to this many latents",
    )
    candidates: int = Field(
        default=32, ge=1, description="sparse solver: partners kept per row and column"
    )
    widen_rounds: int = Field(
        default=WIDEN_ROUNDS,
        ge=0,
        description="sparse solver: times the lists of the rows and columns in the way of a "
        "proof are made longer and the graph solved again (0: solve the top-k graph once)",
    )
    block_rows: int | None = Field(
        default=None,
        ge=1,
        description="rows of the cosine matrix per block (default 1,024 on the CPU; on a GPU "
        "up to 8,192, as its memory allows)",
    )
    into_larger: bool = Field(
        default=False, description="allow different latent counts (smaller into larger)"
    )


def invert_assignment(
    partner: np.ndarray, cosine: np.ndarray, n_b: int
) -> tuple[np.ndarray, np.ndarray]:
    """A's assignment into B read from B's side: for each latent of B, its partner in A (-1
    where none) and their cosine (NaN where none). The one place a stored matching is read
    backwards; the inverse of an optimal assignment is optimal, so nothing is re-solved.
    Entries of `partner` that are -1 or out of B's range are ignored."""
    partner = np.asarray(partner, dtype=np.int64)
    inverse = np.full(n_b, -1, dtype=np.int64)
    inverse_cosine = np.full(n_b, np.nan)
    matched = np.flatnonzero((partner >= 0) & (partner < n_b))
    inverse[partner[matched]] = matched
    inverse_cosine[partner[matched]] = np.asarray(cosine, dtype=np.float64)[matched]
    return inverse, inverse_cosine


@dataclass
class SideAssignment:
    """One assignment (decoder or encoder) over all latents of A, in A's and B's indices."""

    partner: np.ndarray  # int64 (n_a,), -1 where unmatched
    cosine: np.ndarray  # float64 (n_a,), NaN where unmatched
    solver: str
    objective: float
    gap_bound: float
    candidate_edges: int
    invalid_a: int  # rows of A that could not be normalised
    invalid_b: int
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def reversed(self, n_b: int) -> SideAssignment:
        """The same matching seen from B."""
        partner, cosine = invert_assignment(self.partner, self.cosine, n_b)
        return SideAssignment(
            partner,
            cosine,
            self.solver,
            self.objective,
            self.gap_bound,
            self.candidate_edges,
            self.invalid_b,
            self.invalid_a,
            self.phase_seconds,
        )


class MatchSummary(BaseModel):
    """The numbers of one A-to-B matching (the `--json` output)."""

    n_latents: int
    n_latents_b: int
    d_in: int
    threshold: float
    shared_fraction: float
    shared_fraction_decoder_only: float
    shared_fraction_encoder_only: float
    encoder_decoder_agreement: float = Field(
        description="fraction of A's latents whose decoder and encoder partners are the same"
    )
    agreement_among_shared: float | None
    mean_cos_decoder: float
    mean_cos_encoder: float
    unmatched_decoder: int
    unmatched_encoder: int
    invalid_rows: dict[str, int] = Field(description="zero or non-finite rows per matrix")
    solver: str
    seconds: float
    objective_decoder: float
    objective_encoder: float
    gap_bound_decoder: float = Field(description="proven: exact optimum - objective <= this")
    gap_bound_encoder: float
    candidate_edges: int
    phase_seconds: dict[str, float] = Field(
        default_factory=dict, description="seconds per side and phase, e.g. 'decoder solve'"
    )


@dataclass
class PairMatch:
    """Per-latent result of matching SAE A into SAE B, plus its summary."""

    decoder: SideAssignment
    encoder: SideAssignment
    config: MatchConfig
    summary: MatchSummary

    @property
    def shared(self) -> np.ndarray:
        return shared_mask(self.decoder.cosine, self.encoder.cosine, self.config.threshold)

    def reversed(self) -> PairMatch:
        """B matched into A, from the same assignments."""
        n_b = self.summary.n_latents_b
        decoder, encoder = self.decoder.reversed(n_b), self.encoder.reversed(n_b)
        summary = summarise(
            decoder,
            encoder,
            self.config.threshold,
            n_b,
            self.summary.n_latents,
            self.summary.d_in,
            self.summary.seconds,
        )
        return PairMatch(decoder, encoder, self.config, summary)


def shared_mask(cos_decoder: np.ndarray, cos_encoder: np.ndarray, threshold: float) -> np.ndarray:
    """Shared latents: both matched cosines strictly above the threshold (NaN is never)."""
    with np.errstate(invalid="ignore"):
        return (cos_decoder > threshold) & (cos_encoder > threshold)


# Rows normalised at a time (their float64 copy stays in cache; one of a whole 131K x 576
# matrix would be 0.6 GB).
UNIT_CHUNK = 1024


def unit_rows(weight: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Rows scaled to unit L2 norm in float32, and which rows could be normalised.

    Norms are taken in float64 so large weights do not overflow to inf."""
    weight = weight.detach()
    unit = torch.empty(weight.shape, dtype=torch.float32)
    valid = torch.empty(weight.shape[0], dtype=torch.bool)
    for start in range(0, weight.shape[0], UNIT_CHUNK):
        # A copy even of float64 weights: it is divided in place.
        rows = weight[start : start + UNIT_CHUNK].to(torch.float64, copy=True)
        norms = torch.linalg.vector_norm(rows, dim=1)
        fine = torch.isfinite(norms) & (norms > 0)
        rows.div_(norms[:, None]).masked_fill_(~fine[:, None], 0.0)
        unit[start : start + rows.shape[0]] = rows
        valid[start : start + rows.shape[0]] = fine
    return unit, valid.numpy()


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _dense_fits(p: int, q: int) -> bool:
    available = available_memory()
    return available is None or 8 * p * q <= available


def _check_dense_fits(p: int, q: int) -> None:
    if not _dense_fits(p, q):
        needed, available = 8 * p * q, available_memory() or 0
        raise UserError(
            f"exact matching of {p:,} x {q:,} latents needs a {needed / 2**30:.1f} GiB dense "
            f"matrix but {available / 2**30:.1f} GiB is available; use --solver sparse"
        )


def match_directions(
    a: torch.Tensor,
    b: torch.Tensor,
    config: MatchConfig,
    progress: Progress | None = None,
    stage: str = "match",
) -> SideAssignment:
    """Maximum-cosine assignment of the rows of `a` to the rows of `b` (any counts)."""
    unit_a, valid_a = unit_rows(a)
    unit_b, valid_b = unit_rows(b)
    index_a, index_b = np.flatnonzero(valid_a), np.flatnonzero(valid_b)
    partner = np.full(a.shape[0], -1, dtype=np.int64)
    cosine = np.full(a.shape[0], np.nan)
    result: Assignment | None = None
    if index_a.size and index_b.size:
        # Only rows that could be normalised take part (no copy when all could).
        rows = unit_a if index_a.size == a.shape[0] else unit_a[torch.from_numpy(index_a)]
        cols = unit_b if index_b.size == b.shape[0] else unit_b[torch.from_numpy(index_b)]
        # The solvers cover every row of the smaller side; transpose when A is larger.
        flipped = rows.shape[0] > cols.shape[0]
        if flipped:
            rows, cols = cols, rows
        if config.solver == "exact":
            _check_dense_fits(rows.shape[0], cols.shape[0])
            result = assign_exact(rows, cols, config.block_rows, progress, stage)
        else:
            result = assign_sparse(
                rows,
                cols,
                config.candidates,
                config.block_rows,
                progress,
                stage,
                widen_rounds=config.widen_rounds,
            )
            # auto: a sparse answer the bound does not prove optimal is solved densely when
            # that is allowed and fits.
            if (
                config.solver == "auto"
                and result.gap_bound > PROVEN_GAP
                and max(a.shape[0], b.shape[0]) <= config.exact_max_latents
                and _dense_fits(rows.shape[0], cols.shape[0])
            ):
                spent = result.phase_seconds
                result = assign_exact(rows, cols, config.block_rows, progress, stage)
                result.phase_seconds |= {f"sparse {name}": t for name, t in spent.items()}
        if flipped:
            partner[index_a[result.partner]] = index_b
            cosine[index_a[result.partner]] = result.cosine
        else:
            partner[index_a] = index_b[result.partner]
            cosine[index_a] = result.cosine
    return SideAssignment(
        partner=partner,
        cosine=cosine,
        solver=result.solver if result else "none",
        objective=result.objective if result else 0.0,
        gap_bound=result.gap_bound if result else 0.0,
        candidate_edges=result.candidate_edges if result else 0,
        invalid_a=int((~valid_a).sum()),
        invalid_b=int((~valid_b).sum()),
        phase_seconds=result.phase_seconds if result else {},
    )


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarise(
    decoder: SideAssignment,
    encoder: SideAssignment,
    threshold: float,
    n_a: int,
    n_b: int,
    d_in: int,
    seconds: float,
) -> MatchSummary:
    """The summary numbers of a pair of assignments over A's `n_a` latents."""
    shared = shared_mask(decoder.cosine, encoder.cosine, threshold)
    with np.errstate(invalid="ignore"):
        decoder_only = decoder.cosine > threshold
        encoder_only = encoder.cosine > threshold
    agree = (decoder.partner == encoder.partner) & (decoder.partner >= 0)
    denominator = max(n_a, 1)
    return MatchSummary(
        n_latents=n_a,
        n_latents_b=n_b,
        d_in=d_in,
        threshold=threshold,
        shared_fraction=float(shared.sum() / denominator),
        shared_fraction_decoder_only=float(decoder_only.sum() / denominator),
        shared_fraction_encoder_only=float(encoder_only.sum() / denominator),
        encoder_decoder_agreement=float(agree.sum() / denominator),
        agreement_among_shared=float(agree[shared].mean()) if shared.any() else None,
        mean_cos_decoder=_mean(decoder.cosine),
        mean_cos_encoder=_mean(encoder.cosine),
        unmatched_decoder=int((decoder.partner < 0).sum()),
        unmatched_encoder=int((encoder.partner < 0).sum()),
        invalid_rows={
            "decoder_a": decoder.invalid_a,
            "decoder_b": decoder.invalid_b,
            "encoder_a": encoder.invalid_a,
            "encoder_b": encoder.invalid_b,
        },
        solver=decoder.solver if decoder.solver == encoder.solver else "mixed",
        seconds=seconds,
        objective_decoder=decoder.objective,
        objective_encoder=encoder.objective,
        gap_bound_decoder=decoder.gap_bound,
        gap_bound_encoder=encoder.gap_bound,
        candidate_edges=decoder.candidate_edges + encoder.candidate_edges,
        phase_seconds={
            f"{name} {phase}": seconds
            for name, side in (("decoder", decoder), ("encoder", encoder))
            for phase, seconds in side.phase_seconds.items()
        },
    )


def check_compatible(a: SaeWeights, b: SaeWeights, config: MatchConfig, names=("A", "B")) -> None:
    """Raise UserError unless A and B can be matched under `config`."""
    if a.d_in != b.d_in:
        raise UserError(
            f"{names[0]} has d_in {a.d_in} but {names[1]} has d_in {b.d_in}: SAEs of different "
            "hookpoints or models cannot be matched; pick two SAEs trained on the same activations"
        )
    if a.n_latents != b.n_latents and not config.into_larger:
        raise UserError(
            f"{names[0]} has {a.n_latents} latents but {names[1]} has {b.n_latents}; pass "
            "--into-larger to match the smaller SAE into the larger one"
        )


def match_saes(
    a: SaeWeights,
    b: SaeWeights,
    config: MatchConfig | None = None,
    progress: Progress | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> PairMatch:
    """Match every latent of `a` into `b` by decoder and by encoder directions."""
    config = config or MatchConfig()
    check_compatible(a, b, config, names)
    started = time.perf_counter()
    decoder = match_directions(a.W_dec, b.W_dec, config, progress, "decoder")
    encoder = match_directions(a.encoder_weight, b.encoder_weight, config, progress, "encoder")
    seconds = time.perf_counter() - started
    summary = summarise(
        decoder, encoder, config.threshold, a.n_latents, b.n_latents, a.d_in, seconds
    )
    return PairMatch(decoder, encoder, config, summary)


def match_checkpoints(
    path_a: Path, path_b: Path, config: MatchConfig | None = None, progress: Progress | None = None
) -> PairMatch:
    """Load two checkpoint folders (sparsify or SAELens layout) and match them."""
    return match_saes(
        load_sae(path_a), load_sae(path_b), config, progress, (str(path_a), str(path_b))
    )


ASSIGNMENT_COLUMNS = (
    "latent",
    "decoder_partner",
    "decoder_cosine",
    "encoder_partner",
    "encoder_cosine",
    "shared",
)
SIDES = ("decoder", "encoder")


def write_assignment(path: Path, match: PairMatch) -> None:
    """Per-latent partners and cosines: `.csv` (one row per latent) or `.npz` (arrays).

    Unmatched latents have partner -1 and an empty (CSV) or NaN (npz) cosine. The config it
    ran with and the summary go beside it, in the same name with `.json`."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npz"):
        raise UserError(f"cannot write {path}: the assignment file must end in .csv or .npz")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it")
    columns: dict[str, Any] = {
        "latent": np.arange(match.decoder.partner.shape[0]),
        "decoder_partner": match.decoder.partner,
        "decoder_cosine": match.decoder.cosine,
        "encoder_partner": match.encoder.partner,
        "encoder_cosine": match.encoder.cosine,
        "shared": match.shared,
    }
    record = {
        "config": match.config.model_dump(),
        "summary": match.summary.model_dump(),
        "sides": {side: _side_record(getattr(match, side)) for side in SIDES},
    }
    record_text = json.dumps(record, indent=2) + "\n"
    if suffix == ".npz":
        # The record goes last and both writes are atomic: `read_assignment` never takes an
        # interrupted write for a finished matching.
        path.with_suffix(".json").unlink(missing_ok=True)

        def write_arrays(temp: Path) -> None:
            with open(temp, "wb") as handle:
                np.savez_compressed(handle, threshold=np.float64(match.config.threshold), **columns)

        write_atomically(path, write_arrays)
        write_atomically(path.with_suffix(".json"), lambda temp: temp.write_text(record_text))
        return
    path.with_suffix(".json").write_text(record_text)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ASSIGNMENT_COLUMNS)
        for i in range(columns["latent"].shape[0]):
            writer.writerow(
                [
                    i,
                    int(columns["decoder_partner"][i]),
                    _cell(columns["decoder_cosine"][i]),
                    int(columns["encoder_partner"][i]),
                    _cell(columns["encoder_cosine"][i]),
                    int(columns["shared"][i]),
                ]
            )


def _cell(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.6f}"


def _side_record(side: SideAssignment) -> dict[str, Any]:
    return {
        "solver": side.solver,
        "objective": side.objective,
        "gap_bound": side.gap_bound,
        "candidate_edges": side.candidate_edges,
        "invalid_a": side.invalid_a,
        "invalid_b": side.invalid_b,
        "phase_seconds": side.phase_seconds,
    }


def same_assignment_config(a: MatchConfig, b: MatchConfig) -> bool:
    """Whether two configs give the same assignments: everything but the threshold, which only
    decides which matched latents count as shared, and the block size, which changes nothing."""
    ignore = {"threshold", "block_rows"}
    return a.model_dump(exclude=ignore) == b.model_dump(exclude=ignore)


def read_assignment(path: Path, config: MatchConfig) -> PairMatch | None:
    """A matching `write_assignment` saved as `.npz`, re-summarised under `config`'s threshold;
    None when there is none, or it was solved under a config that gives other assignments."""
    record_path = path.with_suffix(".json")
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
        saved = MatchConfig(**record["config"])
        summary = record["summary"]
        arrays = np.load(path)
        sides = {
            side: SideAssignment(
                partner=arrays[f"{side}_partner"].astype(np.int64),
                cosine=arrays[f"{side}_cosine"].astype(np.float64),
                **record["sides"][side],
            )
            for side in SIDES
        }
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as error:
        raise UserError(
            f"cannot read the saved matching {path} ({error}); delete it to match again"
        ) from None
    if not same_assignment_config(saved, config):
        return None
    matched = summarise(
        sides["decoder"],
        sides["encoder"],
        config.threshold,
        summary["n_latents"],
        summary["n_latents_b"],
        summary["d_in"],
        summary["seconds"],
    )
    return PairMatch(sides["decoder"], sides["encoder"], config, matched)
