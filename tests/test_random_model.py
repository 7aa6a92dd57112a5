"""The random-model control: model specs `NAME@random:SEED`, the study that trains, caches,
scores and reports the same seeds on the re-initialised model, and the report's comparison of
the trained model's scores with the random model's on a generated store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from report_fixtures import SEEDS, populate
from rich.console import Console
from sqlalchemy import func, select
from test_report import FAST, check_every_number_labelled
from tiny_models import TINY_GPT2_HOOKPOINT, save_tiny_gpt2

from sae.errors import UserError
from sae.model_spec import describe_model, parse_model_spec, random_model_spec
from sae.subject_model import load_model, load_tokenizer, resolve_model
from service.report import ReportResult, write_html
from service.report.data import load_random_control, load_run_data
from service.report.random_model import BETTER, NO_BETTER
from service.report.report import build_report
from service.report.terminal import headline
from service.store.engine import Store, open_store
from service.store.models import Job, Latent, MatchPair, Run, Sae, Score
from service.study import load_study, run_study


def test_model_specs_parse_in_one_place():
    assert parse_model_spec("smollm2").init_seed is None
    spec = parse_model_spec("smollm2@random:1234")
    assert (spec.name, spec.init_seed, str(spec)) == ("smollm2", 1234, "smollm2@random:1234")
    assert parse_model_spec("/models/my@v2").name == "/models/my@v2"  # '@' alone is a name
    assert random_model_spec("org/model", 7) == "org/model@random:7"
    assert describe_model("smollm2@random:1234") == (
        "smollm2, weights re-initialised (seed 1234), not trained"
    )
    assert describe_model("smollm2") == "smollm2"
    for bad in (
        "smollm2@random",
        "smollm2@random:",
        "smollm2@random:x",
        "smollm2@random:-1",
        "@random:3",
        "smollm2@random:1@random:2",
        f"smollm2@random:{2**64}",
    ):
        with pytest.raises(UserError) as error:
            parse_model_spec(bad)
        assert "\n" not in str(error.value) and "NAME@random:SEED" in str(error.value)
    with pytest.raises(UserError, match="already re-initialised"):
        random_model_spec("smollm2@random:1", 2)
    with pytest.raises(UserError, match="out of range"):
        random_model_spec("smollm2", -1)
    with pytest.raises(UserError, match="has no folder"):
        resolve_model("smollm2@random:1", Path("/nonexistent"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny", home)


def test_random_model_weights_are_fresh_and_reproducible(tiny_gpt2: Path, home: Path):
    trained, _ = load_model(str(tiny_gpt2), home)
    first, tokenizer = load_model(f"{tiny_gpt2}@random:1234", home)
    state = torch.random.get_rng_state()
    again, _ = load_model(f"{tiny_gpt2}@random:1234", home)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator untouched
    other, _ = load_model(f"{tiny_gpt2}@random:99", home)
    weights = [name for name, _ in trained.named_parameters() if name.endswith("weight")]
    matrices = [name for name in weights if trained.get_parameter(name).dim() == 2]
    assert matrices
    for name in weights:
        assert torch.equal(first.get_parameter(name), again.get_parameter(name)), name
    for name in matrices:
        assert not torch.equal(first.get_parameter(name), trained.get_parameter(name)), name
        assert not torch.equal(first.get_parameter(name), other.get_parameter(name)), name
    assert type(first) is type(trained) and first.config.n_layer == trained.config.n_layer
    assert len(tokenizer) == len(load_tokenizer(f"{tiny_gpt2}@random:1234", home))


STUDY = """
name = "tiny"
out = "out"
random_model_seed = 1234

[train]
model = "{model}"
hookpoints = ["{hookpoint}"]
max_tokens = 4096
chunk_len = 64
seeds = [0, 1]
batch_tokens = 256

[train.sae]
n_latents = 32
k = 4

[cache]
tokens = 2048
window = 16
chunk_len = 64
quantile_bins = 2
per_quantile_bin = 2
negatives = 4

[queue]
selection = "sample"
latents = 8

[score.llm]
backend = "transformers"

