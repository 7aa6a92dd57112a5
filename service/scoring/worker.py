"""`autointerp score`: workers that drain the queue's explain-and-score jobs.

One process runs `workers` slots on one event loop, so that the LLM requests of many latents
are in flight at once. A slot claims a job, keeps its lease alive, loads the latent's windows
from the store (and those of its control latents, `service.scoring.controls`: a random other
latent of the same SAE drawn from the job's seed, the shuffled specificity control, and its
matched partners in other seeds, for cross-seed scoring), explains and scores it
(`pipeline.explain_and_score`), and writes the explanations, the scores, every verdict and
every LLM call together with the job's completion in ONE transaction: a job's results exist
completely or not at all, and a worker whose lease was taken over writes nothing (the queue
fences it). Jobs whose LLM stayed unreachable past the retry period, and jobs interrupted by
Ctrl-C, go back to the queue, so a later run (on this or any machine sharing the store)
resumes where this one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sae.errors import UserError
from sae.subject_model import load_tokenizer
from service.cache.windows import LatentExamples, load_latent_examples, subject_model_of
from service.config import ScoreConfig, ScoringConfig
from service.llm.base import LLMClient, LLMError, ServerStats, create_client
from service.progress import count_progress
from service.scoring.controls import control_latent, cross_seed_partners
from service.scoring.pipeline import (
    LatentResult,
    NotScorable,
    ScoreResult,
    explain_and_score,
    latent_seed,
    needs_llm,
)
from service.store.engine import Store, open_store
from service.store.models import Explanation, LlmCall, Prediction, Score
from service.store.queue import (
    DEFAULT_DB_RETRY_SECONDS,
    DEFAULT_LEASE_SECONDS,
    RETRY_FIRST_DELAY_S,
    Lease,
    LeaseKeeper,
    LeaseLost,
    claim,
    complete,
    fail,
    new_worker_id,
    next_delay,
    release,
    transient,
    unfinished,
    unfinished_configs,
)

STAGE = ScoringConfig.model_fields["stage"].default
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class ScoreStats:
    """What this process did, for the progress bar and the final summary."""

    started: float = field(default_factory=time.monotonic)
    completed: int = 0
    failed: int = 0
    requeued: int = 0
    lost: int = 0
    answers: int = 0
    parse_failures: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Requests and errors per LLM server, as the client counted them when the run ended.
    servers: list[ServerStats] = field(default_factory=list)

    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def latents_per_min(self) -> float:
        return self.completed / self.elapsed_s * 60

    @property
    def parse_failure_rate(self) -> float:
        return self.parse_failures / self.answers if self.answers else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens the LLM generated for this process, per second of wall time."""
        return self.completion_tokens / self.elapsed_s

    def add(self, result: LatentResult) -> None:
        self.completed += 1
        self.answers += result.n_answers
        self.parse_failures += result.n_parse_failures
        calls = result.calls
        self.requests += len(calls)
        self.prompt_tokens += sum(call.prompt_tokens or 0 for call in calls)
        self.completion_tokens += sum(call.completion_tokens or 0 for call in calls)


def write_result(session: Session, lease: Lease, result: LatentResult, model: str) -> None:
    """Add a latent's explanations, scores, verdicts and LLM calls to `session`, and complete
    its job there: the caller's commit writes all of it or none. A control's explanation is
    stored under the latent it explains (another latent of the same SAE, or the matched
    partner in another seed); its scores, like all of them, under the job's latent."""
    for explained in result.explained:
        # An explanation no LLM wrote (the token baseline) names its explainer as its model.
        explanation = Explanation(
            latent_id=explained.source_latent_id or lease.latent_id,
            job_id=lease.job_id,
            explainer=explained.explanation.explainer,
            model=model if explained.explanation.calls else explained.explanation.explainer,
            config_hash=lease.config_hash,
            text=explained.explanation.text,
            raw=explained.explanation.raw,
        )
        session.add(explanation)
        session.flush()
        for score in explained.scores:
            _write_score(session, lease, explanation.id, score)
    session.add_all(
        LlmCall(
            job_id=lease.job_id,
            stage=stage,
            model=call.model,
            base_url=call.base_url,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            latency_s=call.latency_s,
            error=call.error,
        )
        for stage, call in result.calls_by_stage
    )
    complete(session, lease)


def _write_score(session: Session, lease: Lease, explanation_id: int, score: ScoreResult) -> None:
    row = Score(
        latent_id=lease.latent_id,
        explanation_id=explanation_id,
        job_id=lease.job_id,
        scorer=score.scorer,
        control=score.control,
        balanced_accuracy=score.balanced_accuracy,
        f1=score.f1,
        auc=score.auc,
        n_examples=score.n_examples,
        n_parsed=score.n_parsed,
        n_failed=score.n_failed,
    )
    session.add(row)
    session.flush()
    session.add_all(
        Prediction(
            score_id=row.id,
            example_id=verdict.window.example_id,
            label=verdict.label,
            predicted=verdict.predicted,
            probability=verdict.probability,
            raw=verdict.raw,
        )
        for verdict in score.verdicts
    )


