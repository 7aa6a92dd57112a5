"""The `autointerp` command line (`commands`), its options made from the stages' configs
(`options`), and the entry point that turns a user's mistake into one line."""

from service.cli.commands import app, main

__all__ = ["app", "main"]
