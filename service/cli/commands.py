"""The `autointerp` commands: each parses its options into the stage's config, calls one
library function and prints the result. Options take their names, help and defaults from
the configs (`service.cli.options`)."""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae.activation_cache import ActivationCache
from sae.architectures import SaeConfig
from sae.checkpoint_import import ImportConfig
from sae.errors import UserError
from sae.latent_stats import CacheConfig
from sae.matching import MatchConfig
from sae.train import TrainConfig
from service.cli.options import comma_integers, comma_separated, config_from, option
from service.config import (
    CalibrationConfig,
    LLMConfig,
    QueueConfig,
    ReportConfig,
    ScoreConfig,
    ScoringConfig,
    UIConfig,
)
from service.progress import token_progress

app = typer.Typer(
    help="Train SAEs of several seeds, match their latents, explain and score them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def main() -> None:
    """Console-script entry point: a UserError ends in one line and exit status 2."""
    try:
        app()
    except UserError as error:
        # Escaped: a message naming e.g. "[train]" must not be read as rich markup.
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)


@app.command()
def models() -> None:
    """List the subject models available on this machine."""
    from sae.subject_model import list_models
    from service.config import get_settings

    table = Table("model", "where")
    for name, where in list_models(get_settings().home):
        table.add_row(name, where)
    console.print(table)


@app.command(name="hookpoints")
def hookpoints_command(
    model: str = typer.Argument(..., help="embedded name (smollm2), local folder or HF id"),
    contains: str = typer.Option("", help="only names containing this text"),
) -> None:
    """List the module names of a model that activations can be captured at."""
    from sae.subject_model import hookpoints, load_model
    from service.config import get_settings

    loaded, _ = load_model(model, get_settings().home)
    for name in hookpoints(loaded):
        if contains in name:
            console.print(name, highlight=False)


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="subject model"),
    hookpoint: str = typer.Option("model.layers.6.mlp", help="module to capture"),
) -> None:
    """Run the subject model on the embedded corpus and report what it computed."""
    from sae.forward_report import run_forward_report
    from service.config import get_settings

    with console.status(f"loading {model} and running it on the embedded corpus"):
        report = run_forward_report(model, get_settings().home, hookpoint)
    table = Table("measure", "value", title=f"{report.model} at {report.hookpoint}")
    table.add_row("tokens", f"{report.n_tokens:,}")
    table.add_row("activation width", str(report.d_model))
    table.add_row("full forward", f"{report.tokens_per_s_full:,.0f} tokens/s")
    table.add_row("stopped after hookpoint", f"{report.tokens_per_s_truncated:,.0f} tokens/s")
    table.add_row("speed-up", f"{report.speedup:.1f}x")
    table.add_row("activations identical", str(report.identical))
    table.add_row("mean activation norm", f"{report.mean_norm:.3f}")
    for token, norm in report.top_tokens:
        table.add_row("largest norm", f"{token!r}: {norm:.2f}")
    console.print(table)


db_app = typer.Typer(help="Manage the SQL store (AUTOINTERP_DB).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the store or migrate it to this version's schema."""
    from service.config import get_settings
    from service.store.engine import upgrade

    before, after = upgrade(get_settings().db)
    if before == after:
        console.print(f"store already at schema revision {after}", highlight=False)
    else:
        console.print(f"store upgraded from {before or 'empty'} to revision {after}")


CAMPAIGN_OPTION = typer.Option(
    None, "--campaign", help="campaign id (`autointerp campaigns`); default: the newest with scores"
)


def _score_job(
    config_file: Path | None, explainers: list[str] | None, scorers: list[str] | None
) -> ScoreConfig:
    """The job config from a TOML file (the keys of a study's [score.job]) and the flags,
    flags winning; every field resolved."""
    import tomllib

    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"cannot read score config {config_file}: {error}") from None
        # A whole study file works too: its [score.job] section is the job config.
        values = dict(values.get("score", {}).get("job", values))
    flags = {"explainers": comma_separated(explainers), "scorers": comma_separated(scorers)}
    return config_from(ScoreConfig, values | {k: v for k, v in flags.items() if v is not None})


