"""`autointerp run`: the whole study, every stage in order, from one config file."""

from service.study.config import StudyConfig, load_study
from service.study.run import run_study

__all__ = ["StudyConfig", "load_study", "run_study"]
