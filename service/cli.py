"""The `autointerp` command line: parses arguments, calls library functions, prints results."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sae.errors import UserError
from service.progress import token_progress

app = typer.Typer(
    help="Train SAEs of several seeds, match their latents, explain and score them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

# Options that `cache-activations` and `train` share: what is run, where, on which text.
SubjectModelOption = Annotated[
    str, typer.Option(help="subject model: embedded name, folder or HF id")
]
HookpointsOption = Annotated[
    list[str] | None,
    typer.Option(help="module(s), repeated or comma-separated (default model.layers.6.mlp)"),
]
DatasetOption = Annotated[str, typer.Option(help="embedded, a .txt/.jsonl path or HF dataset")]


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
    from sae.models import list_models
    from service.settings import get_settings

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
    from sae.models import hookpoints, load_model
    from service.settings import get_settings

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
    from service.demo import run_forward_report
    from service.settings import get_settings

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
    from service.settings import get_settings
    from service.store.engine import upgrade

    before, after = upgrade(get_settings().db)
    if before == after:
        console.print(f"store already at schema revision {after}", highlight=False)
    else:
        console.print(f"store upgraded from {before or 'empty'} to revision {after}")


@app.command("queue")
def queue_command(
    run: str = typer.Option(..., help="name of the run whose latents to queue"),
    stage: str = typer.Option("explain", help="stage the jobs are for"),
    all_latents: bool = typer.Option(False, "--all", help="every live latent (the default)"),
    sample: int | None = typer.Option(None, help="N latents chosen at random"),
    stratified: int | None = typer.Option(
        None, help="N shared and N seed-specific latents (needs stored matches)"
    ),
    seed: int = typer.Option(0, help="seed of the random choice"),
) -> None:
    """Queue a run's latents for a stage; latents already queued are left as they are."""
    from service.settings import get_settings
    from service.store.engine import open_store
    from service.store.sampling import Selection, queue_run

    if sum((all_latents, sample is not None, stratified is not None)) > 1:
        raise UserError("give one of --all, --sample N, --stratified N")
    selection: Selection = (
        "sample" if sample is not None else "stratified" if stratified is not None else "all"
    )
    store = open_store(get_settings().db)
    result = queue_run(store, run, stage, selection, sample or stratified, seed)
    detail = (
        f" ({result.shared} shared, {result.seed_specific} seed-specific)"
        if result.shared is not None
        else ""
    )
    console.print(
        f"{result.selected} latents of {result.run}{detail}: {result.inserted} new "
        f"{result.stage} jobs, {result.selected - result.inserted} already queued",
        highlight=False,
    )


@app.command("status")
def status_command() -> None:
    """Jobs by stage and state, the recent completion rate and the time left."""
    from service.settings import get_settings
    from service.store.engine import open_store
    from service.store.models import JOB_STATES
    from service.store.queue import status

    report = status(open_store(get_settings().db))
    table = Table("stage", *JOB_STATES, "jobs/s", "ETA", title="job queue")
    for row in [*report.stages, report.total]:
        rate = f"{row.rate_per_s:.2f}" if row.rate_per_s is not None else "-"
        eta = f"{row.eta_s:,.0f} s" if row.eta_s is not None else "-"
        table.add_row(row.stage, *(str(row.counts[s]) for s in JOB_STATES), rate, eta)
    console.print(table)


