"""Each token's text on the real SmolLM2 tokenizer: the pieces add up to the decoded text, a
character split over byte-level tokens comes out whole on its last token, and every piece is
the difference of the decoded prefixes (the definition the fast path must agree with)."""

from pathlib import Path

import pytest

from sae.subject_model import load_tokenizer
from sae.token_text import _by_prefixes, token_strings

TEXTS = [
    "def total(values):\n    return sum(values)  # plain ASCII",
    "Café crème, naïve façade: déjà vu.",
    "Emoji 🙂🚀 and CJK 漢字 split over byte tokens.",
    "  leading spaces,\ttabs and\n\nblank lines ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_the_prefix_differences(home: Path, text: str):
    tokenizer = load_tokenizer("smollm2", home)
    ids = tokenizer(text)["input_ids"]
    pieces = token_strings(tokenizer, ids)
    assert pieces == _by_prefixes(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert len(pieces) == len(ids)
    assert not any("\ufffd" in piece for piece in pieces)
    if "🙂" in text:  # split over several tokens: whole on the last, empty before
        assert "" in pieces and any("🙂" in piece for piece in pieces)
