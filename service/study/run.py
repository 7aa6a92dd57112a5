"""`autointerp run study.toml`: the whole study from one config file.

train (or import SAEs trained elsewhere) -> record in the store -> match -> cache -> queue ->
score -> report. Each stage is skipped when its outputs are already there, so rerunning an
interrupted study resumes it.
The resolved study config is written to `OUT/study_config.json` before any stage runs.
"""

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sae.train import TrainProgress, cache_activations, train
from service.cache.stage import cache_run
from service.progress import token_progress
from service.report import ReportResult, make_report, write_html
from service.scoring.campaign import open_campaign
from service.scoring.worker import run_score
from service.store.engine import Store, open_store, upgrade
from service.store.imported import record_import
from service.store.matches import matching_recorded, record_matching
from service.store.runs import record_training
from service.store.sampling import queue_run
from service.study.config import StudyConfig

Announce = Callable[[str, str], None]


def run_study(study: StudyConfig, db_url: str, home: Path, console: Console) -> ReportResult:
    """Run every stage that has not finished yet, then build the report."""

    def announce(stage: str, detail: str) -> None:
        console.print(f"[bold]{stage}[/]: {detail}", highlight=False)

    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study_config.json").write_text(study.model_dump_json(indent=2))
    upgrade(db_url)
    store = open_store(db_url)
    try:
        if study.import_saes is not None:
            saes = record_import(store, study.name, study.import_saes, home, path=study.out)
            kinds = ", ".join(f"seed {s.seed}: {s.layout} {s.architecture}" for s in saes)
            announce("import", f"recorded {len(saes)} SAEs ({kinds})")
        else:
            _train(study, store, home, console, announce)
        _match(study, store, announce)
        _cache(study, store, home, announce)
        queued = queue_run(
            store,
            study.name,
            lambda session: open_campaign(session, study.score.job, study.score.llm),
            study.queue,
        )
        announce(
            "queue", f"{queued.selected} latents, {queued.inserted} new jobs ({queued.campaign})"
        )
        scoring = study.score.model_copy(update={"stage": study.queue.stage})
        stats = run_score(db_url, home, scoring, console=console)
        announce("score", f"{stats.completed} latents explained and scored in this call")
        result = make_report(store, study.name, study.report, campaign=queued.campaign_id)
        if study.report.html is not None:
            write_html(result, study.report.html)
            announce("report", f"HTML written to {study.report.html}")
        return result
    finally:
        store.dispose()


def _train(
    study: StudyConfig, store: Store, home: Path, console: Console, announce: Announce
) -> None:
    config = study.train
    if config.epochs > 1 and config.activation_cache is None:
        # Several epochs read activations from a disk cache instead of rerunning the model.
        activation_cache = study.out / "activations"
        with token_progress("caching activations", console) as update:
            cache_activations(config, activation_cache, home, on_progress=update)
        config = config.model_copy(update={"activation_cache": str(activation_cache)})
    with token_progress("train", console) as update:

        def on_progress(state: TrainProgress) -> None:
            update(state.tokens, state.total_tokens, f"FVU {state.fvu:.3f}")

        result = train(config, study.out, home, on_progress)
    if result.interrupted:
        raise KeyboardInterrupt
    verb = "already trained" if result.already_finished else "trained"
    fvus = ", ".join(f"seed {s.seed}: FVU {s.fvu:.3f}, L0 {s.l0:.1f}" for s in result.saes)
    announce("train", f"{verb} {len(result.saes)} SAEs ({fvus})")
    record_training(store, study.name, config, study.out, result.saes)


def _match(study: StudyConfig, store: Store, announce: Announce) -> None:
    if matching_recorded(store, study.name):
        announce("match", "already stored")
        return
    matches = record_matching(store, study.name, study.match)
    for hookpoint, pairs in matches.items():
        shared = [m.summary.shared_fraction for m in pairs.values()]
        announce(
            "match",
            f"{hookpoint}: {len(pairs)} ordered pairs, shared fraction "
            f"{min(shared):.1%}..{max(shared):.1%}",
        )


def _cache(study: StudyConfig, store: Store, home: Path, announce: Announce) -> None:
    summary = cache_run(
        store, study.name, home, study.cache, announce=lambda line: announce("cache", line)
    )
    if not summary.written:
        announce("cache", f"already stored (cache version {summary.version})")
        return
    dead = sum(s.dead for s in summary.saes)
    announce(
        "cache",
        f"{summary.n_tokens:,} tokens, {sum(s.n_examples for s in summary.saes):,} windows, "
        f"{dead} dead latents",
    )