@app.command("queue")
def queue_command(
    run: str = typer.Option(..., help="name of the run whose latents to queue"),
    selection: str = option(QueueConfig, "selection"),
    latents: int | None = option(QueueConfig, "latents"),
    seed: int = option(QueueConfig, "seed"),
    stage: str = option(QueueConfig, "stage"),
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="score config TOML: the keys of a study's [score.job]"),
    ] = None,
    explainers: list[str] | None = option(ScoreConfig, "explainers"),
    scorers: list[str] | None = option(ScoreConfig, "scorers"),
    model: str = option(LLMConfig, "model"),
    backend: str = option(LLMConfig, "backend"),
    urls: list[str] | None = option(LLMConfig, "urls", "--llm-url"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="queue the campaign's failed jobs again, fresh attempts"
    ),
    campaign: int | None = CAMPAIGN_OPTION,
) -> None:
    """Queue a run's latents in a scoring campaign (the score config and the LLM); latents
    already queued in that campaign are left as they are."""
    from service.config import get_settings
    from service.scoring.campaign import existing_campaign, open_campaign
    from service.store.campaigns import describe, get_campaign
    from service.store.engine import open_store
    from service.store.queue import retry_failed as requeue_failed
    from service.store.sampling import queue_run

    store = open_store(get_settings().db)
    job = _score_job(config_file, explainers, scorers)
    llm = config_from(
        LLMConfig, {"urls": comma_separated(urls), "model": model, "backend": backend}
    )
    if retry_failed:
        with store.session() as session, session.begin():
            chosen = (
                get_campaign(session, campaign)
                if campaign is not None
                else existing_campaign(session, job, llm)
            )
            if chosen is None:
                raise UserError(
                    "no campaign of this score config and LLM; pick one with --campaign N "
                    "(`autointerp campaigns` lists them)"
                )
            n = requeue_failed(session, chosen.id, stage)
            console.print(f"{n} failed {stage} jobs queued again in {describe(chosen)}")
        return
    if campaign is not None:
        raise UserError("--campaign only chooses what --retry-failed requeues; drop it")
    config = config_from(
        QueueConfig, {"selection": selection, "latents": latents, "seed": seed, "stage": stage}
    )
    result = queue_run(store, run, lambda session: open_campaign(session, job, llm), config)
    detail = (
        f" ({result.shared} shared, {result.seed_specific} seed-specific)"
        if result.shared is not None
        else ""
    )
    console.print(
        f"{result.selected} latents of {result.run}{detail}: {result.inserted} new "
        f"{result.stage} jobs, {result.selected - result.inserted} already queued, in "
        f"{result.campaign}",
        highlight=False,
    )


@app.command("campaigns")
def campaigns_command() -> None:
    """List the scoring campaigns: their LLM and config, jobs by state, latents scored."""
    from service.config import get_settings
    from service.store.campaigns import list_campaigns
    from service.store.engine import open_store
    from service.store.models import JOB_STATES

    store = open_store(get_settings().db)
    with store.read_session() as session:
        summaries = list_campaigns(session)
        table = Table(
            "id", "LLM", "explainers", "scorers", *JOB_STATES, "latents scored", "state", "created"
        )
        for summary in summaries:
            campaign = summary.campaign
            config = campaign.config or {}
            llm = campaign.llm_model or ("not recorded" if campaign.llm else "none")
            table.add_row(
                str(campaign.id),
                llm if campaign.llm_backend is None else f"{llm} ({campaign.llm_backend})",
                ", ".join(config.get("explainers", [])) or "-",
                ", ".join(config.get("scorers", [])) or "-",
                *(str(summary.jobs[state]) for state in JOB_STATES),
                str(summary.latents_scored),
                summary.state,
                f"{campaign.created_at:%Y-%m-%d %H:%M}",
            )
    console.print(table if summaries else "no campaigns yet: `autointerp queue` starts one")


@app.command("status")
def status_command(
    campaign: int | None = typer.Option(None, "--campaign", help="only this campaign's jobs"),
) -> None:
    """Jobs by stage and state, the recent completion rate and the time left; LLM requests
    and errors per server."""
    from service.config import get_settings
    from service.store.engine import open_store
    from service.store.models import JOB_STATES
    from service.store.queue import status

    report = status(open_store(get_settings().db), campaign_id=campaign)
    table = Table("stage", *JOB_STATES, "jobs/s", "ETA", title="job queue")
    for row in [*report.stages, report.total]:
        rate = f"{row.rate_per_s:.2f}" if row.rate_per_s is not None else "-"
        eta = f"{row.eta_s:,.0f} s" if row.eta_s is not None else "-"
        table.add_row(row.stage, *(str(row.counts[s]) for s in JOB_STATES), rate, eta)
    console.print(table)
    if report.servers:
        servers = Table(
            "LLM server",
            "requests",
            "errors",
            "last 10 min",
            "errors, last 10 min",
            title="LLM calls of finished jobs",
        )
        for server in report.servers:
            servers.add_row(
                server.base_url,
                str(server.requests),
                str(server.errors),
                str(server.recent_requests),
                str(server.recent_errors),
            )
        console.print(servers)