class ScoreWorkers:
    """`workers` concurrent slots claiming and finishing jobs of one stage.

    One lease keeper (a thread) renews the leases of all slots, so no slot ever waits on it.
    A transient database error (a lost connection, a lock timeout) is retried with back-off
    for up to `db_retry_seconds` rather than ending the run; a job whose results could not be
    written goes back to the queue.
    """

    def __init__(
        self,
        store: Store,
        llm: LLMClient,
        home: Path,
        *,
        workers: int = 8,
        stage: str = STAGE,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float = 2.0,
        max_jobs: int | None = None,
        db_retry_seconds: float = DEFAULT_DB_RETRY_SECONDS,
        on_progress: Callable[[ScoreStats], None] | None = None,
    ):
        self.store = store
        self.llm = llm
        self.home = home
        self.workers = workers
        self.stage = stage
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_jobs = max_jobs
        self.db_retry_seconds = db_retry_seconds
        self.on_progress = on_progress
        self.owner = new_worker_id()
        self.stats = ScoreStats()
        self._tokenizers: dict[str, Any] = {}
        # Slots load windows in threads; one tokenizer load at a time (transformers' lazy
        # imports are not safe to race, and a second load would be wasted).
        self._tokenizer_lock = threading.Lock()
        # Jobs claimed or being claimed, counted before the claim so `max_jobs` is never passed.
        self._reserved = 0

    async def run(self) -> ScoreStats:
        keeper = LeaseKeeper(self.store, [], self.lease_seconds)
        keeper.start()
        try:
            await asyncio.gather(*(self._slot(keeper) for _ in range(self.workers)))
        finally:
            # The keeper's thread may be waiting on the store: join it off the event loop.
            await asyncio.to_thread(keeper.stop)
        return self.stats

    def _reserve(self) -> bool:
        # No await between the check and the count: slots cannot both take the last job.
        if self.max_jobs is not None and self._reserved >= self.max_jobs:
            return False
        self._reserved += 1
        return True

    async def _db(self, operation: Callable[..., R], *args: Any) -> R:
        """`operation(*args)` in a thread, tried again with back-off on transient database
        errors for up to `db_retry_seconds`. Only for operations that are safe to repeat:
        each runs in its own transaction, which a failure rolls back."""
        give_up_at = time.monotonic() + self.db_retry_seconds
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await asyncio.to_thread(operation, *args)
            except DBAPIError as error:
                if not transient(error) or time.monotonic() + delay > give_up_at:
                    raise
                log.warning("store error, retrying in %.2fs: %s", delay, error.orig or error)
            await asyncio.sleep(delay)
            delay = next_delay(delay)

    def _tokenizer_for(self, latent_id: int) -> Any:
        with self.store.read_session() as session:
            model = subject_model_of(session, latent_id)
        with self._tokenizer_lock:
            if model not in self._tokenizers:
                self._tokenizers[model] = load_tokenizer(model, self.home)
            return self._tokenizers[model]

    def _load(
        self, latent_id: int, config: ScoreConfig
    ) -> tuple[LatentExamples, LatentExamples | None, list[LatentExamples]]:
        """The latent's windows, those of its shuffled control latent (or None) and those of
        its cross-seed partners (each only where the config asks for it)."""
        tokenizer = self._tokenizer_for(latent_id)
        with self.store.read_session() as session:
            examples = load_latent_examples(session, latent_id, tokenizer)
            control = None
            if config.shuffled_control:
                other = control_latent(session, latent_id, latent_seed(config, latent_id))
                if other is not None:
                    control = load_latent_examples(session, other, tokenizer)
            partners = [
                load_latent_examples(session, partner, tokenizer)
                for partner in cross_seed_partners(session, latent_id, config.cross_seed)
            ]
            return examples, control, partners

    def _write(self, lease: Lease, result: LatentResult) -> None:
        with self.store.session() as session, session.begin():
            write_result(session, lease, result, self.llm.model)

    async def _slot(self, keeper: LeaseKeeper) -> None:
        while self._reserve():
            claimed_at = time.monotonic()
            try:
                leases = await self._db(
                    claim, self.store, self.owner, 1, self.stage, self.lease_seconds
                )
            except BaseException:
                self._reserved -= 1
                raise
            if not leases:
                self._reserved -= 1
                if await self._db(unfinished, self.store, self.stage) == 0:
                    return
                await asyncio.sleep(self.poll_seconds)
                continue
            (lease,) = leases
            keeper.add(lease, claimed_at)
            try:
                await self._finish(lease, keeper)
            finally:
                keeper.release(lease)
            if self.on_progress is not None:
                self.on_progress(self.stats)

    async def _finish(self, lease: Lease, keeper: LeaseKeeper) -> None:
        try:
            config = ScoreConfig.model_validate(lease.config)
            examples, control, partners = await self._db(self._load, lease.latent_id, config)
            result = await explain_and_score(examples, config, self.llm, control, partners)
            if not keeper.held(lease):
                raise LeaseLost(f"job {lease.job_id} was given up or taken over while it ran")
            await asyncio.to_thread(self._write, lease, result)
            self.stats.add(result)
        except LeaseLost:
            self.stats.lost += 1
        except (NotScorable, ValidationError, UserError) as error:
            # The latent or the job's config is unusable: another attempt would fail alike.
            await self._fail(lease, " ".join(str(error).split()), retry=False)
        except LLMError as error:
            await self._fail(lease, f"LLM unavailable: {error}", retry=True)
        except DBAPIError as error:
            if not transient(error):
                await self._fail(lease, f"{type(error).__name__}: {error}", retry=True)
                return
            # The store, not the job, failed (its results rolled back): queue it again as it
            # was, without using up an attempt.
            await self._release(lease, f"store unavailable: {error.orig or error}")
        except asyncio.CancelledError:
            # Interrupted: hand the job back at once rather than when its lease runs out, and
            # without using up one of its attempts (the job did not fail).
            await asyncio.shield(self._release(lease, "interrupted before it finished"))
            raise
        except Exception as error:  # one latent's bug is recorded on its job, not fatal here
            await self._fail(lease, f"{type(error).__name__}: {error}", retry=True)

    async def _release(self, lease: Lease, note: str) -> None:
        try:
            await self._db(release, self.store, lease, note)
        except LeaseLost:
            self.stats.lost += 1
            return
        self.stats.requeued += 1

    async def _fail(self, lease: Lease, error: str, retry: bool) -> None:
        try:
            state = await self._db(fail, self.store, lease, error, retry)
        except LeaseLost:
            self.stats.lost += 1
            return
        if state == "failed":
            self.stats.failed += 1
        else:
            self.stats.requeued += 1


