"""`autointerp run study.toml`: the whole study from one config file.

train (or import SAEs trained elsewhere) -> record in the store -> cache -> match -> queue ->
score -> report. Each stage is skipped when its outputs are already there, so rerunning an
interrupted study resumes it.
The resolved study config is written to `OUT/study_config.json` before any stage runs.

With `random_model_seed`, every stage up to scoring also runs for the random-model control:
the run `NAME-random`, trained with the same config on `MODEL@random:SEED` (the subject
model re-initialised under that seed) in `OUT/random-model/`, its latents queued with the
same selection in the same campaign; the report sets the two runs' scores side by side.

With `[survey]`, every run's latents are also queued, with the same selection at the
survey's number, in a second campaign of LLM-free pairs, scored in the same score stage and
reported on its own (its HTML page beside the study's, `NAME-survey.html`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from sqlalchemy import select

from sae.distributed import ProcessGroup, process_group
from sae.errors import UserError
from sae.model_spec import random_model_spec
from sae.train import TrainConfig, TrainProgress, cache_activations, train
from service.cache.stage import cache_run
from service.config import QueueConfig, ScoreConfig
from service.progress import token_progress
from service.report import ReportResult, make_report, write_html
from service.scoring.campaign import open_campaign
from service.scoring.worker import run_score
from service.store.engine import Store, open_store, upgrade
from service.store.imported import record_import
from service.store.matches import matching_recorded, record_matching
from service.store.models import Run
from service.store.runs import random_control_name, record_training
from service.store.sampling import queue_run
from service.study.config import StudyConfig

Announce = Callable[[str, str], None]


@dataclass
class StudyResult:
    """The study's report on its campaign, and on its survey's when it has one."""

    report: ReportResult
    survey: ReportResult | None = None


RANDOM_MODEL_FOLDER = "random-model"


@dataclass(frozen=True)
class StudyRun:
    """One run the study trains: the subject model's, or its random-model control."""

    name: str
    train: TrainConfig
    out: Path
    tag: str = ""  # how announcements name the run: "" for the subject model's own

    def stage(self, stage: str) -> str:
        return f"{stage} {self.tag}" if self.tag else stage


def study_runs(study: StudyConfig) -> list[StudyRun]:
    """The runs `study` trains: its own, then its random-model control when asked for. The
    control reads its data through the model (an activation cache holds the trained model's
    activations), so it builds its own cache when several epochs need one."""
    runs = [StudyRun(study.name, study.train, study.out)]
    if study.random_model_seed is not None:
        spec = random_model_spec(study.train.model, study.random_model_seed)
        control = study.train.model_copy(update={"model": spec, "activation_cache": None})
        runs.append(
            StudyRun(
                random_control_name(study.name),
                control,
                study.out / RANDOM_MODEL_FOLDER,
                "(random model)",
            )
        )
    return runs


def run_study(study: StudyConfig, db_url: str, home: Path, console: Console) -> StudyResult | None:
    """Run every stage that has not finished yet, then build the report.

    Under torchrun every process trains and caches its share; the main process alone
    writes to the store, then matches, queues, scores and reports, while the others end
    after the cache (None: they have no report)."""
    group = process_group()

    def announce(stage: str, detail: str) -> None:
        if group.is_main:
            console.print(f"[bold]{stage}[/]: {detail}", highlight=False)

    if group.is_main:
        study.out.mkdir(parents=True, exist_ok=True)
        (study.out / "study_config.json").write_text(study.model_dump_json(indent=2))
        upgrade(db_url)
    group.barrier()
    store = open_store(db_url)
    try:
        runs = study_runs(study)
        if study.import_saes is not None:
            if group.is_distributed:
                raise UserError(
                    "a study with [import_saes] trains nothing: run it without torchrun"
                )
            saes = record_import(store, study.name, study.import_saes, home, path=study.out)
            kinds = ", ".join(f"seed {s.seed}: {s.layout} {s.architecture}" for s in saes)
            announce("import", f"recorded {len(saes)} SAEs ({kinds})")
        else:
            for run in runs:
                _train(run, store, home, console, announce, group)
        # The latent cache needs the SAEs, not their matching: under torchrun every process
        # takes part in it before the main one goes on alone.
        for run in runs:
            _cache(run, study, store, home, announce)
        if not group.is_main:
            return None
        for run in runs:
            _match(run, study, store, announce)
        # Workers take jobs in the order queued: the survey's quick ones first, so that an
        # interrupted study keeps them. One campaign for every run (the control's scores are
        # comparable by construction).
        survey = None
        if study.survey is not None:
            selection = study.queue.model_copy(update={"latents": study.survey.latents})
            job = study.survey.job(study.score.job)
            survey = _queue(
                runs, selection, job, study, store, lambda s, d: announce(f"survey {s}", d)
            )
        campaign = _queue(runs, study.queue, study.score.job, study, store, announce)
        scoring = study.score.model_copy(update={"stage": study.queue.stage})
        stats = run_score(db_url, home, scoring, console=console)
        announce("score", f"{stats.completed} latents explained and scored in this call")
        result = StudyResult(_report(study, store, campaign, study.report.html, announce))
        if survey is not None:
            html = study.report.html
            if html is not None:
                html = html.with_name(f"{html.stem}-survey{html.suffix}")
            result.survey = _report(study, store, survey, html, announce)
        return result
    finally:
        store.dispose()