@app.command("query")
def query_command(
    sql: str | None = typer.Argument(None, help="one read-only SQL statement"),
    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
    schema: bool = typer.Option(
        False, "--schema", help="list the store's tables and columns with their meanings"
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="stop the query after SECONDS (default 30)"
    ),
    max_rows: int | None = typer.Option(
        None, "--max-rows", help="print at most N rows (default 10000)"
    ),
) -> None:
    """Run a read-only SQL query on the store and print the rows."""
    from service.config import get_settings
    from service.store.engine import open_store
    from service.store.query import format_result, run_query, schema_result

    if fmt not in ("table", "csv", "json"):
        raise UserError(f"unknown format {fmt!r}; use table, csv or json")
    if schema == (sql is not None):
        raise UserError("give one SQL statement, or --schema (not both)")
    result = (
        schema_result()
        if sql is None
        else run_query(open_store(get_settings().db), sql, timeout_s=timeout, max_rows=max_rows)
    )
    if fmt != "table":
        sys.stdout.write(format_result(result, fmt))
    else:
        table = Table(*result.columns)
        for row in result.rows:
            table.add_row(*(f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v) for v in row))
        console.print(table)
    if result.truncated:
        err_console.print(f"showing the first {len(result.rows)} rows; raise --max-rows for more")


@app.command("match")
def match_command(
    a: Annotated[
        Path | None, typer.Argument(help="SAE checkpoint folder (sparsify or SAELens)")
    ] = None,
    b: Annotated[Path | None, typer.Argument(help="SAE checkpoint folder to match A into")] = None,
    all_seeds: Annotated[
        Path | None,
        typer.Option("--all", help="training output folder: all seed<N> SAEs of each hookpoint"),
    ] = None,
    threshold: float = option(MatchConfig, "threshold"),
    solver: str = option(MatchConfig, "solver"),
    candidates: int = option(MatchConfig, "candidates"),
    into_larger: bool = option(MatchConfig, "into_larger"),
    widen_rounds: int = option(MatchConfig, "widen_rounds"),
    run: Annotated[
        str | None,
        typer.Option(help="match every pair of seeds of this stored run and store the result"),
    ] = None,
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    assignment_out: Annotated[
        Path | None,
        typer.Option("--assignment-out", help="write each latent's partners, cosines (.csv/.npz)"),
    ] = None,
) -> None:
    """Match SAE latents across seeds by decoder and encoder directions (Hungarian)."""
    import json

    from sae.matching import match_checkpoints, write_assignment
    from sae.matching.multiseed import analyse_folder
    from service.report.matching import block_progress, multiseed_tables, pair_table

    given = [a is not None and b is not None, all_seeds is not None, run is not None]
    if sum(given) != 1 or (not given[0] and (a or b)):
        raise UserError("give two checkpoint folders A B, --all DIR or --run RUN (one, not both)")
    if not given[0] and assignment_out is not None:
        raise UserError("--assignment-out works with two SAEs A B, not with --all or --run")
    config = config_from(
        MatchConfig,
        {"threshold": threshold, "solver": solver, "candidates": candidates}
        | {"into_larger": into_larger, "widen_rounds": widen_rounds},
    )
    if run is not None:
        _match_run(run, config, json_output)
        return
    if all_seeds is not None:
        with block_progress(err_console) as progress:
            results = analyse_folder(all_seeds, config, progress)
        if json_output:
            print(json.dumps({hook: r.model_dump() for hook, r in results.items()}, indent=2))
            return
        for hookpoint, result in results.items():
            for table in multiseed_tables(result, hookpoint):
                console.print(table)
        return
    assert a is not None and b is not None
    with block_progress(err_console) as progress:
        match = match_checkpoints(a, b, config, progress)
    if assignment_out is not None:
        write_assignment(assignment_out, match)
    if json_output:
        print(match.summary.model_dump_json(indent=2))
    else:
        console.print(pair_table(match.summary, f"{a} -> {b}"))


