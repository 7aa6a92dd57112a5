"""Text sources and chunking: determinism, local files, and bad input."""

import json
from pathlib import Path

import pytest
import torch

from sae.data import embedded_documents, load_chunks
from sae.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def test_embedded_corpus_is_large_enough(tokenizer):
    chunks = load_chunks("embedded", tokenizer, chunk_len=256)
    assert chunks.numel() >= 100_000
    assert chunks.dtype == torch.int64


def test_embedded_corpus_is_deterministic(tokenizer):
    first = load_chunks("embedded", tokenizer, chunk_len=64, max_tokens=20_000, seed=3)
    again = load_chunks("embedded", tokenizer, chunk_len=64, max_tokens=20_000, seed=3)
    other = load_chunks("embedded", tokenizer, chunk_len=64, max_tokens=20_000, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # A different seed reorders the same chunks; it does not change them.
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, other.tolist()))
    assert first.shape == (20_000 // 64, 64)


def test_embedded_documents_are_text():
    documents = embedded_documents()
    assert len(documents) > 1000
    assert any("return" in document for document in documents[:100])


def test_local_txt_and_jsonl(tmp_path: Path, tokenizer):
    text = "Sparse autoencoders find directions in activation space. " * 40
    (tmp_path / "a.txt").write_text(text)
    txt_chunks = load_chunks(str(tmp_path / "a.txt"), tokenizer, chunk_len=16)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": text}) for _ in range(2)))
    jsonl_chunks = load_chunks(str(jsonl), tokenizer, chunk_len=16)
    assert txt_chunks.shape[1] == 16
    assert jsonl_chunks.shape[0] >= 2 * txt_chunks.shape[0] - 1
    folder_chunks = load_chunks(str(tmp_path), tokenizer, chunk_len=16)
    assert torch.equal(folder_chunks, txt_chunks)


def test_empty_dataset_is_a_user_error(tmp_path: Path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UserError, match="fewer than one chunk"):
        load_chunks(str(empty), tokenizer, chunk_len=16)


def test_missing_and_malformed_files(tmp_path: Path, tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        load_chunks(str(tmp_path / "missing.jsonl"), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        load_chunks(str(bad), tokenizer, chunk_len=4)
    wrong_suffix = tmp_path / "data.csv"
    wrong_suffix.write_text("a,b\n")
    with pytest.raises(UserError, match="neither .txt nor .jsonl"):
        load_chunks(str(wrong_suffix), tokenizer)
