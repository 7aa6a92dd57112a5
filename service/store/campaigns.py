"""Scoring campaigns in the store: creating one for a resolved score config and an LLM,
choosing the one a reader asked for (or the newest with results), and listing them.

A campaign is what keeps results comparable: every job, explanation, score and LLM call
names one, and no reader mixes two. Its key hashes the resolved config and the LLM's
identity (backend and served model name), so queueing the same latents under the same
config and LLM again finds the same campaign and adds no job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from sae.errors import UserError
from service.store.models import JOB_STATES, Campaign, Job, Latent, Sae, Score


@dataclass(frozen=True)
class CampaignLLM:
    """Who explains and scores in a campaign: `backend` and `model` are its identity, `urls`
    (or a local path) are recorded for the record only."""

    backend: str
    model: str
    urls: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "urls": list(self.urls)}


def campaign_key(config: Mapping[str, Any], llm: CampaignLLM | None) -> str:
    identity = {
        "config": config,
        "llm": None if llm is None else {"backend": llm.backend, "model": llm.model},
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def get_or_create_campaign(
    session: Session, config: Mapping[str, Any], llm: CampaignLLM | None
) -> Campaign:
    """The campaign of `config` (already resolved: every field present) and `llm` (None when
    the config asks no LLM), created in the caller's session if new."""
    key = campaign_key(config, llm)
    campaign = session.scalar(select(Campaign).where(Campaign.key == key))
    if campaign is None:
        campaign = Campaign(
            key=key,
            config=dict(config),
            llm_backend=None if llm is None else llm.backend,
            llm_model=None if llm is None else llm.model,
            llm=None if llm is None else llm.record(),
        )
        session.add(campaign)
        session.flush()
    return campaign


def served_by(backend: str, model: str) -> Any:
    """The condition on `Campaign` that a worker with this LLM can work for: campaigns of
    that LLM, and those that ask none."""
    return or_(
        Campaign.llm_model.is_(None),
        and_(Campaign.llm_backend == backend, Campaign.llm_model == model),
    )


def describe(campaign: Campaign) -> str:
    """One line naming a campaign: its id, LLM and what it ran."""
    config = campaign.config or {}
    if campaign.llm_model is None:
        who = "no LLM" if not (campaign.llm or {}).get("legacy") else "LLM not recorded"
    else:
        who = f"{campaign.llm_model} ({campaign.llm_backend or 'backend not recorded'})"
    parts = [f"campaign {campaign.id}", who]
    for name in ("explainers", "scorers"):
        if config.get(name):
            parts.append(f"{name} {', '.join(config[name])}")
    if not config:
        parts.append("config not recorded")
    return " · ".join(parts)


def _in_run(run_id: int | None) -> Any:
    if run_id is None:
        return Score.id.is_not(None)
    return Score.latent_id.in_(
        select(Latent.id).join(Sae, Sae.id == Latent.sae_id).where(Sae.run_id == run_id)
    )


def get_campaign(session: Session, campaign_id: int) -> Campaign:
    """Campaign `campaign_id`; a user error naming the fix when there is none."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise UserError(f"no campaign {campaign_id}; `autointerp campaigns` lists the stored ones")
    return campaign


def campaign_for_run(
    session: Session, campaign_id: int | None, run_id: int | None
) -> Campaign | None:
    """Campaign `campaign_id`, or (None) the newest one with scores of the run's latents (of
    any run when `run_id` is None); None when nothing is scored yet."""
    if campaign_id is not None:
        return get_campaign(session, campaign_id)
    newest = session.scalar(
        select(func.max(Score.campaign_id)).where(Score.campaign_id.is_not(None), _in_run(run_id))
    )
    return None if newest is None else session.get(Campaign, newest)


@dataclass
class CampaignSummary:
    campaign: Campaign
    jobs: dict[str, int]
    latents_scored: int

    @property
    def state(self) -> str:
        if self.jobs["queued"] or self.jobs["leased"]:
            return "running" if self.jobs["leased"] or self.jobs["done"] else "queued"
        if not any(self.jobs.values()):
            return "empty"
        return "finished with failures" if self.jobs["failed"] else "finished"


def list_campaigns(session: Session) -> list[CampaignSummary]:
    """Every campaign, oldest first, with its jobs by state and its scored latents."""
    jobs: dict[int, dict[str, int]] = {}
    for campaign_id, state, count in session.execute(
        select(Job.campaign_id, Job.state, func.count()).group_by(Job.campaign_id, Job.state)
    ):
        jobs.setdefault(campaign_id, dict.fromkeys(JOB_STATES, 0))[state] = count
    scored = dict(
        session.execute(
            select(Score.campaign_id, func.count(func.distinct(Score.latent_id))).group_by(
                Score.campaign_id
            )
        ).all()
    )
    return [
        CampaignSummary(
            campaign,
            jobs.get(campaign.id, dict.fromkeys(JOB_STATES, 0)),
            int(scored.get(campaign.id, 0)),
        )
        for campaign in session.scalars(select(Campaign).order_by(Campaign.id))
    ]
