"""The campaign a score config and an LLM make: the resolved config (every field, so a job
never runs "whatever the defaults are" at run time) and the LLM's identity, or no LLM when
none of the config's explainers and scorers asks one."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import LLMConfig, ScoreConfig
from service.scoring.pipeline import needs_llm
from service.store.campaigns import CampaignLLM, campaign_key, get_or_create_campaign
from service.store.models import Campaign


def campaign_llm(job: ScoreConfig, llm: LLMConfig) -> CampaignLLM | None:
    """Who the campaign's LLM is: None when `job` asks no LLM (any worker may run it)."""
    if not needs_llm(job):
        return None
    urls = tuple(llm.urls) if llm.backend == "openai" else ()
    return CampaignLLM(llm.backend, llm.model, urls)


def resolved(job: ScoreConfig) -> dict[str, Any]:
    return job.model_dump(mode="json")


def open_campaign(session: Session, job: ScoreConfig, llm: LLMConfig) -> Campaign:
    """The campaign of `job` run by `llm`, created in `session` if new."""
    return get_or_create_campaign(session, resolved(job), campaign_llm(job, llm))


def existing_campaign(session: Session, job: ScoreConfig, llm: LLMConfig) -> Campaign | None:
    """The campaign of `job` run by `llm` if one was ever queued; creates nothing."""
    key = campaign_key(resolved(job), campaign_llm(job, llm))
    return session.scalar(select(Campaign).where(Campaign.key == key))