@app.command("query")
def query_command(
    sql: str = typer.Argument(..., help="one read-only SQL statement"),
    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
) -> None:
    """Run a read-only SQL query on the store and print the rows."""
    from service.settings import get_settings
    from service.store.engine import open_store
    from service.store.query import format_result, run_query

    if fmt not in ("table", "csv", "json"):
        raise UserError(f"unknown format {fmt!r}; use table, csv or json")
    result = run_query(open_store(get_settings().db), sql)
    if fmt != "table":
        sys.stdout.write(format_result(result, fmt))
        return
    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*(f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v) for v in row))
    console.print(table)


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
    threshold: float = typer.Option(0.7, help="a latent is shared when both cosines are > this"),
    solver: str = typer.Option("auto", help="auto, exact (dense) or sparse (top-k graph)"),
    candidates: int = typer.Option(32, help="sparse solver: partners kept per row and column"),
    into_larger: bool = typer.Option(
        False, "--into-larger", help="allow different latent counts (smaller into larger)"
    ),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    assignment_out: Annotated[
        Path | None,
        typer.Option("--assignment-out", help="write each latent's partners, cosines (.csv/.npz)"),
    ] = None,
) -> None:
    """Match SAE latents across seeds by decoder and encoder directions (Hungarian)."""
    import json

    from sae.matching import make_config, match_checkpoints, write_assignment
    from sae.multiseed import analyse_folder
    from service.matching_view import block_progress, multiseed_tables, pair_table

    if (all_seeds is None) == (a is None or b is None) or (all_seeds and (a or b)):
        raise UserError("give two checkpoint folders A B, or --all DIR (not both)")
    if all_seeds is not None and assignment_out is not None:
        raise UserError("--assignment-out works with two SAEs A B, not with --all")
    config = make_config(
        threshold=threshold, solver=solver, candidates=candidates, into_larger=into_larger
    )
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
) -> None:
    """Start a real vLLM OpenAI-compatible server for MODEL; runs until Ctrl-C."""
    from service.llm.serve import serve_forever, start_server, wait_ready
    from service.settings import get_settings

    server = start_server(model, get_settings().home, python=python, host=host, port=port)
    try:
        with err_console.status(f"starting vLLM for {model} (log: {server.log_path})"):
            wait_ready(server)
    except BaseException:
        server.stop()
        raise
    console.print(f"vLLM serves {server.model!r} at {server.url} (Ctrl-C stops it)")
    raise typer.Exit(serve_forever(server))


@app.command("score")
def score_command(
    workers: int = typer.Option(8, help="latents in flight at once in this process"),
    llm_url: Annotated[
        list[str] | None,
        typer.Option("--llm-url", help="OpenAI-compatible base URL (default local vLLM); repeat"),
    ] = None,
    model: str = typer.Option("smollm2", help="model name as the server serves it"),
    backend: str = typer.Option("openai", help="openai (a server) or transformers (in-process)"),
    stage: str = typer.Option("explain", help="queue stage to work on"),
    max_jobs: int | None = typer.Option(None, help="stop after this many jobs"),
) -> None:
    """Explain and score queued latents until the queue is empty (resumable)."""
    from service.llm.base import DEFAULT_URL, LLMConfig
    from service.settings import get_settings
    from service.worker import run_score

    settings = get_settings()
    urls = llm_url or [DEFAULT_URL]
    config = LLMConfig(backend=backend, model=model, urls=urls, max_concurrency=4 * workers)
    try:
        stats = run_score(
            settings.db,
            settings.home,
            config,
            workers=workers,
            stage=stage,
            max_jobs=max_jobs,
            console=console,
        )
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
    console.print(table)


@app.command("calibrate")
def calibrate_command(
    llm_url: Annotated[
        list[str] | None,
        typer.Option("--llm-url", help="OpenAI-compatible base URL (default local vLLM); repeat"),
    ] = None,
    model: str = typer.Option("smollm2", help="model name as the server serves it"),
    backend: str = typer.Option("openai", help="openai (a server) or transformers (in-process)"),
    explainers: str = typer.Option("llm,token_baseline", help="comma-separated explainers"),
    scorers: str = typer.Option("detection,fuzzing,embedding", help="comma-separated scorers"),
    rules: str | None = typer.Option(None, help="comma-separated planted rules (default all)"),
    n_examples: int = typer.Option(15, help="held-out activating (and as many silent) windows"),
) -> None:
    """Tell, on planted latents with known rules, whether each scorer (and this LLM) can tell
    a right explanation from a wrong one; prints and stores each scorer's discrimination."""
    from pydantic import ValidationError

    from service.calibrate import (
        CalibrationConfig,
        discrimination,
        discrimination_table,
        run_calibration,
    )
    from service.llm.base import DEFAULT_URL, LLMConfig
    from service.planted import RULES
    from service.score_config import ScoreConfig
    from service.settings import get_settings

    score = ScoreConfig(
        explainers=_comma_names([explainers]),
        scorers=_comma_names([scorers]),
        shuffled_control=False,
        cross_seed=0,
        n_positive=n_examples,
        n_negative=n_examples,
    )
    try:
        config = CalibrationConfig(
            score=score, rules=_comma_names([rules]) if rules else sorted(RULES)
        )
    except ValidationError as error:
        raise UserError(f"calibrate: {error.errors()[0]['msg']}") from None
    llm_config = LLMConfig(backend=backend, model=model, urls=llm_url or [DEFAULT_URL])
    settings = get_settings()
    calibration_id, entries = run_calibration(
        settings.db, settings.home, config, llm_config, console=err_console
    )
    console.print(discrimination_table(discrimination(entries, config), config))
    console.print(f"stored as calibration {calibration_id}", highlight=False)


