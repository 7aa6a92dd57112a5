"""Reading one latent must not scan the run: on SQLite, the planner answers a latent's windows
of one cache version and its newest scores of one campaign from indexes that constrain the
latent, whatever the planner's statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from service.store.engine import open_store, upgrade
from service.store.models import Score
from service.store.scores import latest_scores
from service.store.windows import latent_windows


@contextmanager
def empty_store_session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    upgrade(url)
    store = open_store(url)
    try:
        with store.session() as session:
            yield session
    finally:
        store.engine.dispose()


def plans_of(session: Session, read: Callable[[Session], Any]) -> list[str]:
    """The SQLite query plan lines of every SELECT that `read` runs."""
    connection = session.connection()
    details: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            details.extend(str(row[-1]) for row in plan)

    event.listen(connection, "before_cursor_execute", explain)
    try:
        read(session)
    finally:
        event.remove(connection, "before_cursor_execute", explain)
    return details


def searches_of(details: list[str], table: str) -> list[str]:
    return [detail for detail in details if f" {table} " in f" {detail} "]


def test_one_latents_windows_are_found_by_latent(tmp_path: Path) -> None:
    with empty_store_session(tmp_path) as session:
        details = plans_of(
            session, lambda s: s.execute(latent_windows(latent_id=7, version_id=3)).all()
        )
    example = searches_of(details, "example")
    assert example and all("latent_id=?" in detail for detail in example), details


def test_one_latents_newest_scores_are_found_by_latent_and_campaign(tmp_path: Path) -> None:
    with empty_store_session(tmp_path) as session:
        details = plans_of(
            session, lambda s: latest_scores(s, campaign_id=2, latent_ids=Score.latent_id == 7)
        )
    score = searches_of(details, "score")
    assert score and all(
        "latent_id=? AND campaign_id=?" in detail or "INTEGER PRIMARY KEY" in detail
        for detail in score
    ), details