def _match_run(run: str, config: MatchConfig, json_output: bool) -> None:
    """`match --run`: every pair of seeds of a stored run, matched and stored."""
    import json

    from service.config import get_settings
    from service.report.matching import block_progress, pair_table
    from service.store.engine import open_store
    from service.store.matches import record_matching

    with block_progress(err_console) as progress:
        results = record_matching(open_store(get_settings().db), run, config, progress)
    if json_output:
        summaries = {
            hookpoint: {f"{a}->{b}": m.summary.model_dump() for (a, b), m in pairs.items()}
            for hookpoint, pairs in results.items()
        }
        print(json.dumps(summaries, indent=2))
        return
    for hookpoint, pairs in results.items():
        for (a, b), match in sorted(pairs.items()):
            console.print(pair_table(match.summary, f"{run} {hookpoint}: seed {a} -> seed {b}"))


llm_app = typer.Typer(help="Serve an LLM that explains and scores latents.", no_args_is_help=True)
app.add_typer(llm_app, name="llm")


@llm_app.command("serve")
def llm_serve(
    model: str = typer.Option("smollm2", help="embedded name, model folder or HF id"),
    python: Annotated[
        Path | None, typer.Option(help="Python with vllm (default: .venv-vllm)")
    ] = None,
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8011, help="port to listen on"),
    precision: str = option(LLMConfig, "precision"),
) -> None:
    """Start a real vLLM OpenAI-compatible server for MODEL; runs until Ctrl-C. With
    AUTOINTERP_LLM_API_KEY set, the server requires that key of every client."""
    import os

    from service.config import API_KEY_ENV, get_settings
    from service.llm.serve import serve_forever, start_server, wait_ready

    api_key = os.environ.get(API_KEY_ENV) or None
    llm = config_from(LLMConfig, {"precision": precision})
    server = start_server(
        model,
        get_settings().home,
        python=python,
        host=host,
        port=port,
        api_key=api_key,
        precision=llm.precision,
    )
    try:
        with err_console.status(f"starting vLLM for {model} (log: {server.log_path})"):
            wait_ready(server)
    except BaseException:
        server.stop()
        raise
    guarded = f", requiring the key in {API_KEY_ENV}" if api_key else ""
    console.print(f"vLLM serves {server.model!r} at {server.url}{guarded} (Ctrl-C stops it)")
    raise typer.Exit(serve_forever(server))


@app.command("score")
def score_command(
    workers: int = option(ScoringConfig, "workers"),
    urls: list[str] | None = option(LLMConfig, "urls", "--llm-url"),
    model: str = option(LLMConfig, "model"),
    backend: str = option(LLMConfig, "backend"),
    stage: str = option(ScoringConfig, "stage"),
    max_jobs: int | None = option(ScoringConfig, "max_jobs"),
    lease_seconds: float = option(ScoringConfig, "lease_seconds"),
) -> None:
    """Explain and score queued latents until the queue is empty (resumable)."""
    from service.config import get_settings
    from service.scoring.worker import run_score

    settings = get_settings()
    llm = config_from(
        LLMConfig, {"urls": comma_separated(urls), "model": model, "backend": backend}
    )
    config = config_from(
        ScoringConfig,
        {"workers": workers, "stage": stage, "max_jobs": max_jobs, "lease_seconds": lease_seconds}
        | {"llm": llm},
    )
    try:
        stats = run_score(settings.db, settings.home, config, console=console)
    except KeyboardInterrupt:
        err_console.print("interrupted: unfinished jobs are back in the queue; run again to resume")
        raise typer.Exit(130) from None
    table = Table("measure", "value", title="explained and scored")
    table.add_row("latents done", str(stats.completed))
    table.add_row("latents failed / requeued", f"{stats.failed} / {stats.requeued}")
    table.add_row("latents per minute", f"{stats.latents_per_min:.1f}")
    table.add_row("LLM requests", str(stats.requests))
    table.add_row("parse failures", f"{stats.parse_failures} of {stats.answers}")
    table.add_row("generated tokens/s", f"{stats.tokens_per_s:.1f}")
    sent = sum(server.requests for server in stats.servers)
    for server in stats.servers:
        # Attempts, failed ones included: a server that went away shows its errors here.
        share = server.requests / sent if sent else 0.0
        table.add_row(
            f"  at {server.base_url}",
            f"{server.requests} attempts ({share:.0%}), {server.errors} failed",
        )
    console.print(table)


