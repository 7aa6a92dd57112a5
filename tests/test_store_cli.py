"""`autointerp db upgrade / queue / status / query` as a user runs them, against real SQLite
and PostgreSQL stores: output, exit codes, one-line errors, and nothing changed on error."""

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select, text

from service.store.engine import open_store, upgrade
from service.store.models import Job, Run
from service.store.runs import register_run, register_sae

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


def cli(url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOINTERP_DB": url, "COLUMNS": "200"}
    return subprocess.run(
        [AUTOINTERP, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


def seed_run(url: str, n_latents: int = 30) -> None:
    store = open_store(url)
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "demo",
            subject_model="smollm2",
            hookpoint="h",
            dataset="embedded",
            architecture="topk",
            n_latents=n_latents,
            k=4,
            seeds=[0, 1],
        )
        for seed in (0, 1):
            register_sae(session, run, seed, n_latents=n_latents, d_in=8)
    store.dispose()


def counts(url: str) -> tuple[int, int]:
    store = open_store(url)
    with store.read_session() as session:
        runs = session.scalar(select(func.count()).select_from(Run)) or 0
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    store.dispose()
    return runs, jobs


def test_upgrade_queue_status_query(store_url: str):
    result = cli(store_url, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "upgraded from empty to revision" in result.stdout
    assert "already at schema revision" in cli(store_url, "db", "upgrade").stdout
    seed_run(store_url)

    result = cli(
        store_url,
        "queue",
        "--run",
        "demo",
        "--selection",
        "sample",
        "--latents",
        "10",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "10 latents of demo: 10 new explain jobs, 0 already queued" in result.stdout
    result = cli(store_url, "queue", "--run", "demo")  # all latents by default
    assert "60 latents of demo: 50 new explain jobs, 10 already queued" in result.stdout

    result = cli(store_url, "status")
    assert result.returncode == 0, result.stderr
    assert any(
        line.split("│")[1:3] == [" explain ", " 60     "] for line in result.stdout.splitlines()
    )

    result = cli(store_url, "query", "SELECT stage, count(*) AS n FROM job GROUP BY stage")
    assert result.returncode == 0, result.stderr
    assert "explain" in result.stdout and "60" in result.stdout
    result = cli(store_url, "query", "SELECT name, seeds FROM run", "--format", "json")
    assert json.loads(result.stdout)[0]["name"] == "demo"
    result = cli(store_url, "query", "SELECT count(*) AS n FROM latent", "--format", "csv")
    assert result.stdout == "n\n60\n"


BAD_INPUT = [
    (["query", "DELETE FROM run"], "query refused"),
    (["query", "SELEC name FROM run"], "query failed"),
    (["query", "SELECT 1", "--format", "xml"], "unknown format 'xml'"),
    (["queue", "--run", "ghost"], "no run named 'ghost'"),
    (
        ["queue", "--run", "demo", "--selection", "stratified", "--latents", "4"],
        "no stored matches",
    ),
    (["queue", "--run", "demo", "--selection", "sample"], "needs a number of latents"),
    (["queue", "--run", "demo", "--selection", "some"], "--selection: Input should be"),
]


def test_bad_input_is_one_line_and_changes_nothing(store_url: str):
    upgrade(store_url)
    seed_run(store_url)
    before = counts(store_url)
    for args, fragment in BAD_INPUT:
        one_line_error(cli(store_url, *args), fragment)
        assert counts(store_url) == before, args


def test_store_not_yet_created(tmp_path: Path):
    one_line_error(cli("sqlite:///store.db", "status", cwd=tmp_path), "autointerp db upgrade")
    assert not (tmp_path / "store.db").exists()


def test_default_store_is_a_sqlite_file_in_the_working_folder(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if key != "AUTOINTERP_DB"}
    result = subprocess.run(
        [AUTOINTERP, "db", "upgrade"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "autointerp.db").exists()


def test_unreachable_store():
    one_line_error(
        cli("postgresql+psycopg://nobody@127.0.0.1:1/none", "status"), "cannot reach the store"
    )


def test_newer_schema(store_url: str):
    upgrade(store_url)
    store = open_store(store_url)
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    store.dispose()
    one_line_error(cli(store_url, "status"), "newer than this autointerp")
    one_line_error(cli(store_url, "db", "upgrade"), "newer than this autointerp")
