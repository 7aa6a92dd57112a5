"""CLI options made from the stages' configs, so that a setting has one name, one help text
and one default, whether it is given on the command line or in a study file.

`option(Config, "field")` is a typer option named `--field` (underscores become dashes) with
the field's default and description; `config_from(Config, values)` builds the config from the
options a command received. List fields are repeatable options that also take
comma-separated values; their default (None on the command line) is the config's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from sae.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def option(config: type[BaseModel], field: str, *aliases: str) -> Any:
    """A typer option for `config`'s field `field`, with its default and help."""
    info = config.model_fields[field]
    default = info.get_default(call_default_factory=True)
    help_text = info.description or field.replace("_", " ")
    if isinstance(default, list):
        shown = ",".join(str(value) for value in default) or "none"
        help_text = f"{help_text}; repeat or comma-separate (default {shown})"
        default = None
    name = "--" + field.replace("_", "-")
    if isinstance(default, bool):
        name = f"{name}/--no-{field.replace('_', '-')}"
    return typer.Option(default, name, *aliases, help=help_text)


def comma_separated(values: list[str] | None) -> list[str] | None:
    """A repeatable option's values with comma-separated parts split; None when not given."""
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def comma_integers(values: list[str] | None, option_name: str) -> list[int] | None:
    parts = comma_separated(values)
    if parts is None:
        return None
    try:
        return [int(part) for part in parts]
    except ValueError:
        text = ",".join(values or [])
        raise UserError(
            f"{option_name} '{text}' is not a comma-separated list of integers"
        ) from None


def config_from(config: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """`config` from the options given (None: not given, so the config's default holds); an
    invalid value is one line naming the option."""
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return config.model_validate(given)
    except ValidationError as error:
        problems = "; ".join(
            f"--{'.'.join(str(part) for part in item['loc']).replace('_', '-')}: {item['msg']}"
            for item in error.errors()
        )
        raise UserError(f"invalid option ({problems}); see --help") from None
