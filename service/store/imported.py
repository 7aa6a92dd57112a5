"""Recording SAEs this tool did not train as a run: every checkpoint is read and checked
against the subject model first (`sae.checkpoint_import`), then the run and one SAE row per
seed are written in one transaction, so a refused import stores nothing.

Training metrics (FVU, L0, dead fraction) are unknown for such SAEs and stay NULL.
"""

from __future__ import annotations

from pathlib import Path

from sae.checkpoint_import import ImportConfig, ImportedSae, check_widths, inspect_checkpoints
from sae.subject_model import load_model
from service.store.engine import Store
from service.store.runs import register_run, register_sae


def record_import(
    store: Store, run_name: str, config: ImportConfig, home: Path, path: Path | None = None
) -> list[ImportedSae]:
    """Check every checkpoint of `config`, then create or update run `run_name` with them.

    `path` is the run's working folder (cache state, cache_config.json); by default the
    cache stage uses `home/runs/<run>`."""
    saes = inspect_checkpoints(config)
    model, _ = load_model(config.model, home)
    check_widths(saes, model, config.hookpoint)
    first = saes[0]
    with store.session() as session:
        run = register_run(
            session,
            run_name,
            subject_model=config.model,
            hookpoint=config.hookpoint,
            dataset=config.dataset,
            architecture=first.architecture,
            n_latents=first.n_latents,
            k=first.k,
            seeds=[sae.seed for sae in saes],
            path=None if path is None else str(path.resolve()),
            config={"import": config.model_dump(mode="json")},
        )
        for sae in saes:
            register_sae(
                session,
                run,
                sae.seed,
                n_latents=sae.n_latents,
                d_in=sae.d_in,
                path=str(sae.folder),
                architecture=sae.architecture,
                k=sae.k,
            )
        session.commit()
    return saes
