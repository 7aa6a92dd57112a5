"""The text of each token of a window, for showing windows token by token. No torch: the
report, `show` and the browser import it without loading a model library."""

from collections.abc import Sequence
from typing import Any


def token_strings(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each token's text, as the difference of decoded prefixes, so that characters split over
    several byte-level tokens come out whole (on the last of them) and the pieces add up to
    the decoded text. Where decoding is plain concatenation (byte-level BPE on whole
    characters: the tokens decoded one by one add up to the whole), that is each token
    decoded alone, found with two calls instead of one per prefix."""
    ids = [int(token_id) for token_id in token_ids]
    pieces = tokenizer.batch_decode([[token_id] for token_id in ids], skip_special_tokens=True)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    if "".join(pieces) == whole and not any("\ufffd" in piece for piece in pieces):
        return list(pieces)
    return _by_prefixes(tokenizer, ids)


def _by_prefixes(tokenizer: Any, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    previous = ""
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if decoded.endswith("\ufffd") and end < len(ids):
            pieces.append("")
            continue
        pieces.append(decoded[len(previous) :])
        previous = decoded
    return pieces