class ScoreProgress:
    """A live rich progress bar: latents done, latents/min, parse failures, tokens/s, ETA."""

    def __init__(self, total: int, console: Console | None = None):
        self.progress = count_progress(
            "[bold]scoring",
            "{task.fields[rate]:.1f} latents/min",
            "parse failures {task.fields[failures]:.1%}",
            "{task.fields[tokens]:.0f} tokens/s",
            console=console,
        )
        self.task = self.progress.add_task("score", total=total, rate=0.0, failures=0.0, tokens=0)

    def update(self, stats: ScoreStats) -> None:
        self.progress.update(
            self.task,
            completed=stats.completed + stats.failed,
            rate=stats.latents_per_min,
            failures=stats.parse_failure_rate,
            tokens=stats.tokens_per_s,
        )

    def __enter__(self) -> ScoreProgress:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()


async def score_queue(
    store: Store,
    llm: LLMClient,
    home: Path,
    config: ScoringConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> ScoreStats:
    """Check the LLM (unless no queued job needs one), then work on `config.stage` jobs until
    the queue has none left (or `config.max_jobs` are done)."""
    if _queue_needs_llm(store, config.stage):
        await llm.check()
    total = unfinished(store, config.stage)
    pool = ScoreWorkers(
        store,
        llm,
        home,
        workers=config.workers,
        stage=config.stage,
        lease_seconds=config.lease_seconds,
        max_jobs=config.max_jobs,
    )
    try:
        if not show_progress:
            stats = await pool.run()
        else:
            with ScoreProgress(total, console) as progress:
                pool.on_progress = progress.update
                stats = await pool.run()
        stats.servers = llm.servers()
        return stats
    finally:
        await llm.aclose()


def _queue_needs_llm(store: Store, stage: str) -> bool:
    """Whether an unfinished job of `stage` asks an LLM; also True for an empty queue, so
    that `autointerp score` still says at once when its LLM cannot serve. A job whose config
    is unusable needs nothing: it fails on its config."""
    configs = unfinished_configs(store, stage)
    if not configs:
        return True
    for raw in configs:
        try:
            if needs_llm(ScoreConfig.model_validate(raw)):
                return True
        except (ValidationError, UserError):
            continue
    return False


def run_score(
    db_url: str, home: Path, config: ScoringConfig, console: Console | None = None
) -> ScoreStats:
    """Open the store and the LLM, and drain the queue (the `autointerp score` command)."""
    store = open_store(db_url)
    try:
        llm = create_client(config.llm_for_workers(), home)
        return asyncio.run(score_queue(store, llm, home, config, console=console))
    finally:
        store.dispose()