@app.command("calibrate")
def calibrate_command(
    urls: list[str] | None = option(LLMConfig, "urls", "--llm-url"),
    model: str = option(LLMConfig, "model"),
    backend: str = option(LLMConfig, "backend"),
    explainers: list[str] | None = option(CalibrationConfig, "explainers"),
    scorers: list[str] | None = option(CalibrationConfig, "scorers"),
    rules: list[str] | None = option(CalibrationConfig, "rules"),
    n_examples: int = option(CalibrationConfig, "n_examples"),
) -> None:
    """Tell, on planted latents with known rules, whether each scorer (and this LLM) can tell
    a right explanation from a wrong one; prints and stores each scorer's discrimination."""
    from service.config import get_settings
    from service.scoring.calibrate import discrimination, discrimination_table, run_calibration

    config = config_from(
        CalibrationConfig,
        {
            "explainers": comma_separated(explainers),
            "scorers": comma_separated(scorers),
            "rules": comma_separated(rules),
            "n_examples": n_examples,
        },
    )
    llm = config_from(
        LLMConfig, {"urls": comma_separated(urls), "model": model, "backend": backend}
    )
    settings = get_settings()
    calibration_id, entries = run_calibration(
        settings.db, settings.home, config, llm, console=err_console
    )
    console.print(discrimination_table(discrimination(entries, config), config))
    console.print(f"stored as calibration {calibration_id}", highlight=False)


@app.command("cache")
def cache_command(
    run: str = typer.Option(
        ...,
        "--run",
        "--run-name",
        help="name of the run whose SAEs to cache (--run-name under torchrun, which claims --run)",
    ),
    tokens: int = option(CacheConfig, "tokens"),
    window: int = option(CacheConfig, "window"),
    chunk_len: int = option(CacheConfig, "chunk_len"),
    n_top: int = option(CacheConfig, "n_top"),
    quantile_bins: int = option(CacheConfig, "quantile_bins", "--bins"),
    per_quantile_bin: int = option(CacheConfig, "per_quantile_bin", "--per-bin"),
    negatives: int = option(CacheConfig, "negatives"),
    seed: int = option(CacheConfig, "seed"),
) -> None:
    """Record firing statistics and example windows for every latent of a run.
    Under `torchrun --nproc-per-node N -m service.cli cache ...`, N processes share the tokens."""
    from sae.distributed import process_group
    from service.cache.stage import cache_run
    from service.config import get_settings
    from service.store.engine import open_store

    settings = get_settings()
    config = config_from(
        CacheConfig,
        {"tokens": tokens, "window": window, "chunk_len": chunk_len, "n_top": n_top}
        | {"quantile_bins": quantile_bins, "per_quantile_bin": per_quantile_bin}
        | {"negatives": negatives, "seed": seed},
    )
    summary = cache_run(
        open_store(settings.db),
        run,
        settings.home,
        config,
        announce=lambda line: console.print(escape(line), highlight=False),
    )
    if not process_group().is_main:
        return
    if summary.n_tokens is None:
        console.print(
            f"run {run} is already cached with this config as version {summary.version} "
            f"(newest: {summary.newest_version}); nothing written",
            highlight=False,
        )
        return
    if summary.n_tokens < summary.tokens_asked:
        console.print(
            f"[yellow]the dataset has only {summary.n_tokens:,} tokens in whole chunks; "
            f"used {summary.n_tokens:,} of the {summary.tokens_asked:,} asked for[/]"
        )
    table = Table("seed", "latents", "tokens", "dead (never fired)", "dense (>10%)", "examples")
    for sae in summary.saes:
        table.add_row(
            str(sae.seed),
            f"{sae.n_latents:,}",
            f"{sae.n_tokens:,}",
            f"{sae.dead:,} ({sae.dead / sae.n_latents:.1%})",
            f"{sae.dense:,} ({sae.dense / sae.n_latents:.1%})",
            f"{sae.n_examples:,}",
        )
    console.print(table)


