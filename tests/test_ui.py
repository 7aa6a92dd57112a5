"""The latent browser (`autointerp ui`): its pages in real headless Chromium against the real
server, its filters and sorts against what the store holds, its read-only store, its errors."""

import math
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from report_fixtures import N_LATENTS, N_SHARED, UNSCORED, Study, explanation_text
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient
from ui_fixtures import AUTOINTERP, PLANTED_TEXT, build_ui_store, chromium_driver, ui_server

from sae.errors import UserError
from sae.subject_model import load_tokenizer
from service.config import UIConfig
from service.ui.app import create_app
from service.ui.data import Cache, ListQuery, list_latents, pick_hookpoint, run_and_saes
from service.ui.readonly import open_readonly


@pytest.fixture
def ui_study(store_url: str, tokenizer: Any) -> tuple[str, Study]:
    return store_url, build_ui_store(store_url, tokenizer)


def _follow(driver: Any, element: Any) -> None:
    """Click a link or a form's button and wait until the next page has replaced this one: a
    click returns as soon as the event is dispatched, before a form's navigation ends."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))


def test_walk_through_the_browser(tmp_path: Path, tokenizer: Any, home: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url = f"sqlite:///{tmp_path / 'store.db'}"
    build_ui_store(url, tokenizer)
    driver = chromium_driver()
    try:
        with ui_server(url, home) as base:
            driver.get(base + "/")
            _follow(driver, driver.find_element(By.LINK_TEXT, "study"))
            assert driver.find_element(By.TAG_NAME, "h1").text == "Run study"
            assert len(driver.find_elements(By.CSS_SELECTOR, "#pairs tr")) == 1 + 3
            assert driver.find_elements(By.CSS_SELECTOR, "svg.plot a circle")
            driver.save_screenshot(str(tmp_path / "run.png"))

            # Latents of seed 0 present in exactly one seed: the seed-specific ones.
            _follow(driver, driver.find_element(By.CSS_SELECTOR, "a[href$='seed=0&presence=1']"))
            assert driver.find_element(By.ID, "total").text.startswith(
                f"{N_LATENTS - N_SHARED} latents"
            )
            driver.save_screenshot(str(tmp_path / "list.png"))
            _follow(driver, driver.find_element(By.LINK_TEXT, "25"))
            assert driver.find_element(By.TAG_NAME, "h1").text == "Seed 0 · latent 25"
            badges = driver.find_elements(By.CSS_SELECTOR, ".partner .badge")
            assert [badge.text for badge in badges] == ["seed-specific"] * 2
            # The planted markup is shown as text and was not run or parsed.
            windows = [w.text for w in driver.find_elements(By.CSS_SELECTOR, ".window")]
            assert any(PLANTED_TEXT in window for window in windows), windows
            assert driver.find_elements(By.TAG_NAME, "script") == []
            assert driver.find_elements(By.CSS_SELECTOR, ".window b") == []
            assert "owned" not in driver.title
            token = driver.find_element(By.CSS_SELECTOR, ".window .tok[title='activation 4.000']")
            # The strongest token is fully coloured (its activation is the window's largest).
            assert "rgb(215, 48, 31)" in token.get_attribute("style")
            driver.save_screenshot(str(tmp_path / "latent.png"))

            _follow(driver, driver.find_element(By.CSS_SELECTOR, "#partner-1 a.partner-link"))
            assert driver.current_url.endswith("/runs/study/latents/1/25")
            assert driver.find_element(By.TAG_NAME, "h1").text == "Seed 1 · latent 25"
            driver.save_screenshot(str(tmp_path / "partner.png"))

            _follow(driver, driver.find_element(By.ID, "nav-latents"))
            Select(driver.find_element(By.ID, "f-seed")).select_by_value("1")
            Select(driver.find_element(By.ID, "f-status")).select_by_value("shared")
            _follow(driver, driver.find_element(By.ID, "f-apply"))
            assert "seed=1" in driver.current_url and "status=shared" in driver.current_url
            assert driver.find_element(By.ID, "total").text.startswith(f"{N_SHARED} latents")
            seeds = driver.find_elements(By.CSS_SELECTOR, "#latents tr td:first-child")
            assert [cell.text for cell in seeds] == ["1"] * N_SHARED
            driver.save_screenshot(str(tmp_path / "filtered.png"))

            _follow(driver, driver.find_element(By.ID, "nav-compare"))
            sides = driver.find_elements(By.CSS_SELECTOR, ".columns h2 a")
            assert [side.text.split(" · ")[0] for side in sides] == ["Seed 0", "Seed 1"]
            _follow(driver, driver.find_element(By.ID, "next"))
            assert "step=1" in driver.current_url
            driver.save_screenshot(str(tmp_path / "compare.png"))

            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert severe == []
    finally:
        driver.quit()


def _client(url: str, home: Path) -> TestClient:
    store = open_readonly(url)
    return TestClient(create_app(store, UIConfig(), lambda model: load_tokenizer(model, home)))


def test_pages_read_what_the_store_holds(ui_study: tuple[str, Study], home: Path):
    client = _client(ui_study[0], home)
    run = client.get("/runs/study").text
    # Seed 0 against seeds 1 and 2 (the latter stored backwards, 2 into 0): 20 shared each.
    assert run.count('<a href="/runs/study/latents?seed=0&amp;status=shared">20</a>') == 2
    page = client.get("/runs/study/latents/1/3").text
    # Own, shuffled and both cross-seed scores of the campaign, each with its source.
    assert "seed 0 latent 3" in page and "seed 2 latent 0" not in page
    assert page.count('class="control-own"') == 2  # detection and fuzzing
    assert page.count('class="control-shuffled"') == 2
    assert page.count('class="control-cross_seed"') == 1
    assert "stale explanation" not in page
    assert "the word &#39;digits&#39; in Python code" in page
    assert "campaign" in page and "explainers llm" in page
    # A latent without windows says so; an undefined number shows as a dash, not 0.
    quiet = client.get("/runs/study/latents/2/38").text
    assert "No windows stored" in quiet
    assert "no scores in this campaign" in quiet
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/runs/study/latents/0/40").status_code == 404
    bad = client.get("/runs/study/latents?freq_min=lots")
    assert bad.status_code == 400 and "freq_min must be a number" in bad.text
    compare = client.get("/runs/study/compare?a=2&b=0&step=0").text
    assert "Seed 2 against seed 0" in compare


def test_list_filters_and_sorts(ui_study: tuple[str, Study]):
    url, study = ui_study
    detection = study.own[("llm", "detection")]
    store = open_readonly(url)
    cache = Cache(8)
    with store.read_session() as session:
        run, saes = run_and_saes(session, "study")
        _, group = pick_hookpoint(saes, None)
        campaign_id = max(session.execute(text("SELECT id FROM campaign")).scalars())

        def rows(**query: Any) -> list[Any]:
            page = list_latents(cache, session, group, campaign_id, ListQuery(**query), 1000)
            assert page.total == len(page.rows)
            return page.rows

        ranked = rows(seed=0, score="llm/detection", sort="score", descending=True)
        values = [row.score for row in ranked]
        scored = [v for v in values if not math.isnan(v)]
        assert scored == sorted(scored, reverse=True)
        assert all(math.isnan(v) for v in values[len(scored) :])  # undefined sort last
        assert {row.index for row in ranked[len(scored) :]} == set(UNSCORED)

        high = rows(seed=2, score="llm/detection", score_min=0.8)
        expected = np.flatnonzero(detection[2] >= 0.8)
        assert sorted(row.index for row in high) == expected.tolist()

        found = rows(seed=1, search="FOOTBALL")
        wanted = [i for i in range(N_LATENTS) if "football" in explanation_text(1, i)]
        assert [row.index for row in found] == wanted and wanted
        assert all(row.explanations for row in found)

        assert [r.index for r in rows(presence=3, seed=0)] == list(range(N_SHARED))
        assert len(rows(status="specific")) == 3 * (N_LATENTS - N_SHARED)
        by_frequency = rows(seed=1, sort="frequency", descending=True)
        frequencies = [row.firing_frequency for row in by_frequency]
        assert frequencies == sorted(frequencies, reverse=True)
    store.dispose()


def test_a_missing_store_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="no store at .*missing.db; create it with"):
        open_readonly(f"sqlite:///{tmp_path / 'missing.db'}")


def test_the_store_is_read_only(ui_study: tuple[str, Study]):
    store = open_readonly(ui_study[0])
    try:
        with pytest.raises(DBAPIError), store.read_session() as session:
            session.execute(text("DELETE FROM explanation"))
            session.commit()
        with store.read_session() as session:
            assert session.execute(text("SELECT count(*) FROM explanation")).scalar()
    finally:
        store.dispose()


def _one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_ui_command_errors(tmp_path: Path, tokenizer: Any):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    build_ui_store(url, tokenizer)
    env = {**os.environ, "AUTOINTERP_DB": url}

    def ui(*args: str) -> subprocess.CompletedProcess[str]:
        command = [AUTOINTERP, "ui", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    _one_line_error(ui("--run", "nope"), "no run named 'nope'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line_error(ui("--port", str(port)), f"cannot listen on 127.0.0.1:{port}")
