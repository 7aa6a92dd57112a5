"""Starting the browser: the read-only store, the app, and uvicorn on the chosen address."""

from __future__ import annotations

import socket
from pathlib import Path

import uvicorn
from sqlalchemy import select

from sae.errors import UserError
from service.config import UIConfig
from service.store.models import Run
from service.store.runs import get_run
from service.ui.app import create_app
from service.ui.readonly import open_readonly


def check_port(host: str, port: int) -> None:
    """A UserError when `host:port` cannot be listened on (taken, or not this machine's)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UserError(
            f"cannot listen on {host}:{port} ({error.strerror}); pick another with --port/--host"
        ) from error


def serve(config: UIConfig, db: str, home: Path) -> None:
    """Serve the store at `db` until interrupted; `home` holds the subject models'
    tokenizers. Refuses a store that is missing, not migrated, or without the named run."""
    from sae.subject_model import load_tokenizer

    store = open_readonly(db)
    try:
        with store.read_session() as session:
            if config.run is not None:
                get_run(session, config.run)
            elif session.scalar(select(Run.id).limit(1)) is None:
                raise UserError("the store holds no run yet; run `autointerp run STUDY` first")
        check_port(config.host, config.port)
        app = create_app(store, config, lambda model: load_tokenizer(model, home))
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        store.dispose()