def _build_activation_cache(
    out: Path, config: TrainConfig, dtype: str, home: Path
) -> ActivationCache:
    """Run the model once over the config's dataset and store its hookpoints' activations."""
    from sae.train import cache_activations

    if dtype not in ("float16", "bfloat16"):
        raise UserError(f"cache dtype {dtype} is not supported: use float16 or bfloat16")
    with token_progress("caching activations", console) as update:
        cache = cache_activations(config, out, home, dtype, update)  # type: ignore[arg-type]
    size = sum(path.stat().st_size for path in cache.folder.iterdir())
    widths = ", ".join(f"{name} ({cache.width(name)})" for name in cache.hookpoints)
    console.print(
        f"activation cache {cache.folder}: {cache.n_tokens:,} tokens of {widths}, "
        f"{cache.manifest.dtype}, {size / 2**20:,.0f} MiB",
        highlight=False,
        soft_wrap=True,
    )
    return cache


@app.command("cache-activations")
def cache_activations_command(
    out: Annotated[Path, typer.Option(help="cache folder: manifest.json + one .npy per hookpoint")],
    model: str = option(TrainConfig, "model"),
    hookpoints: list[str] | None = option(TrainConfig, "hookpoints", "--hookpoint"),
    dataset: str = option(TrainConfig, "dataset"),
    max_tokens: int | None = option(TrainConfig, "max_tokens", "--tokens"),
    chunk_len: int = option(TrainConfig, "chunk_len"),
    data_seed: int = option(TrainConfig, "data_seed"),
    dtype: str = typer.Option("float16", help="float16 or bfloat16"),
) -> None:
    """Run the model once and store its activations on disk, for `train --from-cache`.
    Interrupted builds continue when the same command runs again."""
    from service.config import get_settings

    config = config_from(
        TrainConfig,
        {"model": model, "hookpoints": comma_separated(hookpoints), "dataset": dataset}
        | {"max_tokens": max_tokens, "chunk_len": chunk_len, "data_seed": data_seed},
    )
    _build_activation_cache(out, config, dtype, get_settings().home)


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="output folder: OUT/<hookpoint>/seed<N>/ per SAE")],
    model: str = option(TrainConfig, "model"),
    hookpoints: list[str] | None = option(TrainConfig, "hookpoints", "--hookpoint"),
    dataset: str = option(TrainConfig, "dataset"),
    architecture: str = option(SaeConfig, "architecture", "--arch"),
    n_latents: int = option(SaeConfig, "n_latents", "--latents"),
    k: int = option(SaeConfig, "k"),
    seeds: list[str] | None = option(TrainConfig, "seeds"),
    max_tokens: int | None = option(TrainConfig, "max_tokens", "--tokens"),
    epochs: int = option(TrainConfig, "epochs"),
    batch_tokens: int = option(TrainConfig, "batch_tokens"),
    lr: float | None = option(TrainConfig, "lr"),
    l1_coefficient: float | None = option(SaeConfig, "l1_coefficient"),
    sparsity_coefficient: float | None = option(SaeConfig, "sparsity_coefficient"),
    dead_tokens: int = option(TrainConfig, "dead_tokens"),
    chunk_len: int = option(TrainConfig, "chunk_len"),
    data_seed: int = option(TrainConfig, "data_seed"),
    precision: str = option(TrainConfig, "precision"),
    device: str = option(TrainConfig, "device"),
    cache_activations: Annotated[
        Path | None,
        typer.Option(help="first cache activations in this folder (reused), then train from it"),
    ] = None,
    from_cache: Annotated[
        Path | None,
        typer.Option(help="train from this activation cache; model, dataset, tokens come from it"),
    ] = None,
    cache_dtype: str = typer.Option("float16", help="--cache-activations dtype: float16, bfloat16"),
    checkpoint_minutes: float = typer.Option(5.0, help="minutes between periodic checkpoints"),
    run: Annotated[
        str | None,
        typer.Option(help="also record the trained SAEs in the store as this run"),
    ] = None,
) -> None:
    """Train SAEs of several seeds in one pass; Ctrl-C checkpoints, rerunning resumes.
    Under `torchrun --nproc-per-node N -m service.cli train ...`, N processes share each batch."""
    from sae.distributed import process_group
    from sae.train import TrainProgress, config_from_cache, train
    from service.config import get_settings

    home = get_settings().home
    group = process_group()
    if from_cache is not None and cache_activations is not None:
        raise UserError("give either --from-cache or --cache-activations, not both")
    if group.is_distributed and cache_activations is not None:
        raise UserError(
            "--cache-activations runs in one process: build the cache first without torchrun, "
            "then train under torchrun with --from-cache"
        )
    sae_config = config_from(
        SaeConfig,
        {"architecture": architecture, "n_latents": n_latents, "k": k}
        | {"l1_coefficient": l1_coefficient, "sparsity_coefficient": sparsity_coefficient},
    )
    fields = {
        "sae": sae_config,
        "seeds": comma_integers(seeds, "--seeds"),
        "hookpoints": comma_separated(hookpoints),
        "epochs": epochs,
        "batch_tokens": batch_tokens,
        "lr": lr,
        "dead_tokens": dead_tokens,
        "precision": precision,
        "device": device,
    }
    source = {"model": model, "dataset": dataset, "max_tokens": max_tokens}
    source |= {"chunk_len": chunk_len, "data_seed": data_seed}
    if cache_activations is not None:
        _build_activation_cache(
            cache_activations, config_from(TrainConfig, source | fields), cache_dtype, home
        )
        from_cache = cache_activations
    if from_cache is not None:
        given = {key: value for key, value in fields.items() if value is not None}
        config = config_from_cache(from_cache, **given)
    else:
        config = config_from(TrainConfig, source | fields)

    with token_progress("training", console, show=group.is_main) as update:

        def on_progress(state: TrainProgress) -> None:
            status = ""
            if state.fvu == state.fvu:  # not nan: something has been logged
                status = f"FVU {state.fvu:.3f}  L0 {state.l0:.1f}  dead {state.dead_fraction:.1%}"
            update(state.tokens, state.total_tokens, status)

        seconds = 60 * checkpoint_minutes
        result = train(config, out, home, on_progress, checkpoint_seconds=seconds)
    if not group.is_main:
        # The main process reports, records and sets the exit status for the job.
        return
    if result.already_finished:
        message = f"{out} already holds this finished run ({result.tokens:,} tokens)"
        console.print(message, soft_wrap=True)
    elif result.start_step:
        message = f"resumed at step {result.start_step:,} of {result.total_steps:,}"
        console.print(message, soft_wrap=True)
    if config.max_tokens is not None and result.tokens_per_epoch < config.max_tokens:
        console.print(
            f"[yellow]the data gave {result.tokens_per_epoch:,} tokens per epoch "
            f"(asked for {config.max_tokens:,}); raise --epochs to train longer[/]",
            soft_wrap=True,
        )
    table = Table("hookpoint", "seed", "FVU", "L0", "dead", "checkpoint", title="trained SAEs")
    for sae in result.saes:
        table.add_row(
            sae.hookpoint,
            str(sae.seed),
            f"{sae.fvu:.3f}",
            f"{sae.l0:.1f}",
            f"{sae.dead_fraction:.1%}",
            str(sae.path),
        )
    console.print(table)
    if result.tokens_trained:
        rate = f"{result.tokens_per_second:,.0f} tokens/s over {result.seconds:.0f} s"
        console.print(rate, soft_wrap=True)
    if result.interrupted:
        err_console.print(
            f"interrupted at step {result.step:,} of {result.total_steps:,}; checkpoint saved, "
            "rerun the same command to resume",
            soft_wrap=True,
        )
        raise typer.Exit(130)
    if run is not None:
        from service.store.engine import open_store
        from service.store.runs import record_training

        record_training(open_store(get_settings().db), run, config, out, result.saes)
        console.print(f"recorded {len(result.saes)} SAEs as run {run!r}", highlight=False)


