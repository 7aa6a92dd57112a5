"""The text of each token of a window, for showing windows token by token. No torch: the
report, `show` and the browser import it without loading a model library."""

from collections.abc import Sequence
from typing import Any


def token_strings(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each token's text, as the difference of decoded prefixes, so that characters split over
    several byte-level tokens come out whole (on the last of them) and the pieces add up to
    the decoded text."""
    pieces: list[str] = []
    previous = ""
    ids = [int(token_id) for token_id in token_ids]
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if decoded.endswith("\ufffd") and end < len(ids):
            pieces.append("")
            continue
        pieces.append(decoded[len(previous) :])
        previous = decoded
    return pieces
