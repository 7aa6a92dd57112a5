"""Prompt templates, and how corpus text enters a prompt: as text, set apart by delimiters it
cannot contain. One file per template in `service/prompts/` (package data), versioned by its
name.

A template file holds a system part and a user part, introduced by the lines
`<!-- system -->` and `<!-- user -->`, with `$name` placeholders (string.Template). Values are
inserted once and never re-expanded, so a `$` in corpus text stays a `$`. Changing a prompt
means adding `name_v2.md`, so that stored results keep pointing at the text they came from.

Windows and explanations reach the LLM exactly as written (no HTML entities: `>>>` stays
`>>>`). Each request gets its own `Delimiters`: windows sit between `<example-NONCE id="N">`
and `</example-NONCE>` lines and the explanation between `<explanation-NONCE>` tags, where
NONCE is a short hash of the request's windows that none of its texts contains (checked, so
it is safe however short), so no text can close its block or open another; the marks of
firing tokens are the first pair of `MARK_CANDIDATES` none of whose characters occurs in the
windows, so no text can forge or close a mark. The nonce depends on the windows alone, so
the requests that score one batch of windows under several explanations keep a common
prefix (a server's prefix cache) unless an explanation happens to contain the nonce.
"""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sae.errors import UserError
from service.llm.base import Message

# Package data: service/prompts/ in the source tree and in an installed wheel alike.
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
# Marks for firing tokens, most readable first; the characters of the chosen pair occur in
# none of the request's windows.
MARK_CANDIDATES = (
    ("<<", ">>"),
    ("[[", "]]"),
    ("{{", "}}"),
    ("\u27e6", "\u27e7"),
    ("\u27ea", "\u27eb"),
)
# A short nonce keeps prompts short (this tokenizer spends a token per character of it); it
# is safe at any length because it is checked against every text of the request.
NONCE_CHARS = 3
NONCE_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Every template shows corpus text, so every template must use the delimiters.
DELIMITER_PLACEHOLDER = "example_tag"
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
    if f"${DELIMITER_PLACEHOLDER}" not in raw and f"${{{DELIMITER_PLACEHOLDER}}}" not in raw:
        raise UserError(
            f"prompt template {name!r} does not delimit corpus text with ${DELIMITER_PLACEHOLDER}"
            " (it predates delimited windows); use a newer version of it"
        )
    return PromptTemplate(name, string.Template(system.strip()), string.Template(user.strip()))


@dataclass(frozen=True)
class Delimiters:
    """What sets one request's corpus text apart: the nonce of its tags and its marks."""

    nonce: str
    mark_open: str
    mark_close: str

    @property
    def example_tag(self) -> str:
        return f"example-{self.nonce}"

    @property
    def explanation_tag(self) -> str:
        return f"explanation-{self.nonce}"

    def placeholders(self) -> dict[str, str]:
        """The templates' delimiter placeholders."""
        return {
            "example_tag": self.example_tag,
            "explanation_tag": self.explanation_tag,
            "mark_open": self.mark_open,
            "mark_close": self.mark_close,
        }


def choose_delimiters(windows: Sequence[str], others: Sequence[str] = ()) -> Delimiters:
    """Delimiters for a request showing the texts `windows` and `others` (the explanation).

    The nonce is the first hash of the windows (with a counter) that no text contains, in
    any case; the marks are the first candidates none of whose characters a window contains,
    else marks built from the nonce."""
    texts = [text.lower() for text in (*windows, *others)]
    digest = hashlib.sha256("\x00".join(windows).encode("utf-8", "surrogatepass"))
    attempt = 0
    while True:
        candidate = digest.copy()
        candidate.update(attempt.to_bytes(8, "little"))
        number = int.from_bytes(candidate.digest()[:8], "little")
        nonce = "".join(
            NONCE_ALPHABET[number // len(NONCE_ALPHABET) ** i % len(NONCE_ALPHABET)]
            for i in range(NONCE_CHARS)
        )
        if not any(nonce in text for text in texts):
            break
        attempt += 1
    used = set("".join(windows))
    for mark_open, mark_close in MARK_CANDIDATES:
        if not used & set(mark_open + mark_close):
            return Delimiters(nonce, mark_open, mark_close)
    return Delimiters(nonce, f"[{nonce}:", f":{nonce}]")


def render_window(
    tokens: Sequence[str], delimiters: Delimiters, marked: Sequence[bool] | None = None
) -> str:
    """The window's text as it is, with each run of marked tokens wrapped in the marks.

    Leading whitespace of a marked run stays outside the marks, so that `<<the>>` reads as
    the word and not as " the".
    """
    parts: list[str] = []
    inside = False
    for index, text in enumerate(tokens):
        mark = bool(marked[index]) if marked is not None else False
        if mark and not inside:
            stripped = text.lstrip()
            parts.append(text[: len(text) - len(stripped)])
            parts.append(delimiters.mark_open)
            text = stripped
            inside = True
        elif not mark and inside:
            parts.append(delimiters.mark_close)
            inside = False
        parts.append(text)
    if inside:
        parts.append(delimiters.mark_close)
    return "".join(parts)


def render_windows(
    windows: Sequence[tuple[Sequence[str], Sequence[bool] | None]], delimiters: Delimiters
) -> str:
    """Numbered blocks, one per (tokens, marks) window, each on lines of its own between the
    delimiters' example tags."""
    tag = delimiters.example_tag
    return "\n\n".join(
        f'<{tag} id="{number}">\n{render_window(tokens, delimiters, marks)}\n</{tag}>'
        for number, (tokens, marks) in enumerate(windows, 1)
    )


def windows_prompt(
    template: str,
    windows: Sequence[tuple[Sequence[str], Sequence[bool] | None]],
    explanation: str | None = None,
    **values: object,
) -> list[Message]:
    """The messages of template `template` showing `windows` (tokens, marks) as `$examples`
    and, when given, `explanation` as `$explanation`, under delimiters chosen for them."""
    delimiters = choose_delimiters(
        ["".join(tokens) for tokens, _ in windows], [explanation] if explanation else []
    )
    if explanation is not None:
        values["explanation"] = explanation
    return load_prompt(template).render(
        examples=render_windows(windows, delimiters), **delimiters.placeholders(), **values
    )