@app.command("import-saes")
def import_saes_command(
    run: str = typer.Option(..., help="name of the run to record the SAEs as"),
    folders: Annotated[
        list[str] | None,
        typer.Argument(help="one checkpoint folder per seed, or one folder of seed<N>/ folders"),
    ] = None,
    model: str = option(ImportConfig, "model"),
    hookpoint: str = option(ImportConfig, "hookpoint"),
    dataset: str = option(ImportConfig, "dataset"),
    seeds: list[str] | None = option(ImportConfig, "seeds"),
) -> None:
    """Record SAEs trained elsewhere (sparsify, SAELens or this tool) as a run, after checking
    every checkpoint against the model's hookpoint; then match, cache, queue, score, report."""
    from service.config import get_settings
    from service.store.engine import open_store
    from service.store.imported import record_import

    settings = get_settings()
    config = config_from(
        ImportConfig,
        {"model": model, "hookpoint": hookpoint, "dataset": dataset, "folders": folders}
        | {"seeds": comma_integers(seeds, "--seeds")},
    )
    saes = record_import(open_store(settings.db), run, config, settings.home)
    table = Table("seed", "layout", "architecture", "latents", "d_in", "k", "checkpoint")
    for sae in saes:
        table.add_row(
            str(sae.seed),
            sae.layout,
            sae.architecture,
            f"{sae.n_latents:,}",
            str(sae.d_in),
            "-" if sae.k is None else str(sae.k),
            str(sae.folder),
        )
    console.print(table)
    console.print(f"recorded {len(saes)} SAEs as run {run!r}", highlight=False)