def _queue(
    runs: list[StudyRun],
    selection: QueueConfig,
    job: ScoreConfig,
    study: StudyConfig,
    store: Store,
    announce: Announce,
) -> int:
    """Queue every run's chosen latents in the campaign of `job` and the study's LLM; its id."""
    campaigns = set()
    for run in runs:
        queued = queue_run(
            store,
            run.name,
            lambda session: open_campaign(session, job, study.score.llm),
            selection,
        )
        campaigns.add(queued.campaign_id)
        announce(
            run.stage("queue"),
            f"{queued.selected} latents, {queued.inserted} new jobs ({queued.campaign})",
        )
    (campaign,) = campaigns  # the same job and LLM: one campaign
    return campaign


def _report(
    study: StudyConfig, store: Store, campaign: int, html: Path | None, announce: Announce
) -> ReportResult:
    result = make_report(store, study.name, study.report, campaign=campaign)
    if html is not None:
        write_html(result, html)
        announce("report", f"HTML written to {html}")
    return result


def _check_control_run(run: StudyRun, store: Store) -> None:
    """A control run already in the store must be of the same re-initialised model: a
    changed `random_model_seed` would otherwise mix two models' SAEs under one name."""
    with store.read_session() as session:
        recorded = session.scalars(
            select(Run.subject_model).where(Run.name == run.name)
        ).one_or_none()
    if recorded is not None and recorded != run.train.model:
        raise UserError(
            f"run {run.name!r} in the store was trained on {recorded}, not {run.train.model}: "
            "keep the study's random_model_seed, or give the study another name"
        )


def _train(
    run: StudyRun,
    store: Store,
    home: Path,
    console: Console,
    announce: Announce,
    group: ProcessGroup,
) -> None:
    config = run.train
    if run.tag:
        _check_control_run(run, store)
    if config.epochs > 1 and config.activation_cache is None:
        # Several epochs read activations from a disk cache instead of rerunning the model;
        # the main process writes it while the others wait.
        activation_cache = run.out / "activations"
        if group.is_main:
            with token_progress(run.stage("caching activations"), console) as update:
                cache_activations(config, activation_cache, home, on_progress=update)
        group.barrier()
        config = config.model_copy(update={"activation_cache": str(activation_cache)})
    with token_progress(run.stage("train"), console, show=group.is_main) as update:

        def on_progress(state: TrainProgress) -> None:
            update(state.tokens, state.total_tokens, f"FVU {state.fvu:.3f}")

        result = train(config, run.out, home, on_progress)
    if result.interrupted:
        raise KeyboardInterrupt
    verb = "already trained" if result.already_finished else "trained"
    fvus = ", ".join(f"seed {s.seed}: FVU {s.fvu:.3f}, L0 {s.l0:.1f}" for s in result.saes)
    announce(run.stage("train"), f"{verb} {len(result.saes)} SAEs on {config.model} ({fvus})")
    if group.is_main:
        record_training(store, run.name, config, run.out, result.saes)
    # The cache stage reads the recorded run on every process.
    group.barrier()


def _match(run: StudyRun, study: StudyConfig, store: Store, announce: Announce) -> None:
    if matching_recorded(store, run.name):
        announce(run.stage("match"), "already stored")
        return
    matches = record_matching(store, run.name, study.match)
    for hookpoint, pairs in matches.items():
        shared = [m.summary.shared_fraction for m in pairs.values()]
        announce(
            run.stage("match"),
            f"{hookpoint}: {len(pairs)} ordered pairs, shared fraction "
            f"{min(shared):.1%}..{max(shared):.1%}",
        )


def _cache(run: StudyRun, study: StudyConfig, store: Store, home: Path, announce: Announce) -> None:
    stage = run.stage("cache")
    summary = cache_run(
        store, run.name, home, study.cache, announce=lambda line: announce(stage, line)
    )
    if not summary.written:
        announce(stage, f"already stored (cache version {summary.version})")
        return
    dead = sum(s.dead for s in summary.saes)
    announce(
        stage,
        f"{summary.n_tokens:,} tokens, {sum(s.n_examples for s in summary.saes):,} windows, "
        f"{dead} dead latents",
    )
