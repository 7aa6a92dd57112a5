"""The `autointerp` command line: parses arguments, calls library functions, prints results."""

import sys

import typer
from rich.console import Console
from rich.table import Table

from sae.errors import UserError

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
        err_console.print(f"[bold red]error:[/] {error}", highlight=False)
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