@app.command("report")
def report_command(
    run: str = typer.Option(..., help="name of the run to report on"),
    html: Path | None = option(ReportConfig, "html"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    agreement: bool = option(ReportConfig, "agreement"),
    good_threshold: float = option(ReportConfig, "good_threshold"),
    seed: int = option(ReportConfig, "seed"),
    campaign: int | None = CAMPAIGN_OPTION,
    compare: int | None = typer.Option(
        None, "--compare", help="another campaign id: its scores beside these, paired by latent"
    ),
) -> None:
    """Shared vs seed-specific interpretability of a run, on one campaign's scores: tables,
    statistics, plots; with --compare, two campaigns side by side."""
    from service.config import get_settings
    from service.report import check_html_path, make_report, write_html
    from service.report.terminal import headline
    from service.store.engine import open_store

    if html is not None:
        check_html_path(html)
    config = config_from(
        ReportConfig,
        {"html": html, "good_threshold": good_threshold, "seed": seed, "agreement": agreement},
    )
    store = open_store(get_settings().db)
    try:
        with err_console.status(f"computing the report on run {run}"):
            result = make_report(store, run, config, campaign, compare)
    finally:
        store.dispose()
    if html is not None:
        with err_console.status(f"drawing figures and writing {html}"):
            write_html(result, html)
    if json_output:
        print(result.report.model_dump_json(indent=2))
        return
    for part in headline(result.report):
        console.print(part)
    if html is not None:
        console.print(f"HTML report written to {html}", highlight=False)


@app.command("show")
def show_command(
    sae: str = typer.Argument(..., help="RUN:SEED, or RUN:HOOKPOINT:SEED"),
    latent: int = typer.Argument(..., help="latent index within the SAE"),
    contexts: int = typer.Option(5, help="top-activating contexts to show"),
    campaign: int | None = CAMPAIGN_OPTION,
) -> None:
    """One latent: explanations, scores, partners in other seeds, top contexts."""
    from sae.subject_model import load_tokenizer
    from service.config import get_settings
    from service.report.show import render_latent, show_latent
    from service.store.engine import open_store

    settings = get_settings()
    store = open_store(settings.db)
    try:
        view = show_latent(
            store,
            sae,
            latent,
            lambda model: load_tokenizer(model, settings.home),
            contexts,
            campaign,
        )
    finally:
        store.dispose()
    for part in render_latent(view):
        console.print(part)


@app.command("ui")
def ui_command(
    port: int = option(UIConfig, "port"),
    host: str = option(UIConfig, "host"),
    run: str | None = option(UIConfig, "run"),
) -> None:
    """A local, read-only web browser over the store: runs, latents, partners in every seed."""
    from service.config import get_settings
    from service.ui.server import serve

    settings = get_settings()
    config = UIConfig(port=port, host=host, run=run)
    where = f"/runs/{run}" if run else ""
    console.print(f"latent browser at http://{host}:{port}{where} (Ctrl-C stops it)")
    serve(config, settings.db, settings.home)


@app.command("run")
def run_command(
    study: Annotated[Path, typer.Argument(help="study config (TOML), e.g. examples/demo.toml")],
) -> None:
    """The whole study from one config: train, match, cache, queue, score, report.

    Every stage whose outputs are already there is skipped, so rerunning resumes. Under
    `torchrun --nproc-per-node N -m service.cli run ...`, N processes train and cache."""
    from service.config import get_settings
    from service.report.terminal import headline
    from service.study import load_study, run_study

    settings = get_settings()
    config = load_study(study)
    result = run_study(config, settings.db, settings.home, console)
    if result is None:  # a torchrun process other than the main one
        return
    for part in headline(result.report.report):
        console.print(part)
    if result.survey is not None:
        console.rule("survey: the LLM-free pairs on more latents")
        for part in headline(result.survey.report):
            console.print(part)
