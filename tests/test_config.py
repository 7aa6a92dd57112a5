"""One config per stage is the single source of names and defaults: every option of a stage's
command is a field of that stage's config, under the field's name and with its default; the
study file's sections are exactly those configs; and the layout keeps its promises (`sae/`
never imports `service/`, `config/` imports no stage, a stage imports at most two others)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import typer.main
from pydantic import BaseModel

from sae.architectures import SaeConfig
from sae.checkpoint_import import ImportConfig
from sae.latent_stats import CacheConfig
from sae.matching import MatchConfig
from sae.train import TrainConfig
from service.cli import app
from service.config import (
    CalibrationConfig,
    LLMConfig,
    QueueConfig,
    ReportConfig,
    ScoreConfig,
    ScoringConfig,
    SurveyConfig,
)
from service.study import StudyConfig

ROOT = Path(__file__).resolve().parents[1]

# Each stage command, the configs its options come from, and the options that are not
# settings of the stage (where to write, what to print, which run).
COMMANDS: dict[str, tuple[list[type[BaseModel]], set[str]]] = {
    "train": (
        [TrainConfig, SaeConfig],
        {"out", "cache_activations", "from_cache", "cache_dtype", "checkpoint_minutes", "run"},
    ),
    "import-saes": ([ImportConfig], {"run", "folders"}),
    "cache-activations": ([TrainConfig], {"out", "dtype"}),
    "match": ([MatchConfig], {"a", "b", "all_seeds", "run", "json_output", "assignment_out"}),
    "cache": ([CacheConfig], {"run"}),
    "queue": (
        [QueueConfig, ScoreConfig, LLMConfig],
        {"run", "config_file", "retry_failed", "campaign"},
    ),
    "score": ([ScoringConfig, LLMConfig], set()),
    "calibrate": ([CalibrationConfig, LLMConfig], set()),
    "report": ([ReportConfig], {"run", "json_output", "campaign", "compare"}),
}


def command(name: str) -> Any:
    """The click command typer builds for `autointerp NAME`."""
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def field_default(config: type[BaseModel], name: str) -> object:
    return config.model_fields[name].get_default(call_default_factory=True)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_take_their_names_and_defaults_from_the_config(name: str):
    configs, others = COMMANDS[name]
    for param in command(name).params:
        if param.name in others:
            continue
        owners = [config for config in configs if param.name in config.model_fields]
        assert owners, f"`{name}` option {param.name!r} is no field of {configs}"
        default = field_default(owners[0], str(param.name))
        if isinstance(default, list):
            # Repeatable options: not given means the config's list.
            assert param.default is None, f"`{name} --{param.name}` default"
        else:
            assert param.default == default, (
                f"`{name} --{param.name}` defaults to {param.default!r}, "
                f"its config field to {default!r}"
            )
        option_name = "--" + str(param.name).replace("_", "-")
        assert option_name in param.opts, f"`{name}` spells {param.name!r} as {param.opts}"


def test_study_sections_are_the_stage_configs():
    sections = {name: field.annotation for name, field in StudyConfig.model_fields.items()}
    assert sections == {
        "name": str,
        "out": Path,
        "random_model_seed": int | None,
        "train": TrainConfig,
        "import_saes": ImportConfig | None,
        "match": MatchConfig,
        "cache": CacheConfig,
        "queue": QueueConfig,
        "score": ScoringConfig,
        "report": ReportConfig,
        "survey": SurveyConfig | None,
    }


# --- the layout --------------------------------------------------------------------------

# What every stage may use: the configs, the store, the progress bar and the cancel-on-failure
# gather. The explainer and scorer registries are the score stage's plugins, so they count as
# that stage; every other package under service/ (cache, llm, report, ...) is a stage of its
# own. Only `study` and the CLI see them all.
INFRASTRUCTURE = {"config", "store", "progress", "concurrency"}
STAGE_OF = {"explainers": "scoring", "scorers": "scoring"}


def service_imports(path: Path) -> set[str]:
    """The top-level `service` packages a module imports (itself excluded)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "service" and len(parts) > 1:
                names.add(STAGE_OF.get(parts[1], parts[1]))
    return names


def package_of(path: Path) -> str:
    package = path.relative_to(ROOT / "service").parts[0].removesuffix(".py")
    return STAGE_OF.get(package, package)


def test_sae_never_imports_service():
    for path in (ROOT / "sae").rglob("*.py"):
        assert "service" not in {
            name.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom | ast.Import)
            for name in (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
            )
        }, path


def test_config_imports_no_stage():
    for path in (ROOT / "service" / "config").rglob("*.py"):
        assert service_imports(path) <= {"config"}, path


def test_a_stage_imports_at_most_two_other_stages():
    for path in (ROOT / "service").rglob("*.py"):
        package = package_of(path)
        if package in ("cli", "study", "__init__"):
            continue
        others = service_imports(path) - INFRASTRUCTURE - {package}
        assert len(others) <= 2, f"{path.relative_to(ROOT)} imports {sorted(others)}"
