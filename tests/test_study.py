"""`autointerp run`: a whole study at its smallest size, on the real model and stores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sae.errors import UserError
from service.store.engine import open_store
from service.store.models import CacheVersion, Campaign, Example, Job, MatchPair, Sae, Score
from service.study import load_study

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))

SMALLEST = """
name = "tiny"
out = "out"

[train]
max_tokens = 8192
chunk_len = 128
seeds = [0, 1]
epochs = 2
batch_tokens = 512

[train.sae]
n_latents = 64
k = 4

[cache]
tokens = 4096
window = 16
chunk_len = 128
quantile_bins = 2
per_quantile_bin = 2
negatives = 6

[queue]
selection = "sample"
latents = 6

[score.llm]
backend = "transformers"

[score.job]
explainers = ["token_baseline"]
scorers = ["embedding"]
n_explain_top = 4
n_explain_quantile = 2
n_positive = 4
n_negative = 4

[report]
html = "out/report.html"
"""


def run_study(study: Path, db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AUTOINTERP, "run", str(study)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "AUTOINTERP_DB": db_url},
    )


def test_smallest_study_completes_and_resumes(tmp_path: Path, store_url: str):
    study = tmp_path / "study.toml"
    study.write_text(SMALLEST)
    first = run_study(study, store_url)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "train: trained 2 SAEs" in first.stdout
    assert (tmp_path / "out" / "report.html").is_file()
    # The whole resolved study, every stage's config with its defaults filled in.
    resolved = json.loads((tmp_path / "out" / "study_config.json").read_text())
    assert resolved["train"]["sae"]["n_latents"] == 64
    assert resolved["cache"]["quantile_bins"] == 2 and resolved["score"]["workers"] == 8
    store = open_store(store_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(MatchPair)) == 2
            assert session.scalar(select(func.count()).select_from(Example)) > 0
            jobs = session.scalars(select(Job.state)).all()
            assert jobs and set(jobs) == {"done"}
            controls = set(session.scalars(select(Score.control)).all())
            assert controls == {"own", "shuffled", "cross_seed"}
            n_scores = session.scalar(select(func.count()).select_from(Score))
    finally:
        store.dispose()
    # A second run finds every stage done and adds nothing.
    second = run_study(study, store_url)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "train: already trained" in second.stdout
    assert "match: already stored" in second.stdout
    assert "cache: already stored" in second.stdout
    store = open_store(store_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(Score)) == n_scores
    finally:
        store.dispose()


def test_study_under_torchrun(tmp_path: Path, store_url: str):
    # Two processes train and cache their shares; the main one alone writes the store and
    # goes on to match, queue, score and report.
    study = tmp_path / "study.toml"
    study.write_text(SMALLEST)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone"]
    torchrun += ["--nproc-per-node", "2", "-m", "service.cli", "run", str(study)]
    done = subprocess.run(
        torchrun,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "AUTOINTERP_DB": store_url, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train: trained 2 SAEs") == 1
    assert (tmp_path / "out" / "report.html").is_file()
    store = open_store(store_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(Sae)) == 2
            assert session.scalar(select(func.count()).select_from(CacheVersion)) == 1
            assert session.scalar(select(func.count()).select_from(MatchPair)) == 2
            assert session.scalar(select(func.count()).select_from(Example)) > 0
            jobs = session.scalars(select(Job.state)).all()
            assert jobs and set(jobs) == {"done"}
    finally:
        store.dispose()


# The LLM explains a few latents; the survey scores many more with the LLM-free pair.
SURVEYED = (
    SMALLEST.replace("latents = 6", "latents = 2").replace(
        'explainers = ["token_baseline"]',
        'explainers = ["llm", "token_baseline"]\nexplanation_max_tokens = 8\ncross_seed = 0',
    )
    + "\n[survey]\nlatents = 12\n"
)


def test_survey_scores_more_latents_in_a_campaign_of_its_own(tmp_path: Path):
    study = tmp_path / "study.toml"
    study.write_text(SURVEYED)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    done = run_study(study, url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "survey queue: 12 latents, 12 new jobs" in done.stdout
    assert "survey: the LLM-free pairs on more latents" in done.stdout
    assert (tmp_path / "out" / "report-survey.html").is_file()
    store = open_store(url)
    try:
        with store.read_session() as session:
            campaigns = {c.id: c for c in session.scalars(select(Campaign))}
            assert len(campaigns) == 2
            jobs = session.execute(select(Job.campaign_id, Job.state)).all()
            assert {state for _, state in jobs} == {"done"}
            per_campaign = {
                campaign.llm_model: sum(1 for cid, _ in jobs if cid == campaign.id)
                for campaign in campaigns.values()
            }
            assert per_campaign == {"smollm2": 2, None: 12}
            survey = next(c for c in campaigns.values() if c.llm_model is None)
            assert survey.config["explainers"] == ["token_baseline"]
            assert survey.config["scorers"] == ["embedding"]
            assert survey.config["n_positive"] == 4  # the rest from [score.job]
            own = session.scalars(
                select(Score.scorer).where(Score.campaign_id == survey.id, Score.control == "own")
            ).all()
            assert len(own) == 12 and set(own) == {"embedding"}
    finally:
        store.dispose()


def test_survey_takes_llm_free_pairs_only(tmp_path: Path):
    study = tmp_path / "study.toml"
    study.write_text(SURVEYED.replace("latents = 12", 'latents = 12\nscorers = ["detection"]'))
    with pytest.raises(UserError, match="needs the LLM") as error:
        load_study(study)
    assert "\n" not in str(error.value)
    study.write_text(SMALLEST + "\n[survey]\nlatents = 12\n")
    with pytest.raises(UserError, match="same campaign"):
        load_study(study)


def test_unknown_keys_are_named(tmp_path: Path):
    study = tmp_path / "study.toml"
    study.write_text('name = "x"\nout = "o"\ncolour = 1\n[train]\nlatent = 5\n')
    with pytest.raises(UserError) as error:
        load_study(study)
    assert "colour: unknown key" in str(error.value)
    assert "train.latent: unknown key" in str(error.value)
    result = subprocess.run([AUTOINTERP, "run", str(study)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown key" in result.stderr


def test_missing_study_file(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "missing.toml")
