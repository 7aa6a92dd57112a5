"""`autointerp calibrate` on planted latents with the real MiniLM (no LLM needed): the
embedding scorer tells right explanations from wrong ones and is called informative, the
results land in both store backends, and the command prints them as a table."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import select

from service.config import CalibrationConfig
from service.scoring.calibrate import (
    RIGHT,
    WRONG,
    CalibrationEntry,
    calibrate,
    discrimination,
    discrimination_table,
    store_calibration,
)
from service.scoring.pipeline import needs_llm
from service.store.engine import Store
from service.store.models import Calibration, CalibrationScore

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
CONFIG = CalibrationConfig(
    rules=["return", "class"],
    explainers=["token_baseline"],
    scorers=["embedding"],
    n_examples=15,
    min_auc=0.7,
)


@pytest.fixture(scope="module")
def entries(home: Path) -> list[CalibrationEntry]:
    done: list[str] = []
    result = asyncio.run(calibrate(CONFIG, None, home, done.append))
    assert done == CONFIG.rules
    return result


def test_embedding_scorer_tells_right_from_wrong(entries: list[CalibrationEntry]):
    assert not needs_llm(CONFIG.score)
    # Per rule: right, wrong and the token baseline's explanation, scored by embedding.
    assert len(entries) == 2 * 3
    by_kind = {(e.rule, e.kind): e for e in entries}
    for rule in CONFIG.rules:
        right, wrong = by_kind[(rule, RIGHT)], by_kind[(rule, WRONG)]
        assert right.value is not None and wrong.value is not None
        assert right.value > wrong.value
        assert right.n_examples == 30 and right.metric == "auc"
    (row,) = discrimination(entries, CONFIG)
    assert row.scorer == "embedding" and row.n_rules == 2
    assert row.right_mean is not None and row.right_mean >= 0.7
    assert row.wrong_mean is not None and row.wrong_mean <= 0.6
    assert row.auc == 1.0 and row.informative and row.unparsed == 0.0
    assert row.explainer_means["token_baseline"] is not None

    console = Console(record=True, width=200)
    console.print(discrimination_table([row], CONFIG))
    text = console.export_text()
    assert "embedding" in text and "informative" in text and "uninformative" not in text


def test_a_scorer_without_discrimination_is_uninformative(entries: list[CalibrationEntry]):
    # The same numbers with right and wrong swapped: a scorer that prefers wrong explanations.
    swapped = [
        CalibrationEntry(**{**e.__dict__, "kind": {RIGHT: WRONG, WRONG: RIGHT}.get(e.kind, e.kind)})
        for e in entries
    ]
    (row,) = discrimination(swapped, CONFIG)
    assert row.auc == 0.0 and not row.informative


def test_calibration_lands_in_the_store(store: Store, entries: list[CalibrationEntry]):
    calibration_id = store_calibration(store, CONFIG, None, entries)
    with store.read_session() as session:
        calibration = session.get(Calibration, calibration_id)
        assert calibration is not None and calibration.llm_model is None
        assert CalibrationConfig.model_validate(calibration.config) == CONFIG
        rows = session.scalars(
            select(CalibrationScore).where(CalibrationScore.calibration_id == calibration_id)
        ).all()
    assert sorted((r.rule, r.kind, r.value) for r in rows) == sorted(
        (e.rule, e.kind, e.value) for e in entries
    )


def test_calibrate_command_prints_and_stores(tmp_path: Path):
    env = {**os.environ, "AUTOINTERP_DB": f"sqlite:///{tmp_path / 'store.db'}", "COLUMNS": "200"}

    def autointerp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [AUTOINTERP, *args], capture_output=True, text=True, timeout=300, env=env
        )

    assert autointerp("db", "upgrade").returncode == 0
    bad = autointerp("calibrate", "--rules", "return,nonsense", "--scorers", "embedding")
    assert bad.returncode == 2 and "unknown rule 'nonsense'" in bad.stderr
    args = ["--rules", "return,class", "--explainers", "token_baseline", "--scorers", "embedding"]
    result = autointerp("calibrate", *args)
    assert result.returncode == 0, result.stderr
    assert "calibration on planted latents" in result.stdout
    assert "embedding" in result.stdout and "informative" in result.stdout
    assert "stored as calibration 1" in result.stdout
