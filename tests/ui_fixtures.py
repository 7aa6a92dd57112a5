"""A small real store for the latent browser's tests, the browser that drives it, and the
`autointerp ui` server started as a user starts it.

The store is the report tests' generated study (`report_fixtures.populate`: three seeds of 40
latents, 0-19 shared, scores in one campaign) with windows of real SmolLM2 tokens for a few
latents, one of which holds markup that must render as text (`PLANTED_TEXT`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from planted_store import add_planted_windows
from report_fixtures import Study, populate
from sqlalchemy import select

from service.llm.serve import free_port
from service.scoring.planted import PlantedWindow
from service.store.engine import open_store, upgrade
from service.store.models import Latent, Sae

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
PLANTED_TEXT = "<script>document.title='owned'</script><b>bold?</b>"
# (seed, latent index) of the windows written: a shared latent and its partners, and a
# seed-specific one whose windows hold the planted markup.
WINDOWED = [(0, 3), (1, 3), (2, 3), (0, 25), (1, 25), (2, 25)]
MARKUP_LATENT = (0, 25)
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _windows(tokenizer: Any, text: str, n: int) -> list[PlantedWindow]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = []
    for rank in range(n):
        activations = [0.0] * len(ids)
        activations[(rank * 3) % len(ids)] = 4.0 - 0.5 * rank
        activations[(rank * 3 + 1) % len(ids)] = 1.0
        windows.append(PlantedWindow(ids, activations, "top", None, rank))
    windows.append(PlantedWindow(ids, [0.0] * len(ids), "random", None, 0))
    return windows


def build_ui_store(url: str, tokenizer: Any) -> Study:
    """Migrate the store at `url` and write the study and its windows into it."""
    upgrade(url)
    store = open_store(url)
    try:
        study = populate(store)
        with store.session() as session, session.begin():
            for seed, index in WINDOWED:
                latent_id = session.scalar(
                    select(Latent.id)
                    .join(Sae, Sae.id == Latent.sae_id)
                    .where(Sae.seed == seed, Latent.index == index)
                )
                text = (
                    f"Before {PLANTED_TEXT} after the markup"
                    if (seed, index) == MARKUP_LATENT
                    else f"def f(x):\n    return x + {index}  # seed {seed}"
                )
                add_planted_windows(session, int(latent_id), _windows(tokenizer, text, 3))
    finally:
        store.dispose()
    return study


@contextmanager
def ui_server(url: str, home: Path, run: str | None = None) -> Iterator[str]:
    """`autointerp ui` on the store at `url`, in its own process; yields its base URL."""
    port = free_port()
    environment = {**os.environ, "AUTOINTERP_DB": url, "AUTOINTERP_HOME": str(home)}
    command = [AUTOINTERP, "ui", "--port", str(port)] + (["--run", run] if run else [])
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout else ""
                raise AssertionError(f"autointerp ui exited with {process.returncode}: {output}")
            try:
                httpx.get(base + "/static/style.css", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def chromium_driver() -> Any:
    """Headless Chromium through chromedriver, logging the browser console; fails with one
    line naming `make browser` when either is missing."""
    if not (CHROMIUM.exists() or shutil.which("chromium")) or not CHROMEDRIVER.exists():
        pytest.fail("Chromium or chromedriver not found: install them with `make browser`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
