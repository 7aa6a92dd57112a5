"""Runs, their SAEs and their latents in the store: finding a run by name, registering runs
and SAEs (one `latent` row per latent), recording what `sae.train` trained, and the latents'
firing statistics. Arrays come in as anything numpy can read. The register and store
functions work in the caller's session; the caller commits.

A run's random-model control (the same study on the subject model with re-initialised
weights, `autointerp run` with `random_model_seed`) is the run named
`random_control_name(run)`, recorded with the model spec `MODEL@random:SEED`;
`find_random_control` is how readers find it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from sae.checkpoint import load_sae
from sae.errors import UserError
from sae.model_spec import parse_model_spec
from sae.train import TrainConfig, TrainedSae
from service.store.engine import Store
from service.store.models import Latent, Run, Sae

LATENT_CHUNK = 5000


def get_run(session: Session, name: str) -> Run:
    """The run called `name`, or a UserError that says how to list the runs there are."""
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    if run is None:
        known = session.scalars(select(Run.name).order_by(Run.name).limit(10)).all()
        listing = ", ".join(known) if known else "none yet"
        raise UserError(f"no run named {name!r} in the store (runs: {listing}); check --run")
    return run


def random_control_name(run_name: str) -> str:
    """The name of the random-model control run of `run_name`."""
    return f"{run_name}-random"


def find_random_control(session: Session, run: Run) -> Run | None:
    """The random-model control of `run`: the run `random_control_name(run.name)`, when it is
    one (its model is `run`'s re-initialised, and its data and SAE settings are `run`'s);
    None otherwise, or when `run` is itself on a re-initialised model."""
    if parse_model_spec(run.subject_model).is_random:
        return None
    control = session.scalars(
        select(Run).where(Run.name == random_control_name(run.name))
    ).one_or_none()
    if control is None:
        return None
    spec = parse_model_spec(control.subject_model)
    same = (control.dataset, control.architecture, control.n_latents, control.k) == (
        run.dataset,
        run.architecture,
        run.n_latents,
        run.k,
    )
    return control if spec.is_random and spec.name == run.subject_model and same else None


def register_run(
    session: Session,
    name: str,
    *,
    subject_model: str,
    hookpoint: str,
    dataset: str,
    architecture: str,
    n_latents: int,
    k: int | None,
    seeds: Sequence[int],
    path: str | None = None,
    config: dict[str, Any] | None = None,
) -> Run:
    """Create the run `name`, or bring an existing one up to date (re-running a stage)."""
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    if run is None:
        run = Run(name=name)
        session.add(run)
    run.subject_model = subject_model
    run.hookpoint = hookpoint
    run.dataset = dataset
    run.architecture = architecture
    run.n_latents = n_latents
    run.k = k
    run.seeds = [int(seed) for seed in seeds]
    run.path = path
    run.config = dict(config or {})
    session.flush()
    return run


def register_sae(
    session: Session,
    run: Run,
    seed: int,
    *,
    n_latents: int,
    d_in: int,
    hookpoint: str | None = None,
    path: str | None = None,
    architecture: str | None = None,
    k: int | None = None,
    fvu: float | None = None,
    l0: float | None = None,
    dead_fraction: float | None = None,
) -> Sae:
    """Create or update the SAE of `run` for `seed`, with one `latent` row per latent."""
    hookpoint = hookpoint or run.hookpoint
    sae = session.scalars(
        select(Sae).where(Sae.run_id == run.id, Sae.hookpoint == hookpoint, Sae.seed == seed)
    ).one_or_none()
    if sae is None:
        sae = Sae(run_id=run.id, seed=seed, hookpoint=hookpoint, n_latents=n_latents)
        session.add(sae)
    elif sae.n_latents != n_latents:
        raise UserError(
            f"run {run.name!r} already has a seed-{seed} SAE at {hookpoint} with "
            f"{sae.n_latents} latents, not {n_latents}; use a new run name"
        )
    sae.path = path
    sae.d_in = d_in
    sae.architecture = architecture or run.architecture
    sae.k = k if k is not None else run.k
    sae.fvu = fvu
    sae.l0 = l0
    sae.dead_fraction = dead_fraction
    session.flush()
    insert_ignore = (
        postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    )
    for start in range(0, n_latents, LATENT_CHUNK):
        rows = [
            {"sae_id": sae.id, "index": index}
            for index in range(start, min(start + LATENT_CHUNK, n_latents))
        ]
        session.execute(
            insert_ignore(Latent)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["sae_id", "index"])
        )
    return sae


def latent_ids(session: Session, sae: Sae) -> np.ndarray:
    """Primary keys of the SAE's latents, indexed by latent index."""
    ids = np.full(sae.n_latents, -1, dtype=np.int64)
    # Rows are tuples, whose .index is a method: unpack them instead.
    for index, latent_id in session.execute(
        select(Latent.index, Latent.id).where(Latent.sae_id == sae.id)
    ):
        ids[index] = latent_id
    return ids


def store_latent_stats(
    session: Session,
    sae: Sae,
    firing_count: npt.ArrayLike,
    n_tokens: int,
    max_activation: npt.ArrayLike,
) -> None:
    """Record how often each latent fired over `n_tokens` tokens and its largest activation."""
    counts = np.asarray(firing_count, dtype=np.int64)
    maxima = np.asarray(max_activation, dtype=np.float64)
    if counts.shape != (sae.n_latents,) or maxima.shape != (sae.n_latents,):
        raise ValueError(f"expected {sae.n_latents} values per latent")
    ids = latent_ids(session, sae)
    session.execute(
        update(Latent),
        [
            {
                "id": int(ids[index]),
                "firing_count": int(counts[index]),
                "firing_frequency": float(counts[index]) / n_tokens if n_tokens else 0.0,
                "max_activation": float(maxima[index]),
            }
            for index in range(sae.n_latents)
        ],
    )


def record_training(
    store: Store, run_name: str, config: TrainConfig, out: Path, saes: list[TrainedSae]
) -> None:
    """Create or update run `run_name` with one SAE row per trained (hookpoint, seed)."""
    with store.session() as session:
        run = register_run(
            session,
            run_name,
            subject_model=config.model,
            hookpoint=config.hookpoints[0],
            dataset=config.dataset,
            architecture=config.sae.architecture,
            n_latents=config.sae.n_latents,
            k=config.sae.k if config.sae.architecture in ("topk", "batchtopk") else None,
            seeds=config.seeds,
            path=str(out.resolve()),
            config=config.model_dump(mode="json"),
        )
        for trained in saes:
            d_in = load_sae(trained.path).d_in
            register_sae(
                session,
                run,
                trained.seed,
                n_latents=config.sae.n_latents,
                d_in=d_in,
                hookpoint=trained.hookpoint,
                path=str(trained.path.resolve()),
                fvu=trained.fvu,
                l0=trained.l0,
                dead_fraction=trained.dead_fraction,
            )
        session.commit()


def run_saes(store: Store, run_name: str) -> dict[str, dict[int, Sae]]:
    """The run's SAEs by hookpoint and seed; a UserError when it has none."""
    with store.read_session() as session:
        run = get_run(session, run_name)
        rows = session.scalars(select(Sae).where(Sae.run_id == run.id)).all()
    by_hookpoint: dict[str, dict[int, Sae]] = {}
    for sae in rows:
        by_hookpoint.setdefault(sae.hookpoint, {})[sae.seed] = sae
    if not by_hookpoint:
        raise UserError(f"run {run_name!r} has no trained SAEs: run `autointerp train` first")
    return by_hookpoint