[score.job]
explainers = ["token_baseline"]
scorers = ["embedding"]
cross_seed = 0
n_explain_top = 4
n_explain_quantile = 2
n_positive = 4
n_negative = 4

[report]
html = "out/report.html"
n_resamples = 200
agreement = false
"""


def test_study_with_a_random_model_control(tmp_path: Path, tiny_gpt2: Path, home: Path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(model=tiny_gpt2, hookpoint=TINY_GPT2_HOOKPOINT))
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    console = Console(record=True, width=200)
    result = run_study(load_study(path), db_url, home, console)
    output = console.export_text()
    assert "train (random model): trained 2 SAEs on" in output
    spec = f"{tiny_gpt2}@random:1234"
    store = open_store(db_url)
    try:
        with store.read_session() as session:
            runs = {run.name: run for run in session.scalars(select(Run))}
            assert runs["tiny"].subject_model == str(tiny_gpt2)
            assert runs["tiny-random"].subject_model == spec
            assert runs["tiny-random"].path == str((tmp_path / "out" / "random-model").resolve())
            for run in runs.values():
                saes = session.scalars(select(Sae).where(Sae.run_id == run.id)).all()
                assert sorted(sae.seed for sae in saes) == [0, 1]
                ids = [sae.id for sae in saes]
                assert (
                    session.scalar(
                        select(func.count())
                        .select_from(MatchPair)
                        .where(MatchPair.sae_a_id.in_(ids))
                    )
                    == 2
                )
                scored = session.scalars(
                    select(Score.campaign_id)
                    .join(Latent, Latent.id == Score.latent_id)
                    .where(Latent.sae_id.in_(ids), Score.control == "own")
                ).all()
                assert len(scored) == 8 and len(set(scored)) == 1
            assert set(session.scalars(select(Job.state))) == {"done"}
            assert len(set(session.scalars(select(Job.campaign_id)))) == 1
            n_scores = session.scalar(select(func.count()).select_from(Score))
    finally:
        store.dispose()
    assert result is not None
    report = result.report.report
    assert report.random_model is not None and report.random_model.run == "tiny-random"
    assert report.random_model.model == describe_model(spec)
    (row,) = report.hookpoints[0].random_model
    assert (row.explainer, row.scorer) == ("token_baseline", "embedding")
    (section,) = report.hookpoints[0].scorers
    assert row.trained.n + sum(section.undefined.values()) == 8
    assert row.random.n + sum(row.random_undefined.values()) == 8
    assert row.by_match_group is not None and row.by_match_group.difference is not None
    assert row.trained.mean is not None and row.random.mean is not None
    text = _headline_text(result.report)
    assert "random-model baseline: run tiny-random" in text and "trained - random" in text
    page = (tmp_path / "out" / "report.html").read_text()
    check_every_number_labelled(page)
    assert "Trained vs random model tested with match groups as the unit" in page
    assert "weights re-initialised (seed 1234)" in page

    # Rerun: every stage of both runs is found done, nothing is added.
    console = Console(record=True, width=200)
    run_study(load_study(path), db_url, home, console)
    output = console.export_text()
    for stage in ("train (random model): already trained", "match (random model): already stored"):
        assert stage in output
    assert "cache (random model): already stored" in output
    store = open_store(db_url)
    try:
        with store.read_session() as session:
            assert session.scalar(select(func.count()).select_from(Score)) == n_scores
    finally:
        store.dispose()

    # Another seed for the same study would mix two random models under one run name.
    path.write_text(path.read_text().replace("random_model_seed = 1234", "random_model_seed = 5"))
    with pytest.raises(UserError, match="trained on .*@random:1234, not .*@random:5"):
        run_study(load_study(path), db_url, home, Console(record=True))


def test_study_key_is_checked(tmp_path: Path):
    path = tmp_path / "study.toml"
    path.write_text('name = "x"\nout = "o"\nrandom_model_seed = -1\n')
    with pytest.raises(UserError, match="random_model_seed"):
        load_study(path)
    path.write_text(
        'name = "x"\nout = "o"\nrandom_model_seed = 1\n[import_saes]\nfolders = ["a"]\n'
    )
    with pytest.raises(UserError, match="random_model_seed needs \\[train\\]"):
        load_study(path)
    path.write_text('name = "x"\nout = "o"\nrandom_model_seed = 1\n[train]\nmodel = "m@random:"\n')
    with pytest.raises(UserError, match="bad model spec"):
        load_study(path)


def _headline_text(result: ReportResult) -> str:
    console = Console(record=True, width=250)
    for part in headline(result.report):
        console.print(part)
    return console.export_text()


def _report(store: Store, run: str) -> ReportResult:
    data = load_run_data(store, run)
    control = load_random_control(store, data)
    return ReportResult(build_report(data, FAST, None, control), data)


def test_report_sets_scores_beside_the_random_model(store: Store, tmp_path: Path):
    study = populate(store)
    populate(store, "study-random", subject_model="smollm2@random:1234", detection_offset=-0.3)
    result = _report(store, "study")
    report = result.report
    assert report.random_model is not None
    assert report.random_model.run == "study-random"
    assert "re-initialised (seed 1234)" in report.random_model.model
    assert not any("random-model" in line for line in report.missing)
    rows = {row.scorer: row for row in report.hookpoints[0].random_model}
    assert set(rows) == {"detection", "fuzzing"}
    detection = rows["detection"]
    trained = np.concatenate([study.own[("llm", "detection")][seed] for seed in SEEDS])
    assert detection.trained.n == np.isfinite(trained).sum()
    assert detection.trained.mean == pytest.approx(np.nanmean(trained))
    assert detection.random.mean == pytest.approx(np.nanmean(trained) - 0.3)
    assert detection.random.ci_low is not None and detection.random.ci_high is not None
    test = detection.by_match_group
    assert test is not None and test.difference == pytest.approx(0.3)
    assert test.ci_low is not None and test.ci_low > 0 and test.p_value is not None
    assert test.p_holm is not None and test.p_holm >= test.p_value
    assert detection.frequency_adjusted is not None
    assert detection.verdict == BETTER
    # Shifted down to about the shuffled scores, the random model fails its own control.
    assert detection.random_control is not None
    assert detection.random_control.informative is False
    assert report.random_model.n_tests == 4

    text = _headline_text(result)
    assert "trained model vs random-model baseline" in text and BETTER in text
    assert "not shown: scorer failed its control" in text
    assert "llm / detection on the random model: own explanations do not beat shuffled" in text
    path = tmp_path / "report.html"
    write_html(result, path)
    parser = check_every_number_labelled(path.read_text())
    cells = {(column, label): value for column, label, value in parser.cells}
    assert cells[("random model mean", "llm / detection")] == f"{detection.random.mean:.3f}"
    assert cells[("trained model mean", "llm / detection")] == f"{detection.trained.mean:.3f}"
    tested = "llm / detection, match groups"
    assert cells[("trained minus random", tested)] == f"{test.difference:.3f}"
    assert cells[("verdict", tested)] == BETTER
    assert cells[("value", "random-model baseline")].startswith("study-random: smollm2")

    # A control that scores the same: its interval holds zero, and the report says so.
    populate(store, "same")
    populate(store, "same-random", subject_model="smollm2@random:5")
    same = _report(store, "same").report.hookpoints[0].random_model
    assert [row.verdict for row in same if row.scorer == "detection"] == [NO_BETTER]
    assert NO_BETTER in _headline_text(_report(store, "same"))


def test_report_names_a_missing_or_unscored_baseline(store: Store):
    populate(store, "alone")
    assert any(
        line.startswith("no random-model baseline")
        for line in _report(store, "alone").report.missing
    )
    # A run named like a control that is not one (trained weights) is not taken for one.
    populate(store, "alone-random")
    assert _report(store, "alone").report.random_model is None
    populate(store, "waiting")
    populate(store, "waiting-random", scored=False, subject_model="smollm2@random:1")
    report = _report(store, "waiting").report
    assert report.random_model is not None
    assert all(row.by_match_group is None for row in report.hookpoints[0].random_model)
    assert any("`waiting-random` has no scores" in line for line in report.missing)
    # The control's own report says what its model is.
    text = _headline_text(_report(store, "waiting-random"))
    assert "weights re-initialised (seed 1), not trained" in text