@app.command("cache")
def cache_command(
    run: str = typer.Option(..., help="name of the run whose SAEs to cache"),
    tokens: int = typer.Option(1_000_000, help="tokens of the run's dataset to read"),
    window: int = typer.Option(32, help="tokens per example window"),
    chunk_len: int = typer.Option(256, help="tokens per model forward sequence"),
    n_top: int = typer.Option(20, help="top-activating windows kept per latent"),
    bins: int = typer.Option(10, help="activation-quantile bins sampled per latent"),
    per_bin: int = typer.Option(5, help="windows sampled from each quantile bin"),
    negatives: int = typer.Option(20, help="non-firing windows kept per latent"),
    seed: int = typer.Option(0, help="seed of the window sampling"),
) -> None:
    """Record firing statistics and example windows for every latent of a run."""
    from sae.latent_cache import CacheConfig
    from service.cache_stage import cache_run
    from service.settings import get_settings
    from service.store.engine import open_store

    settings = get_settings()
    config = CacheConfig(
        window=window,
        n_top=n_top,
        n_quantile_bins=bins,
        per_quantile_bin=per_bin,
        n_reservoir=max(4 * bins * per_bin, 20),
        n_negative=negatives,
        seed=seed,
    )
    summary = cache_run(open_store(settings.db), run, settings.home, tokens, config, chunk_len)
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


def _comma_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of integers") from None


def _comma_names(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _build_activation_cache(
    out: Path,
    model: str,
    hookpoints: list[str],
    dataset: str,
    tokens: int | None,
    chunk_len: int,
    data_seed: int,
    dtype: str,
) -> None:
    from sae.activation_cache import build_activation_cache
    from service.settings import get_settings

    if dtype not in ("float16", "bfloat16"):
        raise UserError(f"cache dtype {dtype} is not supported: use float16 or bfloat16")
    with token_progress("caching activations", console) as update:
        cache = build_activation_cache(
            out,
            model,
            hookpoints,
            get_settings().home,
            dataset=dataset,
            chunk_len=chunk_len,
            max_tokens=tokens,
            data_seed=data_seed,
            dtype=dtype,  # type: ignore[arg-type]
            on_progress=update,
        )
    size = sum(path.stat().st_size for path in cache.folder.iterdir())
    widths = ", ".join(f"{name} ({cache.width(name)})" for name in cache.hookpoints)
    console.print(
        f"activation cache {cache.folder}: {cache.n_tokens:,} tokens of {widths}, "
        f"{cache.manifest.dtype}, {size / 2**20:,.0f} MiB",
        highlight=False,
        soft_wrap=True,
    )


@app.command("cache-activations")
def cache_activations_command(
    out: Annotated[Path, typer.Option(help="cache folder: manifest.json + one .npy per hookpoint")],
    model: SubjectModelOption = "smollm2",
    hookpoint: HookpointsOption = None,
    dataset: DatasetOption = "embedded",
    tokens: int | None = typer.Option(None, help="dataset tokens to cache (default all)"),
    chunk_len: int = typer.Option(256, help="tokens per model forward sequence"),
    data_seed: int = typer.Option(0, help="seed of the chunk order"),
    dtype: str = typer.Option("float16", help="float16 or bfloat16"),
) -> None:
    """Run the model once and store its activations on disk, for `train --from-cache`.
    Interrupted builds continue when the same command runs again."""
    names = _comma_names(hookpoint) or ["model.layers.6.mlp"]
    _build_activation_cache(out, model, names, dataset, tokens, chunk_len, data_seed, dtype)


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option(help="output folder: OUT/<hookpoint>/seed<N>/ per SAE")],
    model: SubjectModelOption = "smollm2",
    hookpoint: HookpointsOption = None,
    dataset: DatasetOption = "embedded",
    arch: str = typer.Option("topk", help="SAE architecture: topk, batchtopk, relu, jumprelu"),
    latents: int = typer.Option(4608, help="latents per SAE"),
    k: int = typer.Option(32, help="active latents per token (topk, batchtopk)"),
    seeds: str = typer.Option("0", help="comma-separated seeds, all trained in one pass"),
    tokens: int | None = typer.Option(None, help="distinct dataset tokens to use (default all)"),
    epochs: int = typer.Option(1, help="passes over those tokens"),
    batch_tokens: int = typer.Option(1024, help="tokens per optimizer step"),
    lr: float | None = typer.Option(None, help="Adam learning rate (default 1e-3/sqrt(n/2^14))"),
    l1_coefficient: float | None = typer.Option(None, help="relu: L1 penalty weight"),
    sparsity_coefficient: float | None = typer.Option(None, help="jumprelu: L0 penalty weight"),
    dead_tokens: int = typer.Option(200_000, help="tokens without firing before a latent is dead"),
    chunk_len: int = typer.Option(256, help="tokens per model forward sequence"),
    data_seed: int = typer.Option(0, help="seed of the data order"),
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
) -> None:
    """Train SAEs of several seeds in one pass; Ctrl-C checkpoints, rerunning resumes."""
    from sae.architectures import SaeConfig
    from sae.train import TrainConfig, TrainProgress, config_from_cache, train
    from service.settings import get_settings

    if from_cache is not None and cache_activations is not None:
        raise UserError("give either --from-cache or --cache-activations, not both")
    hookpoints = _comma_names(hookpoint)
    fields = {
        "sae": SaeConfig(
            architecture=arch,
            n_latents=latents,
            k=k,
            l1_coefficient=l1_coefficient,
            sparsity_coefficient=sparsity_coefficient,
        ),
        "seeds": _comma_ints(seeds, "--seeds"),
        "epochs": epochs,
        "batch_tokens": batch_tokens,
        "lr": lr,
        "dead_tokens": dead_tokens,
        **({"hookpoints": hookpoints} if hookpoints else {}),
    }
    if cache_activations is not None:
        names = hookpoints or ["model.layers.6.mlp"]
        _build_activation_cache(
            cache_activations, model, names, dataset, tokens, chunk_len, data_seed, cache_dtype
        )
        from_cache = cache_activations
    if from_cache is not None:
        config = config_from_cache(from_cache, **fields)
    else:
        config = TrainConfig.model_validate(
            {"model": model, "dataset": dataset, "max_tokens": tokens, "chunk_len": chunk_len}
            | {"data_seed": data_seed, **fields}
        )

    with token_progress("training", console) as update:

        def on_progress(state: TrainProgress) -> None:
            status = ""
            if state.fvu == state.fvu:  # not nan: something has been logged
                status = f"FVU {state.fvu:.3f}  L0 {state.l0:.1f}  dead {state.dead_fraction:.1%}"
            update(state.tokens, state.total_tokens, status)

        seconds = 60 * checkpoint_minutes
        result = train(config, out, get_settings().home, on_progress, checkpoint_seconds=seconds)
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


