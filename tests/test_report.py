"""`autointerp report` on a generated study written into real SQLite and PostgreSQL stores:
the numbers against what was written, the HTML page (every number labelled), the JSON, the
terminal headline, and a run with nothing scored yet."""

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import GOOD_SPECIFIC, N_LATENTS, N_SHARED, SEEDS, populate
from rich.console import Console
from sqlalchemy import select, update

from service.config import ReportConfig
from service.report import ReportResult, write_html
from service.report.data import ScoreData, load_run_data
from service.report.html import render_html
from service.report.plots import hookpoint_plots
from service.report.report import build_report
from service.report.terminal import headline
from service.scorers.embedder import Embedder, load_embedder
from service.store.engine import Store
from service.store.models import Latent, Run
from service.store.runs import register_run, register_sae

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
FAST = ReportConfig(n_resamples=300)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return load_embedder()


def make(store: Store, run: str, embedder: Embedder | None) -> ReportResult:
    data = load_run_data(store, run)
    return ReportResult(build_report(data, FAST, embedder.embed if embedder else None), data)


def test_report_numbers_match_the_study(store: Store, minilm: Embedder):
    study = populate(store)
    result = make(store, "study", minilm)
    report = result.report
    assert report.missing[0] == "no example windows: run `autointerp cache --run study`"
    assert report.missing[1].startswith("no random-model baseline")
    assert len(report.missing) == 2
    (group,) = report.hookpoints
    assert group.seeds == list(SEEDS) and group.firing_statistics

    # Every ordered pair, the ones not stored inverted from the stored direction.
    assert [(p.seed_a, p.seed_b) for p in group.pairs] == [
        (a, b) for a in SEEDS for b in SEEDS if a != b
    ]
    for pair in group.pairs:
        assert (pair.shared, pair.seed_specific) == (N_SHARED, N_LATENTS - N_SHARED)
        assert pair.derived == ((pair.seed_a, pair.seed_b) in {(1, 0), (2, 1), (0, 2)})
        # Latents 30-39 have another encoder partner.
        assert pair.encoder_decoder_agreement == pytest.approx(30 / 40)
    presence = {row.m: row.mean_latents for row in group.presence or []}
    assert presence == {1: N_LATENTS - N_SHARED, 2: 0, 3: N_SHARED}

    sections = {(s.explainer, s.scorer): s for s in group.scorers}
    detection, fuzzing = sections[("llm", "detection")], sections[("llm", "fuzzing")]
    assert detection.informative is True and fuzzing.informative is False

    own = np.concatenate([study.own[("llm", "detection")][seed] for seed in SEEDS])
    shared_mask = np.tile(np.arange(N_LATENTS) < N_SHARED, len(SEEDS))
    comparison = detection.shared_vs_specific
    assert comparison is not None
    assert comparison.shared.n == N_SHARED * len(SEEDS)
    assert comparison.seed_specific.n == (N_LATENTS - N_SHARED - 4) * len(SEEDS)
    assert comparison.shared.mean == pytest.approx(np.nanmean(own[shared_mask]))
    assert comparison.seed_specific.median == pytest.approx(np.nanmedian(own[~shared_mask]))
    # Latents of all seeds pooled get no test: a shared latent's copies are not independent.
    assert comparison.p_value is None
    ci = comparison.shared
    assert ci.ci_low is not None and ci.ci_high is not None
    assert ci.ci_low < ci.mean < ci.ci_high  # type: ignore[operator]

    good = detection.good_but_specific
    assert good is not None
    assert good.n_good_seed_specific == len(GOOD_SPECIFIC) * len(SEEDS)
    assert good.n_good == (N_SHARED + len(GOOD_SPECIFIC)) * len(SEEDS)
    # Shared latents fire more and score higher in the study.
    assert detection.vs_firing_frequency.rho is not None and detection.vs_firing_frequency.rho > 0
    similarity = detection.vs_matched_similarity
    assert similarity is not None and similarity.rho is not None and similarity.rho > 0.5
    assert detection.by_presence is not None
    assert [s.n for s in detection.by_presence] == [16 * 3, 0, 20 * 3]
    assert detection.failed_answer_rate == pytest.approx(1 / 20)

    # The test's unit is the match group: each shared latent with its partners in the other
    # two seeds is one group (20), each scored seed-specific latent one of its own (16 x 3).
    test = detection.by_match_group
    assert test is not None and test.n_permutations == FAST.n_resamples
    assert (test.n_shared, test.n_seed_specific, test.n_strata) == (N_SHARED, 16 * 3, 1)
    by_group = np.nanmean(own[shared_mask].reshape(len(SEEDS), N_SHARED), axis=0)
    assert test.difference == pytest.approx(by_group.mean() - np.nanmean(own[~shared_mask]))
    assert test.ci_low is not None and test.ci_high is not None
    assert test.ci_low < test.difference < test.ci_high
    # Every permutation is less extreme: the smallest p-value that many permutations allow.
    assert test.p_value == pytest.approx(1 / (FAST.n_resamples + 1))
    # Holm over the four tests (two per scorer): the smallest p-value times four.
    assert result.report.n_sharing_tests == 4
    assert test.p_holm == pytest.approx(4 * test.p_value)
    # Shared latents fire 400-1000 times, seed-specific ones 1-300: only the frequency bin
    # that straddles the boundary holds both, and the adjusted difference rests on it alone.
    adjusted = detection.frequency_adjusted
    assert adjusted is not None and adjusted.n_strata == 1
    assert 0 < adjusted.n_shared < N_SHARED and 0 < adjusted.n_seed_specific < 16 * 3
    assert adjusted.p_holm is not None and adjusted.p_value is not None
    assert adjusted.p_holm >= adjusted.p_value
    assert [entry.seed for entry in detection.per_seed] == list(SEEDS)
    assert all(entry.comparison.shared.n == N_SHARED for entry in detection.per_seed)

    # Explanations of shared latents are identical across seeds; seed-specific ones differ.
    assert len(group.agreement) == 3
    for section in group.agreement:
        assert section.matched.n == N_LATENTS
        assert section.matched_shared.mean == pytest.approx(1.0, abs=1e-4)
        assert section.matched_seed_specific.mean is not None
        assert section.matched_seed_specific.mean < 0.9
        assert section.random.mean is not None and section.random.mean < 0.6
        assert section.p_value is not None and section.p_value < 1e-3

    (cross,) = group.cross_seed
    assert cross.cross_seed.n == len(study.cross_seed)
    assert cross.cross_seed.mean == pytest.approx(np.mean(study.cross_seed))
    assert cross.gap.mean == pytest.approx(0.05)
    # Every cross-seed score is of a latent shared with the explanation's seed.
    by_sharing = cross.cross_seed_shared_vs_specific
    assert by_sharing is not None
    assert (by_sharing.shared.n, by_sharing.seed_specific.n) == (len(study.cross_seed), 0)
    assert by_sharing.shared.mean == pytest.approx(np.mean(study.cross_seed))


