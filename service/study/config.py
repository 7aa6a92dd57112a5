"""The study file: one TOML file whose sections are the stages' own configs.

`[train]` is `sae.train.TrainConfig`, `[match]` `sae.matching.MatchConfig`, `[cache]`
`sae.latent_stats.CacheConfig`, `[queue]` `QueueConfig`, `[score]` `ScoringConfig` and
`[report]` `ReportConfig` (both from `service.config`), key for key: a key the stage's
config does not know is an error, and a key left out takes that config's default.
`[import_saes]` (`sae.checkpoint_import.ImportConfig`) takes the place of `[train]` for SAEs
trained elsewhere; a study has one or the other.

`random_model_seed`, a key of the study itself, adds the random-model control: the same
study again on the subject model with its weights re-initialised under that seed, as a run
of its own (`service.study.run`). `[survey]` (`SurveyConfig`) adds a second campaign of
LLM-free explainer/scorer pairs on many more latents.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae.checkpoint_import import ImportConfig
from sae.errors import UserError
from sae.latent_stats import CacheConfig
from sae.matching import MatchConfig
from sae.model_spec import random_model_spec
from sae.train import TrainConfig
from service.config import QueueConfig, ReportConfig, ScoringConfig, SurveyConfig
from service.scoring.pipeline import needs_llm


class StudyConfig(BaseModel):
    """One study; every section and key is optional but `name` and `out`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="run name in the store")
    out: Path = Field(description="folder for checkpoints, matchings and the activation cache")
    random_model_seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**64,
        description="also run the study on the subject model with every weight re-initialised "
        "under this seed (same architecture, tokenizer, data, seeds and configs), as the run "
        "NAME-random, the baseline the report sets the scores beside; doubles train, cache "
        "and score (default: no control)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    import_saes: ImportConfig | None = Field(
        default=None, description="SAEs trained elsewhere, recorded instead of training"
    )
    match: MatchConfig = Field(default_factory=MatchConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    score: ScoringConfig = Field(default_factory=ScoringConfig)
    survey: SurveyConfig | None = Field(
        default=None,
        description="LLM-free pairs on many more latents, as a second campaign (default: none)",
    )
    report: ReportConfig = Field(default_factory=ReportConfig)


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
    if study.import_saes is not None and "train" in study.model_fields_set:
        raise UserError(
            f"{path}: [train] and [import_saes] both given; a study trains its SAEs or imports "
            "them, keep one"
        )
    if study.random_model_seed is not None and study.import_saes is not None:
        raise UserError(
            f"{path}: random_model_seed needs [train]: SAEs imported from elsewhere cannot be "
            "trained again on a re-initialised model; remove the key or train the SAEs here"
        )
    if study.random_model_seed is not None:
        random_model_spec(study.train.model, study.random_model_seed)  # a bad model: one line
    if study.survey is not None:
        survey = study.survey.job(study.score.job)
        if needs_llm(survey):
            raise UserError(
                f"{path}: [survey] lists an explainer or scorer that needs the LLM; the survey "
                "runs only LLM-free ones (explainer token_baseline, scorer embedding): remove it"
            )
        if survey == study.score.job:
            raise UserError(
                f"{path}: [survey] runs the same explainers and scorers as [score.job], so it "
                "is the same campaign: remove [survey] and raise [queue] latents instead"
            )
    base = path.parent
    study.out = base / study.out
    if study.import_saes is not None:
        study.import_saes.folders = [str(base / folder) for folder in study.import_saes.folders]
    if study.report.html is not None:
        study.report.html = base / study.report.html
    return study
