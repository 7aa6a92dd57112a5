"""Prompt templates: one file per template in `service/prompts/`, versioned by its name.

A template file holds a system part and a user part, introduced by the lines
`<!-- system -->` and `<!-- user -->`, with `$name` placeholders (string.Template). Values are
inserted once and never re-expanded, so a `$` in corpus text stays a `$`. Changing a prompt
means adding `name_v2.md`, so that stored results keep pointing at the text they came from.

`render_window` is the one place corpus text enters a prompt: it escapes `&`, `<` and `>` so
that no text in a window can close the tags that delimit it or forge the `<<...>>` marks.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sae.errors import UserError
from service.llm.base import Message

# Package data: service/prompts/ in the source tree and in an installed wheel alike.
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
MARK_OPEN = "<<"
MARK_CLOSE = ">>"
SYSTEM_MARKER = "<!-- system -->"
USER_MARKER = "<!-- user -->"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: string.Template
    user: string.Template

    def render(self, **values: object) -> list[Message]:
        """Chat messages with every placeholder filled; a missing value is a KeyError."""
        text = {key: str(value) for key, value in values.items()}
        return [
            {"role": "system", "content": self.system.substitute(text)},
            {"role": "user", "content": self.user.substitute(text)},
        ]


@functools.cache
def load_prompt(name: str) -> PromptTemplate:
    """The template `service/prompts/<name>.md`."""
    path = PROMPTS_DIR / f"{name}.md"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.md"))) or "none"
        raise UserError(f"no prompt template {name!r} in {PROMPTS_DIR} (there are: {known})")
    raw = path.read_text(encoding="utf-8")
    if SYSTEM_MARKER not in raw or USER_MARKER not in raw:
        raise UserError(f"{path} needs a '{SYSTEM_MARKER}' and a '{USER_MARKER}' line")
    system, user = raw.split(SYSTEM_MARKER, 1)[1].split(USER_MARKER, 1)
    return PromptTemplate(name, string.Template(system.strip()), string.Template(user.strip()))


def escape(text: str) -> str:
    """Corpus text made inert inside a prompt's tags."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_window(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """The window's text, escaped, with each run of marked tokens wrapped in << >>.

    Leading whitespace of a marked run stays outside the marks, so that `<<the>>` reads as
    the word and not as " the".
    """
    parts: list[str] = []
    inside = False
    for index, token in enumerate(tokens):
        mark = bool(marked[index]) if marked is not None else False
        text = escape(token)
        if mark and not inside:
            stripped = text.lstrip()
            parts.append(text[: len(text) - len(stripped)])
            parts.append(MARK_OPEN)
            text = stripped
            inside = True
        elif not mark and inside:
            parts.append(MARK_CLOSE)
            inside = False
        parts.append(text)
    if inside:
        parts.append(MARK_CLOSE)
    return "".join(parts)
