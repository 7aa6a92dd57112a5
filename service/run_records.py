"""Recording what the `sae/` stages produced as a run in the store: the trained SAEs of every
seed, and the matchings between every pair of them."""

import itertools
from pathlib import Path

from sqlalchemy import func, select

from sae.checkpoint import load_sae
from sae.errors import UserError
from sae.matching import MatchConfig, PairMatch
from sae.multiseed import MATCHES_FOLDER, match_pair
from sae.sparse_assignment import Progress
from sae.train import TrainConfig, TrainedSae
from service.store.engine import Store
from service.store.models import MatchPair, Sae
from service.store.results import get_run, register_run, register_sae, store_match_pair


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


def _run_saes(store: Store, run_name: str) -> dict[str, dict[int, Sae]]:
    with store.read_session() as session:
        run = get_run(session, run_name)
        rows = session.scalars(select(Sae).where(Sae.run_id == run.id)).all()
    by_hookpoint: dict[str, dict[int, Sae]] = {}
    for sae in rows:
        by_hookpoint.setdefault(sae.hookpoint, {})[sae.seed] = sae
    if not by_hookpoint:
        raise UserError(f"run {run_name!r} has no trained SAEs: run `autointerp train` first")
    return by_hookpoint


def matching_recorded(store: Store, run_name: str) -> bool:
    """True when every ordered pair of same-hookpoint SAEs of the run has a stored matching."""
    expected = sum(len(s) * (len(s) - 1) for s in _run_saes(store, run_name).values())
    with store.read_session() as session:
        run = get_run(session, run_name)
        stored = session.scalar(
            select(func.count())
            .select_from(MatchPair)
            .join(Sae, Sae.id == MatchPair.sae_a_id)
            .where(Sae.run_id == run.id)
        )
    return expected > 0 and stored == expected


def record_matching(
    store: Store, run_name: str, config: MatchConfig, progress: Progress | None = None
) -> dict[str, dict[tuple[int, int], PairMatch]]:
    """Match every pair of seeds at each hookpoint of the run and store both directions.

    Each pair is committed as soon as it is solved, and its assignments are kept beside the
    checkpoints (`sae.multiseed.match_pair`), so an interrupted run resumes at the pair it was
    solving and `autointerp match --all` on the same folder reuses what was solved here."""
    matches: dict[str, dict[tuple[int, int], PairMatch]] = {}
    for hookpoint, saes in _run_saes(store, run_name).items():
        paths = {seed: Path(str(sae.path)) for seed, sae in saes.items()}
        weights = {seed: load_sae(path) for seed, path in paths.items()}
        finished = next(iter(paths.values())).parent / MATCHES_FOLDER
        pairs: dict[tuple[int, int], PairMatch] = {}
        for a, b in itertools.combinations(sorted(saes), 2):
            match = match_pair(weights, a, b, config, progress, finished)
            with store.session() as session:
                for (x, y), direction in (((a, b), match), ((b, a), match.reversed())):
                    store_match_pair(
                        session,
                        saes[x],
                        saes[y],
                        partner_decoder=direction.decoder.partner,
                        cos_decoder=direction.decoder.cosine,
                        partner_encoder=direction.encoder.partner,
                        cos_encoder=direction.encoder.cosine,
                        solver=direction.summary.solver,
                        threshold=config.threshold,
                        seconds=direction.summary.seconds,
                    )
                    pairs[(x, y)] = direction
                session.commit()
        matches[hookpoint] = pairs
    return matches
