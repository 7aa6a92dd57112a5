"""The README stays true: every CLI command and every setting is documented there."""

from pathlib import Path

import typer

from service.cli import app
from service.config.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def command_paths(application: typer.Typer, prefix: str = "") -> list[str]:
    paths = []
    for command in application.registered_commands:
        name = command.name or (
            command.callback.__name__.replace("_", "-") if command.callback else ""
        )
        paths.append(f"{prefix}{name}".strip())
    for group in application.registered_groups:
        assert group.typer_instance is not None and group.name
        paths.extend(command_paths(group.typer_instance, f"{prefix}{group.name} "))
    return paths


def test_every_command_is_documented_with_an_example():
    paths = command_paths(app)
    assert {"models", "hookpoints", "demo"} <= set(paths)
    for path in paths:
        assert f"`autointerp {path}" in README, f"README has no row for `autointerp {path}`"
        assert f"\nautointerp {path}" in README, f"README has no example of `autointerp {path}`"


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"AUTOINTERP_{name.upper()}" in README, f"README does not document {name}"
