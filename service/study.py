"""`autointerp run study.toml`: the whole study from one config file.

train -> record in the store -> match -> cache -> queue -> score -> report. Each stage is
skipped when its outputs are already there, so rerunning an interrupted study resumes it.
"""

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from sqlalchemy import func, select

from sae.activation_cache import build_activation_cache
from sae.architectures import SaeConfig
from sae.errors import UserError
from sae.latent_cache import CacheConfig
from sae.matching import make_config
from sae.train import TrainConfig, TrainProgress, config_from_cache, train
from service.cache_stage import cache_run
from service.llm.base import DEFAULT_URL, LLMConfig
from service.progress import token_progress
from service.report import ReportResult, make_report, write_html
from service.run_records import matching_recorded, record_matching, record_training
from service.score_config import ScoreConfig
from service.store.engine import Store, open_store, upgrade
from service.store.models import Example, Latent, Sae
from service.store.results import get_run
from service.store.sampling import queue_run
from service.worker import run_score


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSection(_Section):
    model: str = "smollm2"
    hookpoint: str = "model.layers.6.mlp"
    dataset: str = "embedded"
    tokens: int | None = 200_000
    chunk_len: int = 256
    architecture: str = "topk"
    latents: int = 1152
    k: int = 8
    seeds: list[int] = [0, 1, 2]
    epochs: int = 5
    batch_tokens: int = 1024
    lr: float | None = None

    def train_config(self, activation_cache: Path | None) -> TrainConfig:
        fields: dict[str, Any] = {
            "sae": SaeConfig(architecture=self.architecture, n_latents=self.latents, k=self.k),
            "seeds": self.seeds,
            "epochs": self.epochs,
            "batch_tokens": self.batch_tokens,
            "lr": self.lr,
            "hookpoints": [self.hookpoint],
        }
        if activation_cache is not None:
            return config_from_cache(activation_cache, **fields)
        return TrainConfig(
            model=self.model,
            dataset=self.dataset,
            max_tokens=self.tokens,
            chunk_len=self.chunk_len,
            **fields,
        )


class MatchSection(_Section):
    threshold: float = 0.7
    solver: Literal["auto", "exact", "sparse"] = "auto"


class CacheSection(_Section):
    tokens: int = 100_000
    window: int = 32
    chunk_len: int = 256
    n_top: int = 20
    quantile_bins: int = 10
    per_quantile_bin: int = 5
    negatives: int = 20

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            window=self.window,
            n_top=self.n_top,
            n_quantile_bins=self.quantile_bins,
            per_quantile_bin=self.per_quantile_bin,
            n_reservoir=max(4 * self.quantile_bins * self.per_quantile_bin, 20),
            n_negative=self.negatives,
        )


class QueueSection(_Section):
    selection: Literal["all", "sample", "stratified"] = "stratified"
    latents: int = 10
    seed: int = 0


class ScoreSection(_Section):
    backend: Literal["openai", "transformers"] = "transformers"
    model: str = "smollm2"
    urls: list[str] = Field(default_factory=lambda: [DEFAULT_URL])
    workers: int = 4
    config: ScoreConfig = Field(default_factory=ScoreConfig)


class ReportSection(_Section):
    html: Path | None = None


class StudyConfig(_Section):
    """One study; every section and key is optional, unknown keys are errors."""

    name: str
    out: Path
    train: TrainSection = Field(default_factory=TrainSection)
    match: MatchSection = Field(default_factory=MatchSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    queue: QueueSection = Field(default_factory=QueueSection)
    score: ScoreSection = Field(default_factory=ScoreSection)
    report: ReportSection = Field(default_factory=ReportSection)


def load_study(path: Path) -> StudyConfig:
    """Parse and validate a study file; relative paths in it are relative to the file."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"study file {path} does not exist: check the path") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML ({error}): fix the file") from None
    try:
        study = StudyConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"])
            kind = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{where}: {kind}")
        raise UserError(f"{path}: {'; '.join(problems)}") from None
    base = path.parent
    study.out = base / study.out
    if study.report.html is not None:
        study.report.html = base / study.report.html
    return study


Announce = Callable[[str, str], None]


def run_study(study: StudyConfig, db_url: str, home: Path, console: Console) -> ReportResult:
    """Run every stage that has not finished yet, then build the report."""

    def announce(stage: str, detail: str) -> None:
        console.print(f"[bold]{stage}[/]: {detail}", highlight=False)

    upgrade(db_url)
    store = open_store(db_url)
    try:
        _train(study, store, home, console, announce)
        _match(study, store, announce)
        _cache(study, store, home, announce)
        queued = queue_run(
            store,
            study.name,
            selection=study.queue.selection,
            n=None if study.queue.selection == "all" else study.queue.latents,
            seed=study.queue.seed,
            config=study.score.config.model_dump(mode="json"),
        )
        announce("queue", f"{queued.selected} latents, {queued.inserted} new jobs")
        llm = LLMConfig(
            backend=study.score.backend,
            model=study.score.model,
            urls=study.score.urls,
            max_concurrency=4 * study.score.workers,
        )
        stats = run_score(db_url, home, llm, workers=study.score.workers, console=console)
        announce("score", f"{stats.completed} latents explained and scored in this call")
        result = make_report(store, study.name)
        if study.report.html is not None:
            write_html(result, study.report.html)
            announce("report", f"HTML written to {study.report.html}")
        return result
    finally:
        store.dispose()


def _train(
    study: StudyConfig, store: Store, home: Path, console: Console, announce: Announce
) -> None:
    section = study.train
    activation_cache = None
    if section.epochs > 1:
        # Several epochs read activations from a disk cache instead of rerunning the model.
        activation_cache = study.out / "activations"
        with token_progress("caching activations", console) as update:
            build_activation_cache(
                activation_cache,
                section.model,
                [section.hookpoint],
                home,
                dataset=section.dataset,
                chunk_len=section.chunk_len,
                max_tokens=section.tokens,
                on_progress=update,
            )
    config = section.train_config(activation_cache)
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
    config = make_config(threshold=study.match.threshold, solver=study.match.solver)
    matches = record_matching(store, study.name, config)
    for hookpoint, pairs in matches.items():
        shared = [m.summary.shared_fraction for m in pairs.values()]
        announce(
            "match",
            f"{hookpoint}: {len(pairs)} ordered pairs, shared fraction "
            f"{min(shared):.1%}..{max(shared):.1%}",
        )


def _cache(study: StudyConfig, store: Store, home: Path, announce: Announce) -> None:
    with store.read_session() as session:
        run = get_run(session, study.name)
        sae_ids = select(Sae.id).where(Sae.run_id == run.id)
        missing = session.scalar(
            select(func.count())
            .select_from(Latent)
            .where(Latent.sae_id.in_(sae_ids), Latent.firing_count.is_(None))
        )
        examples = session.scalar(
            select(func.count())
            .select_from(Example)
            .join(Latent, Latent.id == Example.latent_id)
            .where(Latent.sae_id.in_(sae_ids))
        )
    if not missing and examples:
        announce("cache", f"already stored ({examples:,} example windows)")
        return
    summary = cache_run(
        store,
        study.name,
        home,
        study.cache.tokens,
        study.cache.cache_config(),
        study.cache.chunk_len,
    )
    dead = sum(s.dead for s in summary.saes)
    announce(
        "cache",
        f"{summary.n_tokens:,} tokens, {sum(s.n_examples for s in summary.saes):,} windows, "
        f"{dead} dead latents",
    )
