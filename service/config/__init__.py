"""Every service stage's config, in one low place that imports no stage, so that every stage
reads its config without an import running back up. Each is a pydantic model and the single
source of its names, help and defaults: the study file's sections are these models and the
CLI's options take their names and defaults from them.

The stages that run in `sae/` keep their configs there (`sae.train.TrainConfig`,
`sae.matching.MatchConfig`, `sae.latent_stats.CacheConfig`); the service stages' are here.
"""

from service.config.calibrate import CalibrationConfig
from service.config.llm import API_KEY_ENV, DEFAULT_URL, LLMConfig
from service.config.queue import QueueConfig, Selection
from service.config.report import ReportConfig
from service.config.score import DEFAULT_EMBEDDING_MODEL, ScoreConfig, ScoringConfig, SurveyConfig
from service.config.settings import Settings, get_settings
from service.config.ui import UIConfig

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_URL",
    "CalibrationConfig",
    "LLMConfig",
    "QueueConfig",
    "ReportConfig",
    "ScoreConfig",
    "ScoringConfig",
    "Selection",
    "Settings",
    "SurveyConfig",
    "UIConfig",
    "get_settings",
]