@app.command("report")
def report_command(
    run: str = typer.Option(..., help="name of the run to report on"),
    html: Annotated[
        Path | None, typer.Option("--html", help="also write a self-contained HTML report here")
    ] = None,
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    agreement: bool = typer.Option(
        True, help="compare explanations across seeds (loads the embedding model)"
    ),
    good_threshold: float = typer.Option(0.8, help="a latent scores well above this"),
    seed: int = typer.Option(0, help="seed of the bootstrap and of random pairs"),
) -> None:
    """Shared vs seed-specific interpretability of a run: tables, statistics, plots."""
    from service.report import ReportConfig, check_html_path, make_report, write_html
    from service.report.terminal import headline
    from service.settings import get_settings
    from service.store.engine import open_store

    if html is not None:
        check_html_path(html)
    config = ReportConfig(good_threshold=good_threshold, seed=seed, agreement=agreement)
    store = open_store(get_settings().db)
    try:
        with err_console.status(f"computing the report on run {run}"):
            result = make_report(store, run, config)
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
) -> None:
    """One latent: explanations, scores, partners in other seeds, top contexts."""
    from service.latent_examples import load_tokenizer
    from service.settings import get_settings
    from service.show import render_latent, show_latent
    from service.store.engine import open_store

    settings = get_settings()
    store = open_store(settings.db)
    try:
        view = show_latent(
            store, sae, latent, lambda model: load_tokenizer(model, settings.home), contexts
        )
    finally:
        store.dispose()
    for part in render_latent(view):
        console.print(part)


@app.command("run")
def run_command(
    study: Annotated[Path, typer.Argument(help="study config (TOML), e.g. examples/demo.toml")],
) -> None:
    """The whole study from one config: train, match, cache, queue, score, report.

    Every stage whose outputs are already there is skipped, so rerunning resumes."""
    from service.report.terminal import headline
    from service.settings import get_settings
    from service.study import load_study, run_study

    settings = get_settings()
    config = load_study(study)
    result = run_study(config, settings.db, settings.home, console)
    for part in headline(result.report):
        console.print(part)
