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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sae.errors import UserError
from sae.subject_model import load_tokenizer
from service.cache.windows import LatentExamples, Window, load_latent_examples, subject_model_of
from service.config import API_KEY_ENV, ScoreConfig, ScoringConfig
from service.config.score import NO_EXPLAINER
from service.explainers import ExplanationResult
from service.llm.base import LLMClient, LLMError, ServerStats, create_client
from service.progress import count_progress
from service.scoring.controls import control_latent, cross_seed_partners
from service.scoring.neighbours import Decoders, load_hard_negatives
from service.scoring.pipeline import (
    KnownExplanation,
    LatentResult,
    NotScorable,
    ScoreResult,
    explain_and_score,
    latent_seed,
    needs_control,
)
from service.store.engine import Store, open_store
from service.store.models import Campaign, Explanation, LlmCall, Prediction, Score
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
    unfinished_campaigns,
)
from service.store.scores import campaign_explanations

STAGE = ScoringConfig.model_fields["stage"].default
# The jobs that must all fail on one LLM refusal before a run stops rather than fail the rest.
FIRST_JOBS = 3
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a job reads from the store before it asks the LLM anything."""

    examples: LatentExamples
    control: LatentExamples | None
    partners: list[LatentExamples]
    known: Mapping[tuple[int | None, str], KnownExplanation]
    hard_negatives: list[Window]


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
    """Add a latent's new explanations, its scores, verdicts and LLM calls to `session`, all
    under the job's campaign, and complete its job there: the caller's commit writes all of
    it or none. An explanation is stored under the latent it explains (for a control,
    another latent of the same SAE or the matched partner in another seed) as that latent's
    explanation in the campaign; one the campaign already held is reused, not stored again.
    Scores, like all of them, go under the job's latent."""
    for explained in result.explained:
        explanation_id = explained.stored_id
        if explanation_id is None:
            # An explanation no LLM wrote (the token baseline) names its explainer as its model.
            row = Explanation(
                latent_id=explained.source_latent_id or lease.latent_id,
                job_id=lease.job_id,
                campaign_id=lease.campaign_id,
                explainer=explained.explanation.explainer,
                model=model if explained.explanation.calls else explained.explanation.explainer,
                text=explained.explanation.text,
                raw=explained.explanation.raw,
            )
            session.add(row)
            session.flush()
            explanation_id = row.id
        for score in explained.scores:
            _write_score(session, lease, explanation_id, score)
    session.add_all(
        LlmCall(
            job_id=lease.job_id,
            campaign_id=lease.campaign_id,
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
        campaign_id=lease.campaign_id,
        scorer=score.scorer,
        control=score.control,
        balanced_accuracy=score.balanced_accuracy,
        f1=score.f1,
        auc=score.auc,
        correlation=score.correlation,
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
        # Only jobs of campaigns this LLM serves (or that need none) are claimed.
        self._llm = (llm.backend, llm.model)
        self.stats = ScoreStats()
        self._tokenizers: dict[str, Any] = {}
        # Slots load windows in threads; one tokenizer load at a time (transformers' lazy
        # imports are not safe to race, and a second load would be wasted).
        self._tokenizer_lock = threading.Lock()
        # Jobs claimed or being claimed, counted before the claim so `max_jobs` is never passed.
        self._reserved = 0
        # Each SAE's decoder, read once, for the neighbours that give hard negatives.
        self._decoders = Decoders()
        # Each campaign's job config, read once.
        self._configs: dict[int, ScoreConfig] = {}
        # Requests the LLM refused for good (HTTP 4xx) while no job had succeeded yet: when
        # the first jobs all meet the same refusal, the run stops (see `_refused_by_llm`).
        self._refusals: list[LLMError] = []
        self._any_succeeded = False

    async def run(self) -> ScoreStats:
        keeper = LeaseKeeper(self.store, [], self.lease_seconds)
        keeper.start()
        try:
            await asyncio.gather(*(self._slot(keeper) for _ in range(self.workers)))
        finally:
            # The keeper's thread may be waiting on the store: join it off the event loop.
            await asyncio.to_thread(keeper.stop)
        refusal = self._refused_by_llm()
        if refusal is not None:
            raise UserError(refusal)
        return self.stats

    def _refused_by_llm(self) -> str | None:
        """One line naming the cause and the fix, when the first jobs all failed on the same
        refusal by the LLM server (a wrong key, a model it does not serve, a request format
        it does not take): every later job would fail alike."""
        if self._any_succeeded or not self._refusals:
            return None
        statuses = {error.status for error in self._refusals}
        if len(statuses) != 1:
            return None
        (status,) = statuses
        first = self._refusals[0]
        fix = {
            401: f"set {API_KEY_ENV} (or the config's api_key_env) to the server's API key",
            403: f"set {API_KEY_ENV} to a key the server accepts for this model",
            404: f"the server does not serve model {self.llm.model!r}: pass --model with one "
            "it serves",
        }.get(status or 0, "fix the request the server refuses (see the message)")
        return (
            f"the LLM refused every request ({first}); {fix}; the {self.stats.failed} jobs "
            "it failed are kept: requeue them with `autointerp queue --run RUN --retry-failed`"
        )

    def _stopping(self) -> bool:
        """Whether the first jobs all failed on one refusal, so no further job is claimed."""
        return len(self._refusals) >= FIRST_JOBS and self._refused_by_llm() is not None

    def _reserve(self) -> bool:
        # No await between the check and the count: slots cannot both take the last job.
        if self._stopping():
            return False
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

    def _config_of(self, campaign_id: int) -> ScoreConfig:
        if campaign_id not in self._configs:
            with self.store.read_session() as session:
                campaign = session.get(Campaign, campaign_id)
                assert campaign is not None  # a job's campaign outlives it
                self._configs[campaign_id] = ScoreConfig.model_validate(campaign.config)
        return self._configs[campaign_id]

    def _load(self, lease: Lease, config: ScoreConfig) -> Loaded:
        """The latent's windows, those of its control latent (or None: the shuffled control,
        and the intruder scorer's intruders), those of its cross-seed partners and its hard
        negatives (each only where the config asks for it), and the explanations the
        campaign already holds for any of them."""
        latent_id = lease.latent_id
        tokenizer = self._tokenizer_for(latent_id)
        with self.store.read_session() as session:
            examples = load_latent_examples(session, latent_id, tokenizer)
            control = None
            if needs_control(config):
                other = control_latent(session, latent_id, latent_seed(config, latent_id))
                if other is not None:
                    control = load_latent_examples(session, other, tokenizer)
            partners = [
                load_latent_examples(session, partner, tokenizer)
                for partner in cross_seed_partners(session, latent_id, config.cross_seed)
            ]
            ids = [latent_id] + [
                x.latent_id for x in [control, *partners] if x is not None and x.latent_id
            ]
            known: dict[tuple[int | None, str], KnownExplanation] = {
                (stored.latent_id, stored.explainer): KnownExplanation(
                    stored.id,
                    ExplanationResult(
                        stored.explainer,
                        stored.text,
                        stored.raw,
                        # The `none` explainer's empty explanation is its success.
                        bool(stored.text) or stored.explainer == NO_EXPLAINER,
                    ),
                )
                for stored in campaign_explanations(session, lease.campaign_id, ids)
            }
            hard = []
            if config.negatives != "random":
                hard = load_hard_negatives(
                    session, examples, config.n_neighbours, tokenizer, self._decoders
                )
            return Loaded(examples, control, partners, known, hard)

    def _write(self, lease: Lease, result: LatentResult) -> None:
        with self.store.session() as session, session.begin():
            write_result(session, lease, result, self.llm.model)

    async def _slot(self, keeper: LeaseKeeper) -> None:
        while self._reserve():
            claimed_at = time.monotonic()
            try:
                leases = await self._db(
                    claim, self.store, self.owner, 1, self.stage, self.lease_seconds, self._llm
                )
            except BaseException:
                self._reserved -= 1
                raise
            if not leases:
                self._reserved -= 1
                if await self._db(unfinished, self.store, self.stage, self._llm) == 0:
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
            config = await self._db(self._config_of, lease.campaign_id)
            loaded = await self._db(self._load, lease, config)
            result = await explain_and_score(
                loaded.examples,
                config,
                self.llm,
                loaded.control,
                loaded.partners,
                loaded.known,
                loaded.hard_negatives,
            )
            if not keeper.held(lease):
                raise LeaseLost(f"job {lease.job_id} was given up or taken over while it ran")
            await asyncio.to_thread(self._write, lease, result)
            self.stats.add(result)
            self._any_succeeded = True
        except LeaseLost:
            self.stats.lost += 1
        except (NotScorable, ValidationError, UserError) as error:
            # The latent or the job's config is unusable: another attempt would fail alike.
            await self._fail(lease, " ".join(str(error).split()), retry=False)
        except LLMError as error:
            if error.refused:
                # The server refused the request itself: asking again would meet the same no.
                if not self._any_succeeded:
                    self._refusals.append(error)
                await self._fail(lease, f"LLM refused the request: {error}", retry=False)
                return
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
    if _queue_needs_llm(store, config.stage, (llm.backend, llm.model)):
        await llm.check()
    total = unfinished(store, config.stage, (llm.backend, llm.model))
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


def _queue_needs_llm(store: Store, stage: str, llm: tuple[str, str]) -> bool:
    """Whether an unfinished job of `stage` that this LLM can serve asks an LLM. With none
    left, whether work for an LLM could still come: a campaign that asks one, or no campaign
    yet (so that `autointerp score` says at once when its LLM cannot serve, yet a worker of
    an LLM-free study started after its queue drained just finishes). Says, in one line,
    when every unfinished job is for another LLM."""
    campaigns = unfinished_campaigns(store, stage)
    if not campaigns:
        with store.read_session() as session:
            known = session.scalars(select(Campaign.llm_model)).all()
        return not known or any(model is not None for model in known)
    servable = [c for c in campaigns if c.llm_model is None or (c.llm_backend, c.llm_model) == llm]
    if campaigns and not servable:
        others = ", ".join(sorted({f"{c.llm_model} ({c.llm_backend})" for c in campaigns}))
        raise UserError(
            f"every unfinished {stage} job belongs to a campaign of another LLM ({others}); "
            "start `autointerp score` with that --model and --backend"
        )
    return any(c.llm_model is not None for c in servable)


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