def test_without_firing_statistics_the_frequency_adjusted_test_is_absent(store: Store):
    populate(store)
    with store.session() as session, session.begin():
        session.execute(update(Latent).values(firing_frequency=None, firing_count=None))
    report = make(store, "study", None).report
    detection = report.hookpoints[0].scorers[0]
    assert detection.by_match_group is not None and detection.by_match_group.p_value is not None
    assert detection.frequency_adjusted is None
    assert report.n_sharing_tests == 2


def test_dense_scores_keep_the_newest_per_latent():
    rows = ScoreData(
        "llm",
        "detection",
        "shuffled",
        "balanced_accuracy",
        sae_id=np.array([1, 1, 1]),
        latent_index=np.array([2, 0, 2]),
        value=np.array([0.1, 0.5, 0.9]),
        source_sae_id=np.array([1, 1, 1]),
        source_index=np.array([5, 6, 7]),
        n_examples=np.array([20, 20, 20]),
        n_failed=np.array([0, 0, 0]),
        undefined_reason=np.array(["", "", ""], dtype=object),
    )
    np.testing.assert_array_equal(rows.dense(3), [0.5, np.nan, 0.9])


class TableParser(HTMLParser):
    """Collects every text node with its enclosing tags and, for table cells, the row and
    column headers that label it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.texts: list[tuple[list[str], str]] = []
        self.cells: list[tuple[str, str, str]] = []  # (column header, row header, text)
        self.headers: list[str] = []
        self.row: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("img", "meta", "br"):  # void elements have no end tag
            self.stack.append(tag)
        if tag == "table":
            self.headers = []
        if tag == "thead":
            self.in_head = True
        if tag == "tr":
            self.row = []
        if tag in ("th", "td"):
            self.row.append((tag, ""))
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop() != tag:
            pass
        if tag == "thead":
            self.in_head = False
        if tag == "tr":
            if self.in_head:
                self.headers = [text for _, text in self.row]
            else:
                label = self.row[0][1] if self.row and self.row[0][0] == "th" else ""
                for position, (kind, text) in enumerate(self.row):
                    if kind == "td":
                        column = self.headers[position] if position < len(self.headers) else ""
                        self.cells.append((column, label, text))

    def handle_data(self, data: str) -> None:
        if not data.strip():
            return
        self.texts.append((list(self.stack), data))
        if self.row and self.stack and self.stack[-1] in ("th", "td"):
            kind, text = self.row[-1]
            self.row[-1] = (kind, text + data)


NUMBER = re.compile(r"\d")


def check_every_number_labelled(page: str) -> TableParser:
    parser = TableParser()
    parser.feed(page)
    for stack, text in parser.texts:
        if not NUMBER.search(text) or "style" in stack or "title" in stack:
            continue
        # Identifiers and labels may carry digits; numbers live in table cells only.
        assert {"td", "th", "code"} & set(stack), f"unlabelled number in {stack}: {text!r}"
    for column, label, text in parser.cells:
        if NUMBER.search(text):
            assert column.strip() and label.strip(), (column, label, text)
    return parser


def test_html_report_renders_and_labels_every_number(
    store: Store, minilm: Embedder, tmp_path: Path
):
    populate(store)
    result = make(store, "study", minilm)
    path = tmp_path / "report.html"
    write_html(result, path)
    page = path.read_text()
    parser = check_every_number_labelled(page)
    # Three figures, embedded.
    assert len(parser.images) == 3
    assert all(src.startswith("data:image/png;base64,iVBOR") for src in parser.images)
    cells = {(column, label): text for column, label, text in parser.cells}
    detection = result.report.hookpoints[0].scorers[0]
    assert detection.scorer == "detection"
    comparison = detection.shared_vs_specific
    assert comparison is not None and comparison.shared.mean is not None
    assert cells[("shared mean", "llm / detection")] == f"{comparison.shared.mean:.3f}"
    assert cells[("shared (decoder and encoder)", "seed 0 into seed 1")] == str(N_SHARED)
    test = detection.by_match_group
    assert test is not None and test.p_holm is not None
    tested = "llm / detection, match groups"
    assert cells[("shared groups (in strata with both)", tested)] == str(N_SHARED)
    holm_column = "p-value, Holm-adjusted over the report's shared vs seed-specific tests"
    assert cells[(holm_column, tested)] == f"{test.p_holm:.3g}"
    assert ("p-value", "llm / detection, frequency-adjusted") in cells
    assert cells[("shared latents", "llm / detection, seed 1")] == str(N_SHARED)
    assert cells[("mean latents", "present in exactly 3 of the SAEs")] == f"{N_SHARED:.1f}"
    # The uninformative scorer's comparison is a plain statement, not numbers.
    assert ("shared mean", "llm / fuzzing") not in cells
    fuzzing_cells = [text for column, label, text in parser.cells if label == "llm / fuzzing"]
    assert any("uninformative" in text for text in fuzzing_cells)
    assert cells[("verdict", "llm / fuzzing")] == "uninformative"


def test_json_and_terminal_headline(store: Store, minilm: Embedder):
    populate(store)
    result = make(store, "study", minilm)
    decoded = json.loads(result.report.model_dump_json())
    scorers = decoded["hookpoints"][0]["scorers"]
    assert {s["scorer"]: s["informative"] for s in scorers} == {"detection": True, "fuzzing": False}
    console = Console(record=True, width=200)
    for part in headline(result.report):
        console.print(part)
    text = console.export_text()
    assert "UNINFORMATIVE" in text and "informative (gap" in text
    assert "not shown: scorer failed its control" in text
    assert "match groups as the unit" in text and "p, Holm (4 tests)" in text
    assert "frequency-adjusted, 1 bin" in text
    assert "0 -> 1" in text
    assert "the partner's explanation (other seed) scored on the latent" in text


def test_nothing_scored_yet(store: Store, tmp_path: Path):
    populate(store, scored=False)
    result = make(store, "study", None)
    report = result.report
    (group,) = report.hookpoints
    assert group.scorers == [] and group.agreement == [] and group.cross_seed == []
    assert group.presence is not None
    assert any(line.startswith("no scores") for line in report.missing)
    assert any(line.startswith("no explanations") for line in report.missing)
    path = tmp_path / "empty.html"
    write_html(result, path)
    parser = check_every_number_labelled(path.read_text())
    assert len(parser.images) == 2  # no score distributions without scores
    assert "What is missing" in path.read_text()


def test_run_without_saes_or_matchings(store: Store):
    with store.session() as session, session.begin():
        register_run(
            session,
            "bare",
            subject_model="smollm2",
            hookpoint="h",
            dataset="embedded",
            architecture="topk",
            n_latents=8,
            k=2,
            seeds=[0, 1],
        )
    report = make(store, "bare", None).report
    assert report.hookpoints == []
    assert report.missing == ["no SAEs are registered for run `bare`: train the run first"]
    check_every_number_labelled(render_html(report, {}))
    populate(store, run_name="unmatched", scored=False, matched=False)
    unmatched = make(store, "unmatched", None)
    assert unmatched.report.hookpoints[0].pairs == []
    assert any("no matchings stored" in line for line in unmatched.report.missing)
    assert (
        hookpoint_plots(
            unmatched.data.hookpoints[0], unmatched.data, unmatched.report.hookpoints[0]
        )
        == []
    )


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOINTERP_DB": url, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([AUTOINTERP, *args], capture_output=True, text=True, timeout=300, env=env)


def test_report_cli(tmp_path: Path):
    from service.store.engine import open_store, upgrade

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    populate(store)
    store.dispose()
    out = tmp_path / "out.html"
    result = cli(url, "report", "--run", "study", "--json", "--html", str(out), "--no-agreement")
    assert result.returncode == 0, result.stderr
    decoded = json.loads(result.stdout)
    assert decoded["run"] == "study" and decoded["config"]["agreement"] is False
    assert out.read_text().startswith("<!DOCTYPE html>")
    for args, fragment in (
        (["--run", "nope"], "error: no run named 'nope'"),
        (["--run", "study", "--html", str(tmp_path / "no" / "r.html")], "does not exist"),
    ):
        failed = cli(url, "report", *args)
        assert failed.returncode == 2, failed.stderr
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0], failed.stderr


def test_two_hookpoints_are_reported_apart(store: Store):
    populate(store)
    with store.session() as session, session.begin():
        run = session.scalars(select(Run).where(Run.name == "study")).one()
        for seed in SEEDS:
            register_sae(session, run, seed, n_latents=8, d_in=16, hookpoint="model.layers.9.mlp")
    report = make(store, "study", None).report
    assert [group.hookpoint for group in report.hookpoints] == [
        "model.layers.6.mlp",
        "model.layers.9.mlp",
    ]
    first, second = report.hookpoints
    assert len(first.scorers) == 2 and second.scorers == [] and second.pairs == []
    assert first.scorers[0].failed_answer_rate == pytest.approx(1 / 20)
    assert any("`model.layers.9.mlp`" in line for line in report.missing)
